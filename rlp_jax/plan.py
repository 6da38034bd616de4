"""Memory and FLOPs planner: will a run fit the devices, and what does one step cost?

    python -m rlp_jax.plan --experiment=web_mix --set model.preset=qwen3-1.7b --devices=v5p-64
    python -m rlp_jax.plan --experiment=smoke --devices=h100x8 --mesh data=2,fsdp=4,tensor=1 --mfu 0.35

Devices: `KIND-N` is a Cloud TPU accelerator type, `KINDxN` is N chips of any kind, a bare KIND is one
chip. In TPU accelerator types the suffix counts TensorCores for v4 and v5p (2 per chip: v5p-64 is 32
chips) and chips for v5e (v5litepod-16) and v6e (v6e-8). GPUs take only `xN` (h100x8). `cpu` is the
host (its RAM as "HBM", no spec peak). Spec values: `DEVICE_KINDS`.

Everything is per device and an *estimate* of what the current code materialises:
  * State: the exact `TrainState` of `rlp_jax.train` (params, AdamW moments in the param dtype, the
    float32 EMA teacher, the KL reference when kl_beta > 0), from `jax.eval_shape`, each leaf divided
    as `rlp_jax.sharding` would shard it on the mesh (a logical axis that does not divide replicates).
    Gradients: one more copy of the params.
  * Activations, per phase of `train_step.rlp_step` (the peak is the largest phase plus the state):
    teacher (EMA forward; the vocabulary projection runs TOKEN_CHUNK positions at a time: [B, chunk, V]
    float32 logits and log-softmax), rollout (prefix KV cache of the local documents, branch KV cache
    of N = K*G branches x T slots, per-step logits), loss (the differentiable document + branch
    forward: per-layer residuals kept for the backward, which depend on model.remat, and the branch
    logits of one chunk of THOUGHT_CHUNK thought slots plus the H target slots, [B, N, chunk + H, V]
    float32: logits, temperature-scaled policy logits, log-softmax and cotangent, 4 copies; the chunks
    are rematerialised in the backward). Attention scores are dense
    and masked in this code ([L, L] per document row, [S, L + S] per branch), so memory counts them
    dense. Heads / MLP / vocab-wide activations are divided by the tensor axis (GSPMD follows the
    weights); rows are divided by data x fsdp.
  * FLOPs (model FLOPs, the MFU convention): 2 x (weights of every matmul) per token, + 2 D V per
    token whose logits are computed, + 4 Y H Dh per attended (query, key) pair, counting causal pairs
    only (one document per row; a branch at t attends to t prefix keys and its own tokens, t at the
    mean valid position). Backward = 2 x forward. Thoughts are assumed to use all T slots. The dense
    masked attention of the code executes up to ~2x the attention term (not counted).
  * Step time: FLOPs / (chips x spec peak x MFU), except that sampling is taken no faster than its
    memory-bound floor: T sequential decode steps, each reading all weights (in compute dtype) and the
    dense KV caches from HBM. FSDP also all-gathers every layer at each decode step; on a slow
    interconnect that, not HBM, sets the floor (not modelled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

import jax
from jax.sharding import AbstractMesh

from rlp_jax import sharding
from rlp_jax.model.config import REMATS, ModelConfig
from rlp_jax.model.scoring import TOKEN_CHUNK
from rlp_jax.rlp.config import RLPConfig
from rlp_jax.rlp.rollout import THOUGHT_CHUNK
from rlp_jax.train import step as train_step
from rlp_jax.train.config import ConfigError, RunConfig, apply_overrides, load_experiment, recipe_config
from rlp_jax.train.optim import make_optimizer

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


def _host_ram() -> float:
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
    hbm = _host_ram() if spec["hbm_gib"] is None else spec["hbm_gib"] * GIB
    return DeviceSpec(kind=kind, name=spec["name"], chips=count, hbm_bytes=hbm, peak_flops=spec["peak"],
                      bandwidth=spec["bandwidth"])


def kind_of_jax_device(device_kind: str) -> str | None:
    """Our kind for a `jax.Device.device_kind` string ("NVIDIA H100 80GB HBM3" -> "h100"), or None."""
    dk = device_kind.lower()
    for kind, spec in DEVICE_KINDS.items():
        if spec["jax_kind"].lower() in dk:
            return kind
    return None


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------

def parse_mesh(text: str, chips: int) -> dict[str, int]:
    """`data=2,fsdp=-1,tensor=1` (omitted axes: data=1, fsdp=-1 if no -1 is given, tensor=1) -> sizes."""
    sizes = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in sharding.AXES or not re.fullmatch(r"-?\d+", value.strip()):
            raise ConfigError(f"--mesh {text!r}: expected axis=size for axes {', '.join(sharding.AXES)}, "
                              "e.g. data=1,fsdp=-1,tensor=1")
        sizes[key.strip()] = int(value)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}
    if -1 not in sizes.values() and "fsdp" not in text:
        sizes["fsdp"] = -1
    try:
        data, fsdp, tensor = sharding.MeshConfig(**sizes).resolve(chips)
    except ValueError as e:
        raise ConfigError(f"--mesh {text!r}: {e}") from None
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


# ----------------------------------------------------------------------------------------------
# Model and state
# ----------------------------------------------------------------------------------------------

def model_config(cfg: RunConfig) -> ModelConfig:
    """The run's ModelConfig: the preset, or the architecture in `model.init_from` (its config.json, or a GGUF
    file's metadata; no weights read)."""
    ms = cfg.model
    extra = dict(param_dtype=ms.param_dtype, compute_dtype=ms.compute_dtype, remat=ms.remat)
    if ms.init_from is None:
        return ModelConfig.preset(ms.preset, **extra)
    from rlp_jax.model import gguf as gguf_io
    from rlp_jax.model import hf

    if gguf_io.is_gguf(ms.init_from):
        try:
            return gguf_io.config_from_gguf(gguf_io.open_gguf(ms.init_from), **extra)
        except hf.CheckpointError as e:
            raise ConfigError(str(e)) from None
    path = Path(ms.init_from) / "config.json"
    if not path.exists():
        raise ConfigError(f"model.init_from={ms.init_from}: no config.json there")
    try:
        return hf.config_from_hf(json.loads(path.read_text()), **extra)
    except hf.CheckpointError as e:
        raise ConfigError(str(e)) from None


