"""The plan of one run on given devices: memory per device against HBM, FLOPs, tokens, step time, hints.

State is `costs.state_bytes` for every model family; activations, FLOPs and the sampling step's reads come from
the family's cost model (`COST_MODELS`, keyed by the family's name: `costs` for the dense family, `hybrid_costs`
for Nemotron-H; the same functions, phases and parts)."""

from __future__ import annotations

import dataclasses
import math

from rlp_jax.model import family
from rlp_jax.model.config import REMATS
from rlp_jax.model.family import Config
from rlp_jax.plan import costs, hybrid_costs
from rlp_jax.plan.costs import (
    DENSE,
    TPU_TILING,
    dtype_bytes,
    effective_tokens,
    state_bytes,
)
from rlp_jax.plan.devices import GIB, DeviceSpec
from rlp_jax.runs.config import ConfigError, RunConfig
from rlp_jax.runs.loading import model_config


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything the planner prints. Bytes are per device; FLOPs and tokens per step (global).

    state: params / optimizer / ema / reference / gradients. activations: peak of each phase under the
    configured remat; loss_by_remat: the loss phase under none / full / dots. total: state + the largest
    phase (gradients count with the loss phase). rlp_flops: rollout / reward / update / reference.
    """

    model: Config
    devices: DeviceSpec
    mesh: dict[str, int]
    objective: str
    batch: int
    rows_per_device: int
    seq_len: int
    micro_batches: int
    num_params: int
    state: dict[str, float]
    activations: dict[str, float]
    loss_by_remat: dict[str, float]
    total: float
    rlp_flops: dict[str, float]
    ntp_flops: float
    input_tokens: float
    effective_tokens: float
    decode_floor_s: float | None
    warnings: tuple[str, ...]
    hints: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return self.total <= self.devices.hbm_bytes

    @property
    def step_flops(self) -> float:
        return sum(self.rlp_flops.values()) if self.objective == "rlp" else self.ntp_flops

    def step_time(self, mfu: float) -> float | None:
        """Seconds per step at this MFU (decode no faster than its memory-bound floor); None without a peak."""
        if self.devices.peak_flops is None:
            return None
        rate = self.devices.chips * self.devices.peak_flops * mfu
        if self.objective == "ntp":
            return self.ntp_flops / rate
        rest = self.step_flops - self.rlp_flops["rollout"]
        return rest / rate + max(self.rlp_flops["rollout"] / rate, self.decode_floor_s or 0.0)


def _total(state: dict[str, float], phases: dict[str, float]) -> float:
    held = state["params"] + state["optimizer"] + state["ema"] + state["reference"]
    update = state["gradients"] + state["params"]          # gradients + the update's temporaries
    return held + max(phases.get("teacher", 0.0), phases.get("rollout", 0.0),
                      phases["loss"] + state["gradients"], update)


def _with_accumulator(state: dict[str, float], micro_batches: int) -> dict[str, float]:
    """State bytes with train_step's float32 gradient accumulator (as large as the float32 EMA) when
    the step runs more than one micro-batch."""
    if micro_batches == 1:
        return state
    return state | {"gradients": state["gradients"] + state["ema"]}


# A model family's cost model: activation_bytes, rlp_step_flops, ntp_step_flops, decode_step_bytes, describe, CACHES.
COST_MODELS = {"dense": costs, "nemotron_h": hybrid_costs}


def cost_model(m: Config):
    """The cost model of `m`'s family (`COST_MODELS`)."""
    return COST_MODELS[family.of(m).NAME]


