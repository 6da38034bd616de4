"""Devices the planner knows (spec sheets), `--devices` and `--mesh` parsing."""

from __future__ import annotations

import dataclasses
import os
import re

from rlp_jax import sharding
from rlp_jax.runs.config import ConfigError, RunConfig

GIB = 2 ** 30

# Public spec sheets: HBM per chip (GiB; NVIDIA's "80GB" is 80 GiB as reported), dense bf16 peak per chip
# (FLOP/s, no sparsity), HBM bandwidth (bytes/s), TensorCores per chip counted by the `-N` accelerator suffix.
DEVICE_KINDS: dict[str, dict] = {
    "v4": dict(name="TPU v4", hbm_gib=32, peak=275e12, bandwidth=1228e9, cores_per_chip=2, jax_kind="TPU v4"),
    "v5e": dict(name="TPU v5e", hbm_gib=16, peak=197e12, bandwidth=819e9, cores_per_chip=1, jax_kind="TPU v5 lite"),
    "v5p": dict(name="TPU v5p", hbm_gib=95, peak=459e12, bandwidth=2765e9, cores_per_chip=2, jax_kind="TPU v5p"),
    "v6e": dict(name="TPU v6e (Trillium)", hbm_gib=32, peak=918e12, bandwidth=1640e9, cores_per_chip=1,
                jax_kind="TPU v6 lite"),
    "a100-40gb": dict(name="NVIDIA A100 40GB", hbm_gib=40, peak=312e12, bandwidth=1555e9, jax_kind="A100-SXM4-40GB"),
    "a100-80gb": dict(name="NVIDIA A100 80GB", hbm_gib=80, peak=312e12, bandwidth=2039e9, jax_kind="A100-SXM4-80GB"),
    "h100": dict(name="NVIDIA H100 SXM 80GB", hbm_gib=80, peak=989e12, bandwidth=3350e9, jax_kind="H100"),
    "h200": dict(name="NVIDIA H200 141GB", hbm_gib=141, peak=989e12, bandwidth=4800e9, jax_kind="H200"),
    "cpu": dict(name="host CPU", hbm_gib=None, peak=None, bandwidth=None, jax_kind="cpu"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e", "h100-80gb": "h100", "h200-141gb": "h200"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """`chips` devices of one kind. hbm_bytes, peak_flops (dense bf16 FLOP/s) and bandwidth are per chip."""

    kind: str
    name: str
    chips: int
    hbm_bytes: float
    peak_flops: float | None
    bandwidth: float | None

    @property
    def is_tpu(self) -> bool:
        """A TPU kind (its arrays are laid out in (8, 128) tiles)."""
        return "cores_per_chip" in DEVICE_KINDS[self.kind]


def host_ram() -> float:
    """Bytes of RAM of this host (the `cpu` kind's "HBM")."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 16.0 * GIB


def device_spec(text: str) -> DeviceSpec:
    """Parse `v5p-64`, `v5litepod-16`, `v6e-8`, `h100x8`, `a100-80gbx4`, `cpu` (see the module docstring)."""
    s = text.strip().lower()
    count, by_cores = 1, False
    if m := re.fullmatch(r"(.+?)x(\d+)", s):
        s, count = m.group(1), int(m.group(2))
    elif m := re.fullmatch(r"(.+?)-(\d+)", s):
        s, count, by_cores = m.group(1), int(m.group(2)), True
    kind = _ALIASES.get(s, s)
    if kind not in DEVICE_KINDS:
        raise ConfigError(f"unknown device kind {text!r}; valid kinds: {', '.join(DEVICE_KINDS)} "
                          "(TPU: v5p-64, v5litepod-16; GPU/cpu: h100x8, cpux2)")
    spec = DEVICE_KINDS[kind]
    if by_cores:
        if "cores_per_chip" not in spec:
            raise ConfigError(f"--devices={text}: write {kind}x{count} for {count} GPUs (the -N form is for TPU "
                              "accelerator types)")
        if count % spec["cores_per_chip"]:
            raise ConfigError(f"--devices={text}: {kind}-N counts TensorCores ({spec['cores_per_chip']} per chip); "
                              f"N must be a multiple of {spec['cores_per_chip']}")
        count //= spec["cores_per_chip"]
    if count < 1:
        raise ConfigError(f"--devices={text}: the device count must be >= 1")
    hbm = host_ram() if spec["hbm_gib"] is None else spec["hbm_gib"] * GIB
    return DeviceSpec(kind=kind, name=spec["name"], chips=count, hbm_bytes=hbm, peak_flops=spec["peak"],
                      bandwidth=spec["bandwidth"])


def kind_of_jax_device(device_kind: str) -> str | None:
    """Our kind for a `jax.Device.device_kind` string ("NVIDIA H100 80GB HBM3" -> "h100"), or None."""
    dk = device_kind.lower()
    for kind, spec in DEVICE_KINDS.items():
        if spec["jax_kind"].lower() in dk:
            return kind
    return COMPILE_ONLY_KINDS.get(dk)


# What libtpu's compile-only devices (`plan.compile`) call themselves.
COMPILE_ONLY_KINDS = {"tpu v5": "v5p", "tpu v4": "v4", "tpu v5e": "v5e", "tpu v6e": "v6e"}


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------

def parse_mesh(text: str, chips: int) -> dict[str, int]:
    """`--mesh` text (`sharding.MeshConfig.parse`, the syntax of every command) resolved on `chips` -> sizes."""
    try:
        data, fsdp, tensor = sharding.MeshConfig.parse(text).resolve(chips)
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("--mesh") else f"--mesh {text!r}: {e}") from None
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def default_mesh(cfg: RunConfig, chips: int) -> dict[str, int]:
    """`train.mesh` when it resolves for `chips` and the batch splits over its data x fsdp; else all on fsdp."""
    try:
        data, fsdp, tensor = cfg.train.mesh.resolve(chips)
        if cfg.data.batch_size % (data * fsdp) == 0:
            return {"data": data, "fsdp": fsdp, "tensor": tensor}
    except ValueError:
        pass
    return {"data": 1, "fsdp": chips, "tensor": 1}
