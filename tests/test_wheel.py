"""The wheel carries the recipes: built from this checkout (offline, no build isolation) and unpacked into
a folder of its own, `python -m rlp_jax.train --experiment=smoke` runs from a directory outside the
checkout, with rlp_jax imported from the wheel."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.train.train_cases import ANY_LENGTH

ROOT = Path(__file__).resolve().parents[1]


def test_an_installed_wheel_runs_its_recipes_from_any_folder(tmp_path):
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(dist)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = dist.glob("rlp_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"rlp_jax/recipes/{r}.py" for r in ("demo", "smoke", "web_mix", "cpt_baseline", "smollm2")} <= set(names)
    assert not any(n.startswith(("experiments/", "tests/", "rlp_jax/recipes/replication")) for n in names)
    zipfile.ZipFile(wheel).extractall(site)     # what `pip install` puts in site-packages (pure Python)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    where = subprocess.run([sys.executable, "-c", "import rlp_jax; print(rlp_jax.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(site / "rlp_jax" / "__init__.py"), where.stdout + where.stderr
    small = ["rlp.rollout.thought_len=4", "rlp.rollout.group_size=2", ANY_LENGTH]   # the other smoke runs' step
    run = subprocess.run([sys.executable, "-m", "rlp_jax.train", "--experiment=smoke", "--workdir=run",
                          "--set", "train.steps=1", "--set", "train.plot=false", "--set", "train.eval_every=0",
                          *(a for s in small for a in ("--set", s))],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (elsewhere / "run" / "checkpoints" / "1").is_dir() and "final:" in run.stdout