def _dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2


def state_bytes(cfg: RunConfig, m: ModelConfig, mesh: dict[str, int]) -> dict[str, float]:
    """Bytes per device of params, optimizer state, EMA, reference (kl_beta > 0) and gradients.

    Shapes come from `jax.eval_shape` of the real `TrainState`; each leaf is divided as
    `sharding.state_shardings` shards it on a (data, fsdp, tensor) mesh of these sizes.
    """
    amesh = AbstractMesh(tuple(mesh[a] for a in sharding.AXES), sharding.AXES)
    layout = train_step.state_layout(m, make_optimizer(cfg.optim, cfg.train.steps), amesh,
                                     keep_reference=cfg.keeps_kl_reference)
    state, st_sh = layout.abstract, layout.shardings
    out = {"params": 0.0, "opt_state": 0.0, "ema_params": 0.0, "ref_params": 0.0, "step": 0.0}
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(st_sh)):
        out[path[0].name] += math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return {"params": out["params"], "optimizer": out["opt_state"] + out["step"], "ema": out["ema_params"],
            "reference": out["ref_params"], "gradients": out["params"]}


# ----------------------------------------------------------------------------------------------
# Activations (see the module docstring)
# ----------------------------------------------------------------------------------------------

def _per_layer(m: ModelConfig, remat: str, tp: int) -> tuple[float, float]:
    """(bytes per token, bytes per dense attention pair) one layer keeps for the backward under `remat`."""
    c, d, f, h, hk, dh = (_dtype_bytes(m.compute_dtype), m.hidden_size, m.intermediate_size, m.num_heads,
                          m.num_kv_heads, m.head_dim)
    if remat == "full":      # the layer input only
        return c * d, 0.0
    if remat == "dots":      # weight-matmul outputs (q, k, v, o, gate, up, down) and the layer input
        return c * (3 * d + ((h + 2 * hk) * dh + 2 * f) / tp), 0.0
    # none: norm inputs/outputs, q/k/v before and after qk-norm/rotary, attention output, 4 MLP-wide
    # tensors (compute dtype), float32 norm statistics; per pair the float32 probabilities + their cast.
    qk32 = 4 * (h + hk) * dh / tp if m.qk_norm else 0.0
    return c * (4 * d + (3 * (h + hk) * dh + 4 * f) / tp) + 8 * d + qk32, h * (4 + c) / tp


