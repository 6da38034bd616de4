"""Test-session settings: a persistent XLA compilation cache shared by the tests and the training
subprocesses they start (the same small programs compile once per machine instead of once per run), XLA's
CPU backend without LLVM optimisation, and under pytest-xdist the slowest test modules first."""

import os
import tempfile
from pathlib import Path

import pytest

# The suite runs on the CPU unless JAX_PLATFORMS says otherwise (benchmarks/gpu_check.sh sets it for the
# GPU-only tests): with libtpu installed (the test extra, for the compile-only TPU tests) JAX would otherwise
# try to bring up a TPU in every process and log its failure to stderr, which the CLI tests read.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = Path(tempfile.gettempdir()) / "rlp_jax_test_xla_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The tests' programs are tiny: compiling them costs far more than running them. LLVM at -O0 and XLA's
# classic CPU emitters instead of its MLIR fusion emitters compile an RLP train step in a sixth of the CPU
# time (20 -> 3 s; -O0 alone: 10 s). -O0 leaves the optimised HLO as it is; the classic emitters fuse fewer
# ops (the same computation, float sums possibly in another order). Subprocesses inherit the flags
# (tests/xla_env.py).
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in _FAST_COMPILE if f.split("=")[0] not in
                                             {g.split("=")[0] for g in _flags}])

# Seconds each slow module takes on 2 cores with a cold compilation cache (roughly; kept up to date by hand
# from `--durations`). Under `-n N` whole modules are handed to the workers, these first, slowest first, then
# the rest in collection order: no worker is left with a long module at the end while the other idles, and a
# module-scoped fixture is built once.
SLOW_MODULES = {
    "tests/train/test_train.py": 110,
    "tests/train/test_multihost.py": 105,
    "tests/evaluate/test_harness.py": 45,
    "tests/rlp/test_objective.py": 45,
    "tests/faults/test_cli_faults.py": 40,
    "tests/model/test_blockwise.py": 40,
    "tests/rlp/test_hybrid_rlp.py": 40,
    "tests/test_compile.py": 35,
    "tests/test_plan.py": 35,
    "tests/model/test_hybrid_branch.py": 30,
    "tests/model/test_hybrid.py": 30,
    "tests/model/test_kernels.py": 28,
    "tests/test_benchmarks.py": 23,
    "tests/test_export.py": 20,
    "tests/model/test_gguf.py": 20,
    "tests/generate/test_generation.py": 20,
    "tests/train/test_mesh.py": 19,
    "tests/train/test_train_step.py": 17,
    "tests/rlp/test_toy_task.py": 17,
    "tests/test_notebook.py": 16,
    "tests/rlp/test_rollout.py": 15,
    "tests/test_demo.py": 14,
    "tests/rlp/test_prompt.py": 12,
    "tests/rlp/test_think_eval.py": 12,
    "tests/test_readme.py": 10,
    "tests/model/test_transformer.py": 12,
    "tests/model/test_hub.py": 12,
    "tests/test_wheel.py": 12,
    "tests/train/test_metrics.py": 10,
    "tests/model/test_sharded_load.py": 8,
}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    """In an xdist worker: the slow modules first (a stable sort: a module's tests keep their order)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: -SLOW_MODULES.get(_module(item.nodeid), 0))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` (xdist's default `--dist load`): whole modules in the order above, one at a time to the worker
    that runs out first; an explicit `--dist` is left alone."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False    # keep the collection's order, not the largest scope first
    return LoadScopeScheduling(config, log)
