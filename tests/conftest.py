"""Test-session settings: a persistent XLA compilation cache shared by the tests and the training
subprocesses they start (the same small programs compile once per machine instead of once per run)."""

import os
import tempfile
from pathlib import Path

_CACHE = Path(tempfile.gettempdir()) / "rlp_jax_test_xla_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