def _transient(m: ModelConfig, tokens: float, pairs: float, tp: int) -> float:
    """One layer's forward working set (recomputed or not): activations + float32 scores, probabilities."""
    tok, _ = _per_layer(m, "none", tp)
    return tok * tokens + pairs * m.num_heads * (8 + _dtype_bytes(m.compute_dtype)) / tp


def _gathered(m: ModelConfig, tp: int) -> float:
    """Weights gathered for compute: two layers (the current and the prefetched) and the output head."""
    c = _dtype_bytes(m.compute_dtype)
    emb = m.vocab_size * m.hidden_size
    layer = (m.num_params() - emb * (1 if m.tie_word_embeddings else 2) - m.hidden_size) / m.num_layers
    return c * (2 * layer + emb) / tp


def activation_bytes(m: ModelConfig, rlp: RLPConfig, *, rows: int, seq_len: int, tp: int,
                     objective: str = "rlp", param_copy: float = 0.0) -> dict[str, float]:
    """Peak activation bytes per device of each phase of a step on `rows` local documents of `seq_len`.

    Returns {"teacher", "rollout", "loss"} for objective "rlp" ({"loss"} for "ntp"). param_copy: bytes
    of the param-dtype copy of the EMA the teacher pass makes (0 when params are float32).
    """
    c, y, hk, dh, v = _dtype_bytes(m.compute_dtype), m.num_layers, m.num_kv_heads, m.head_dim, m.vocab_size
    b, length = rows, seq_len
    tok, pair = _per_layer(m, m.remat, tp)
    gathered = _gathered(m, tp)
    doc_tokens, doc_pairs = b * length, b * length * length
    doc_transient = _transient(m, doc_tokens, doc_pairs, tp)
    if objective == "ntp":
        saved = y * (tok * doc_tokens + pair * doc_pairs)
        return {"loss": saved + 3 * 4 * b * length * v / tp + doc_transient + gathered}
    ro = rlp.rollout
    n, t = ro.positions_per_doc * ro.group_size, ro.thought_len
    s = t + 1 + rlp.reward.horizon
    kv = lambda slots: 2 * y * slots * hk * dh * c / tp                              # noqa: E731
    teacher = param_copy + 2 * 4 * b * min(length, TOKEN_CHUNK) * v / tp + doc_transient + gathered
    decode = (kv(b * n * t) + 4 * 4 * b * n * v / tp
              + _transient(m, b * n, b * n * (length + t), tp) + gathered)
    rollout = kv(b * length) + max(doc_transient + gathered, decode)
    br_tokens, br_pairs = b * n * s, b * n * s * (length + s)
    vocab_slots = min(THOUGHT_CHUNK, t) + rlp.reward.horizon   # one chunk of thought slots + the targets
    loss = (y * (tok * (doc_tokens + br_tokens) + pair * (doc_pairs + br_pairs)) + kv(b * length)
            + 4 * 4 * b * n * vocab_slots * v / tp + max(doc_transient, _transient(m, br_tokens, br_pairs, tp)) + gathered)
    if rlp.loss.ntp_weight > 0:
        loss += 3 * 4 * b * length * v / tp
    if rlp.loss.kl_beta > 0:   # the reference forward runs while the policy's residuals are kept
        loss += kv(b * length) + 3 * 4 * b * n * vocab_slots * v / tp
    return {"teacher": teacher, "rollout": rollout, "loss": loss}


