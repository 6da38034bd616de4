"""Test-session settings: a persistent XLA compilation cache shared by the tests and the training
subprocesses they start (the same small programs compile once per machine instead of once per run) and XLA's
CPU backend without LLVM optimisation."""

import os
import tempfile
from pathlib import Path

_CACHE = Path(tempfile.gettempdir()) / "rlp_jax_test_xla_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The tests' programs are tiny: compiling them costs far more than running them, and LLVM at -O0 halves
# XLA's CPU compile time (a cold `smoke` training launch: 26 -> 14 CPU seconds). The HLO program, its fusions
# and buffers are the same; only its machine code is less optimised. Subprocesses inherit it (tests/xla_env.py).
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
