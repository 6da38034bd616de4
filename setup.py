"""The recipes in experiments/*.py ship inside the package as `rlp_jax.recipes` (everything else is in setup.cfg)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["rlp_jax", "rlp_jax.*"]) + ["rlp_jax.recipes"],
      package_dir={"rlp_jax.recipes": "experiments"})