# ----------------------------------------------------------------------------------------------
# FLOPs (see the module docstring)
# ----------------------------------------------------------------------------------------------

def matmul_weights(m: ModelConfig) -> int:
    """Weights of the matmuls one token passes through in a transformer layer stack (no norms, biases, head)."""
    d, f, h, hk, dh = m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads, m.head_dim
    return m.num_layers * (2 * d * h * dh + 2 * d * hk * dh + 3 * d * f)


def forward_flops(m: ModelConfig, tokens: float, pairs: float, head_tokens: float) -> float:
    """2 x matmul weights per token + 4 Y H Dh per attended pair + 2 D V per token with logits."""
    return (2 * matmul_weights(m) * tokens + 4 * m.num_layers * m.num_heads * m.head_dim * pairs
            + 2 * m.hidden_size * m.vocab_size * head_tokens)


def mean_position(rlp: RLPConfig, seq_len: int) -> float:
    """Expected thinking position t: the middle of the valid range [min_context, L - H] of one-document rows."""
    return (rlp.rollout.min_context + seq_len - rlp.reward.horizon) / 2


def ntp_step_flops(m: ModelConfig, batch: int, seq_len: int) -> float:
    """Next-token step: forward + backward (3 x forward) over batch x seq_len tokens, causal."""
    return 3 * forward_flops(m, batch * seq_len, batch * seq_len * (seq_len + 1) / 2, batch * seq_len)


def rlp_step_flops(m: ModelConfig, rlp: RLPConfig, batch: int, seq_len: int) -> dict[str, float]:
    """Model FLOPs of one RLP step by part (all documents of the global batch).

    rollout: the prefix forward (no logits) + sampling T tokens for each of the K*G branches per row.
    reward: the EMA teacher's no-think forward over the documents. (S_pred comes out of the loss
      forward, which also gives the thought log-probs; it is counted once, under update.)
    update: the loss forward (documents + K*G branches of S = T + 1 + H tokens) and its backward (x3).
    reference: forward of the frozen reference for the KL term (0 when kl_beta = 0).
    """
    ro = rlp.rollout
    b, length = batch, seq_len
    n, t = b * ro.positions_per_doc * ro.group_size, ro.thought_len
    s = t + 1 + rlp.reward.horizon
    tbar = mean_position(rlp, seq_len)
    causal = b * length * (length + 1) / 2
    branch_pairs = lambda steps: n * (steps * tbar + steps * (steps + 1) / 2)   # noqa: E731
    doc_head = b * length if rlp.loss.ntp_weight > 0 else 0
    loss_fwd = forward_flops(m, b * length, causal, doc_head) + forward_flops(m, n * s, branch_pairs(s), n * s)
    ref = 0.0
    if rlp.loss.kl_beta > 0:
        ref = forward_flops(m, b * length, causal, 0) + forward_flops(m, n * s, branch_pairs(s), n * s)
    return {
        "rollout": forward_flops(m, b * length, causal, 0) + forward_flops(m, n * t, branch_pairs(t), n * t),
        "reward": forward_flops(m, b * length, causal, b * length),
        "update": 3 * loss_fwd,
        "reference": ref,
    }


