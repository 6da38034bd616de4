"""Shared cases of the multi-process tests: a free local port for the coordinator and the environment of a
CPU worker process (the suite's compilation cache and XLA flags, no inherited JAX/SLURM/TPU settings)."""

import os
import socket
from pathlib import Path

from tests.xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_", "RLP_JAX"))}
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", XLA_FLAGS=xla_flags())
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:   # the suite's shared compilation cache
        for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
            base[k] = os.environ[k]
    return base