def plan(cfg: RunConfig, devices: DeviceSpec, mesh: dict[str, int]) -> Plan:
    """Memory per device, FLOPs and tokens per step of `cfg` on `devices` with mesh sizes `mesh`."""
    if math.prod(mesh.values()) != devices.chips:
        raise ConfigError(f"mesh {mesh} has {math.prod(mesh.values())} devices but {devices.chips} are planned")
    m = model_config(cfg.model)
    model_costs = cost_model(m)
    rlp, objective = cfg.rlp, cfg.train.objective
    batch, length = cfg.data.batch_size, cfg.data.seq_len
    split, tp = mesh["data"] * mesh["fsdp"], mesh["tensor"]
    rows = -(-batch // split)
    micro = cfg.train.micro_batches
    warnings, hints = [], []
    if batch % split:
        warnings.append(f"data.batch_size={batch} does not split over data x fsdp = {split} devices "
                        f"(rlp_jax.train refuses it); planned with {rows} rows per device")
    elif rows % micro:
        warnings.append(f"{rows} rows per device do not split into train.micro_batches={micro} (rlp_jax.train "
                        f"refuses it); planned with {-(-rows // micro)} rows per micro-batch")
    if objective == "rlp" and rlp.rollout.min_context + rlp.reward.horizon > length:
        warnings.append(f"no valid thinking position: rollout.min_context + reward.horizon > data.seq_len={length}")

    base_state = state_bytes(cfg, m, mesh)
    state = _with_accumulator(base_state, micro)
    copy = 0.0 if m.param_dtype == "float32" else state["ema"] * dtype_bytes(m.param_dtype) / 4
    mb_rows = -(-rows // micro)
    tiling = TPU_TILING if devices.is_tpu else DENSE
    act = lambda mc, r=mb_rows: model_costs.activation_bytes(mc, rlp, rows=r, seq_len=length, tp=tp,  # noqa: E731
                                                      objective=objective, param_copy=copy, tiling=tiling)
    phases = act(m)
    loss_by_remat = {r: act(m.replace(remat=r))["loss"] for r in REMATS}
    total = _total(state, phases)

    ro = rlp.rollout
    decode_floor = None
    if objective == "rlp" and devices.bandwidth:   # T sequential sampling steps per micro-batch
        read = model_costs.decode_step_bytes(m, rows=mb_rows, seq_len=length, branches=ro.positions_per_row *
                                             ro.group_size, thought_len=ro.thought_len, tp=tp,
                                             fsdp=mesh["fsdp"])
        decode_floor = micro * ro.thought_len * read / devices.bandwidth

    if total > devices.hbm_bytes:
        big = max(phases, key=phases.get)
        hints.append(f"largest activation phase: {big} ({phases[big] / GIB:.1f} GiB per device)")
        if state["params"] + state["optimizer"] + state["ema"] > 0.5 * devices.hbm_bytes:
            hints.append("state dominates: raise the fsdp axis (--mesh fsdp=...) or use more chips")
        if m.remat != "full" and loss_by_remat["full"] < phases["loss"]:
            hints.append(f"--set model.remat=full (loss phase {loss_by_remat['full'] / GIB:.1f} GiB) or dots "
                         f"({loss_by_remat['dots'] / GIB:.1f} GiB)")
        if objective == "rlp":
            hints.append("fewer branches per device: lower rlp.rollout.positions_per_doc / docs_per_row / group_size / "
                         "thought_len (the branch residuals and attention scores grow with each)")
        if mb_rows > 1:
            fitting = [k for k in range(micro + 1, rows + 1) if rows % k == 0 and
                       _total(_with_accumulator(base_state, k), act(m, rows // k)) <= devices.hbm_bytes]
            how = (f"--set train.micro_batches={fitting[0]} fits" if fitting else
                   f"even {rows} micro-batches of one row do not fit")
            hints.append(f"fewer rows at a time: {mb_rows} rows per device per micro-batch now; {how} (gradient "
                         "accumulation: same batch, activations of fewer rows), or spread rows over more chips")
        else:
            hints.append("one row per device already: shorten data.seq_len or add tensor parallelism "
                         "(--mesh tensor=..)")
    return Plan(model=m, devices=devices, mesh=dict(mesh), objective=objective, batch=batch, rows_per_device=rows,
                seq_len=length, micro_batches=micro, num_params=m.num_params(), state=state, activations=phases,
                loss_by_remat=loss_by_remat, total=total, rlp_flops=model_costs.rlp_step_flops(m, rlp, batch, length),
                ntp_flops=model_costs.ntp_step_flops(m, batch, length), input_tokens=float(batch * length),
                effective_tokens=effective_tokens(rlp, batch, length), decode_floor_s=decode_floor,
                warnings=tuple(warnings), hints=tuple(hints))