def effective_tokens(rlp: RLPConfig, batch: int, seq_len: int) -> float:
    """The paper's per-step token budget n_rollouts * l_seq * batch + input tokens, with n_rollouts = K*G per
    row and l_seq = L + T_think (this reading reproduces its "170M RLP tokens ~ 6B CPT tokens")."""
    ro = rlp.rollout
    return ro.positions_per_doc * ro.group_size * (seq_len + ro.thought_len) * batch + batch * seq_len


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything the planner prints. Bytes are per device; FLOPs and tokens per step (global).

    state: params / optimizer / ema / reference / gradients. activations: peak of each phase under the
    configured remat; loss_by_remat: the loss phase under none / full / dots. total: state + the largest
    phase (gradients count with the loss phase). rlp_flops: rollout / reward / update / reference.
    """

    model: ModelConfig
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


def plan(cfg: RunConfig, devices: DeviceSpec, mesh: dict[str, int]) -> Plan:
    """Memory per device, FLOPs and tokens per step of `cfg` on `devices` with mesh sizes `mesh`."""
    if math.prod(mesh.values()) != devices.chips:
        raise ConfigError(f"mesh {mesh} has {math.prod(mesh.values())} devices but {devices.chips} are planned")
    m = model_config(cfg)
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
    copy = 0.0 if m.param_dtype == "float32" else state["ema"] * _dtype_bytes(m.param_dtype) / 4
    mb_rows = -(-rows // micro)
    act = lambda mc, r=mb_rows: activation_bytes(mc, rlp, rows=r, seq_len=length, tp=tp,  # noqa: E731
                                                 objective=objective, param_copy=copy)
    phases = act(m)
    loss_by_remat = {r: act(m.replace(remat=r))["loss"] for r in REMATS}
    total = _total(state, phases)

    ro = rlp.rollout
    decode_floor = None
    if objective == "rlp" and devices.bandwidth:
        c = _dtype_bytes(m.compute_dtype)
        n = mb_rows * ro.positions_per_doc * ro.group_size
        kv = 2 * m.num_layers * (mb_rows * length + n * ro.thought_len) * m.num_kv_heads * m.head_dim * c / tp
        decode_floor = micro * ro.thought_len * (m.num_params() * c / tp + kv) / devices.bandwidth

    if total > devices.hbm_bytes:
        big = max(phases, key=phases.get)
        hints.append(f"largest activation phase: {big} ({phases[big] / GIB:.1f} GiB per device)")
        if state["params"] + state["optimizer"] + state["ema"] > 0.5 * devices.hbm_bytes:
            hints.append("state dominates: raise the fsdp axis (--mesh fsdp=...) or use more chips")
        if m.remat != "full" and loss_by_remat["full"] < phases["loss"]:
            hints.append(f"--set model.remat=full (loss phase {loss_by_remat['full'] / GIB:.1f} GiB) or dots "
                         f"({loss_by_remat['dots'] / GIB:.1f} GiB)")
        if objective == "rlp":
            hints.append("fewer branches per device: lower rlp.rollout.positions_per_doc / group_size / thought_len "
                         "(the branch residuals and attention scores grow with all three)")
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
                loss_by_remat=loss_by_remat, total=total, rlp_flops=rlp_step_flops(m, rlp, batch, length),
                ntp_flops=ntp_step_flops(m, batch, length), input_tokens=float(batch * length),
                effective_tokens=effective_tokens(rlp, batch, length), decode_floor_s=decode_floor,
                warnings=tuple(warnings), hints=tuple(hints))


# ----------------------------------------------------------------------------------------------
# Printing and the command line
# ----------------------------------------------------------------------------------------------

def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_plan(p: Plan, *, name: str = "", mfu: float = 0.4) -> str:
    m, d = p.model, p.devices
    lines = []
    peak = "no spec peak" if d.peak_flops is None else f"{d.peak_flops / 1e12:.0f} TFLOP/s bf16"
    lines.append(f"plan {name}: {_si(p.num_params)} params ({p.num_params:,}), {d.chips} x {d.name} "
                 f"({d.hbm_bytes / GIB:.0f} GiB, {peak} each)")
    lines.append(f"mesh data={p.mesh['data']} fsdp={p.mesh['fsdp']} tensor={p.mesh['tensor']}; objective "
                 f"{p.objective}; batch {p.batch} rows x {p.seq_len} tokens, {p.rows_per_device} per device"
                 + (f" in {p.micro_batches} micro-batches" if p.micro_batches > 1 else ""))
    lines.append(f"model: params {m.param_dtype}, compute {m.compute_dtype}, remat {m.remat}")
    row = lambda label, b: f"  {label:<44s}{b / GIB:>10.3f}"   # noqa: E731
    lines += ["", f"  {'memory per device':<44s}{'GiB':>10s}"]
    lines.append(row(f"params ({m.param_dtype})", p.state["params"]))
    lines.append(row("optimizer (AdamW mu, nu; param dtype)", p.state["optimizer"]))
    lines.append(row("EMA teacher (float32)", p.state["ema"]))
    if p.state["reference"]:
        lines.append(row("KL reference params", p.state["reference"]))
    lines.append(row("gradients", p.state["gradients"]))
    labels = {"teacher": "activations: EMA teacher forward", "rollout": "activations: rollout (KV caches)",
              "loss": f"activations: loss fwd+bwd (remat {m.remat})"}
    for k, v in p.activations.items():
        lines.append(row(labels[k], v))
    for r, v in p.loss_by_remat.items():
        if r != m.remat:
            lines.append(row(f"  (loss fwd+bwd with remat {r})", v))
    lines.append(row("TOTAL (state + largest phase)", p.total))
    lines.append(row("HBM per device", d.hbm_bytes))
    lines += ["", f"  {'FLOPs per step (global)':<44s}{'FLOP':>10s}{'share':>8s}"]
    if p.objective == "rlp":
        total = p.step_flops
        names = {"rollout": "rollout (prefix fwd + sampling)", "reward": "reward (EMA no-think fwd)",
                 "update": "update (loss fwd [S_pred] + bwd)", "reference": "KL reference fwd"}
        for k, v in p.rlp_flops.items():
            if v or k != "reference":
                lines.append(f"  {names[k]:<44s}{_si(v):>10s}{100 * v / total:>7.1f}%")
        lines.append(f"  {'RLP step':<44s}{_si(total):>10s}")
    lines.append(f"  {'NTP step, same batch':<44s}{_si(p.ntp_flops):>10s}")
    ntp_per_token = p.ntp_flops / p.input_tokens
    lines.append("")
    if p.objective == "rlp":
        lines.append(f"tokens per step: input {_si(p.input_tokens)}; paper's effective (K*G*(L+T)*B + B*L) "
                     f"{_si(p.effective_tokens)}; NTP tokens of equal FLOPs {_si(p.step_flops / ntp_per_token)}")
    else:
        lines.append(f"tokens per step: {_si(p.input_tokens)}")
    t = p.step_time(mfu)
    if t is None:
        lines.append("step time: no spec peak for this device; measure with benchmarks/train_bench.py")
    else:
        extra = ""
        if p.decode_floor_s is not None:
            extra = f" (sampling no faster than its memory-bound floor {p.decode_floor_s:.2f} s)"
        lines.append(f"step time at {100 * mfu:.0f}% MFU: {t:.2f} s{extra}")
        if m.compute_dtype == "float32":
            lines.append("note: compute_dtype=float32 runs below the bf16 peak used here")
    for w in p.warnings:
        lines.append(f"WARNING: {w}")
    if not p.fits:
        lines.append(f"WARNING: does not fit: {p.total / GIB:.1f} GiB per device > {d.hbm_bytes / GIB:.0f} GiB HBM")
        lines += [f"hint: {h}" for h in p.hints]
    elif p.total > 0.85 * d.hbm_bytes:
        lines.append("note: above 85% of HBM; the runtime and XLA's buffers need some headroom")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    p = _Parser(prog="python -m rlp_jax.plan", description="Memory and FLOPs of an RLP run on given devices.",
                epilog="Devices: v4-N / v5p-N (N TensorCores, 2 per chip), v5litepod-N / v6e-N (N chips), "
                       "h100xN, h200xN, a100-40gbxN, a100-80gbxN, cpu.")
    p.add_argument("--experiment", required=True, help="recipe name in experiments/ or a path to a .py recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--devices", required=True, help="e.g. v5p-64, v5litepod-16, h100x8, cpu")
    p.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (default: train.mesh if it fits, "
                                                "else all chips on fsdp)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation for the step time (default 0.4)")
    args = p.parse_args(argv)
    try:
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
        cfg = apply_overrides(recipe_config(load_experiment(args.experiment)), args.set)
        devices = device_spec(args.devices)
        mesh = default_mesh(cfg, devices.chips) if args.mesh is None else parse_mesh(args.mesh, devices.chips)
        result = plan(cfg, devices, mesh)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result, name=Path(args.experiment).stem, mfu=args.mfu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
