"""Per-device memory and per-step FLOPs of a run's pieces (the accounting the package docstring describes)."""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AbstractMesh

from rlp_jax import sharding
from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.model.family import Config
from rlp_jax.model.scoring import TOKEN_CHUNK
from rlp_jax.rlp.config import RLPConfig
from rlp_jax.rlp.rollout import THOUGHT_CHUNK
from rlp_jax.runs.config import RunConfig
from rlp_jax.train import train_step
from rlp_jax.train.optim import make_optimizer


def dtype_bytes(name: str) -> int:
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

@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a chip lays out the two minor dimensions of an array: the minor one padded to a multiple of `lanes`,
    the second-minor to a multiple of `sublanes` rows (of a smaller power of two when it has fewer rows). TPUs
    tile (8, 128) (`TPU_TILING`), 2-byte values too: XLA:TPU lays bfloat16 activations `T(8,128)(2,1)`, not
    16 rows (the bar config's dump: 3514 bfloat16 layouts, none of 16 rows); CPUs and GPUs store arrays dense
    (`DENSE`)."""

    lanes: int = 1
    sublanes: int = 1

    def factor(self, rows: float, cols: float, nbytes: int) -> float:
        """Bytes of a [..., rows, cols] array of `nbytes`-byte values over its dense bytes (1 when dense)."""
        del nbytes   # the same tiles for 4- and 2-byte values
        r, c = max(1, math.ceil(rows)), max(1, math.ceil(cols))
        sub = min(self.sublanes, 1 << (r - 1).bit_length())
        return -(-r // sub) * sub * (-(-c // self.lanes) * self.lanes) / (r * c)


DENSE, TPU_TILING = Tiling(), Tiling(lanes=128, sublanes=8)


MLP_ARRAYS = 6   # MLP-wide arrays a layer keeps under remat none: XLA:TPU keeps 6 (the bar config's live ranges)


def _mlp_bytes(m: ModelConfig, tp: int, tiling: Tiling, per_row: float) -> float:
    """Bytes per token of a layer's MLP-wide arrays (compute dtype), [.., per_row, F / tp] as `tiling` lays them."""
    c, f = dtype_bytes(m.compute_dtype), m.intermediate_size
    return MLP_ARRAYS * c * f * tiling.factor(per_row, f / tp, c) / tp


def _pair_bytes(m: ModelConfig, tp: int, tiling: Tiling, per_row: float, keys: float, f32_copies: int) -> float:
    """Bytes per (query, key) pair of `f32_copies` float32 score arrays and one compute-dtype cast, every head."""
    c = dtype_bytes(m.compute_dtype)
    return m.num_heads * (4 * f32_copies * tiling.factor(per_row, keys, 4) + c * tiling.factor(per_row, keys, c)) / tp


def _per_layer(m: ModelConfig, remat: str, tp: int, tiling: Tiling = DENSE, per_row: float = 1,
               keys: float = 1) -> tuple[float, float]:
    """(bytes per token, bytes per dense attention pair) one layer keeps for the backward under `remat`, for a
    sequence of `per_row` tokens a row attending to `keys` keys: [.., per_row, width] activations, [.., heads,
    head_dim] per-head ones and [.., per_row, keys] probabilities, each as `tiling` lays it out."""
    c, d, f, h, hk, dh = (dtype_bytes(m.compute_dtype), m.hidden_size, m.intermediate_size, m.num_heads,
                          m.num_kv_heads, m.head_dim)
    t = tiling.factor
    wide = lambda width, nbytes: width * t(per_row, width, nbytes)                      # noqa: E731
    # per-head arrays [.., head_dim, tokens]: XLA lays their tokens minor, so a short branch's pad to 128
    heads = lambda n, nbytes: n * dh * t(dh, per_row, nbytes)                           # noqa: E731
    if remat == "full":      # the layer input only
        return c * wide(d, c), 0.0
    if remat == "dots":      # weight-matmul outputs (q, k, v, o, gate, up, down) and the layer input
        return c * (3 * wide(d, c) + (heads(h, c) + 2 * heads(hk, c) + 2 * wide(f / tp, c) * tp) / tp), 0.0
    # none: norm inputs/outputs, q/k/v before and after qk-norm/rotary, attention output, the MLP-wide arrays
    # (compute dtype), two float32 residual-wide arrays; per pair the float32 probabilities + their cast.
    qk32 = 4 * (heads(h, 4) + heads(hk, 4)) / tp if m.qk_norm else 0.0
    per_token = c * (4 * wide(d, c) + 3 * (heads(h, c) + heads(hk, c)) / tp) + _mlp_bytes(m, tp, tiling, per_row)
    return per_token + 2 * wide(d, 4) + qk32, _pair_bytes(m, tp, tiling, per_row, keys, f32_copies=1)


def _transient(m: ModelConfig, tokens: float, pairs: float, tp: int, tiling: Tiling = DENSE, per_row: float = 1,
               keys: float = 1) -> float:
    """One layer's forward working set (recomputed or not): activations + float32 scores, probabilities."""
    tok, _ = _per_layer(m, "none", tp, tiling, per_row, keys)
    scores = pairs * _pair_bytes(m, tp, tiling, per_row, keys, f32_copies=2)
    # attention (without the MLP-wide arrays) and the MLP (without the scores) are not live at once
    return max((tok - _mlp_bytes(m, tp, tiling, per_row)) * tokens + scores, tok * tokens)


def attended(m: Config, queries: float, keys: float, rows: float, own_keys: float = 0.0,
              own_rows: float = 0.0) -> tuple[float, float]:
    """(pairs held at once, pairs kept for the backward) of `queries` (spread over `rows` rows) over `keys`
    keys, plus `own_keys` keys of each of `own_rows` rows (a branch's own). A key set read blockwise
    (`Numerics.attention`) holds one chunk of `attention_block` queries (or all, if fewer) by one block
    of keys per row at a time and keeps no probabilities: its backward recomputes them from per-query statistics."""
    held = saved = 0.0
    for n_keys, n_rows in ((keys, rows), (own_keys, own_rows)):
        if n_keys and m.blockwise_for(int(n_keys)):
            held += n_rows * min(queries / n_rows, m.attention_block) * m.attention_block   # a chunk of queries
        else:
            held, saved = held + queries * n_keys, saved + queries * n_keys
    return held, saved


def blockwise_extra(m: Config, queries: float, keys: float, tp: int, rows: float = 1.0) -> float:
    """Per layer, blockwise attention's working arrays beyond the scores of one block (zero when dense): the
    float32 output, max and sum per query; in the backward, dq per query and the key-blocked copies of k, v
    and their float32 gradients (dk, dv) for each of `rows` rows. A block's dp and ds in the backward take the
    place of its forward scores and probabilities (`attended`'s held pairs), not more."""
    if not m.blockwise_for(int(keys)):
        return 0.0
    h, hk, dh, c = m.num_heads, m.num_kv_heads, m.head_dim, dtype_bytes(m.compute_dtype)
    return (4 * h * queries * (2 * dh + 2) + rows * keys * 2 * hk * dh * (4 + c)) / tp


def _gathered(m: ModelConfig, tp: int) -> float:
    """Weights gathered for compute: two layers (the current and the prefetched) and the output head."""
    c = dtype_bytes(m.compute_dtype)
    emb = m.vocab_size * m.hidden_size
    layer = (m.num_params() - emb * (1 if m.tie_word_embeddings else 2) - m.hidden_size) / m.num_layers
    return c * (2 * layer + emb) / tp


def weight_traffic(param_bytes: float, compute_bytes: float, sampler_weights: str, fsdp: int) -> float:
    """HBM bytes one sampling step moves to read the weights, per device: `compute_bytes` (the matmul weights of
    one tensor rank, in the compute dtype) once when they were gathered before the loop
    (`Numerics.sampler_weights`="gathered"); as stored, `param_bytes` per rank, when they are not sharded over
    fsdp; else each step reads its fsdp shard and writes and reads the gathered copy."""
    if sampler_weights == "gathered":
        return compute_bytes
    return param_bytes if fsdp == 1 else param_bytes / fsdp + 2 * compute_bytes


def activation_bytes(m: ModelConfig, rlp: RLPConfig, *, rows: int, seq_len: int, tp: int,
                     objective: str = "rlp", param_copy: float = 0.0, tiling: Tiling = DENSE) -> dict[str, float]:
    """Peak activation bytes per device of each phase of a step on `rows` local documents of `seq_len`.

    Returns {"teacher", "rollout", "loss"} for objective "rlp" ({"loss"} for "ntp"). param_copy: bytes
    of the param-dtype copy of the EMA the teacher pass makes (0 when params are float32). tiling: how the
    devices lay out arrays (`TPU_TILING` pads the minor dimensions of small heads and short branches).
    """
    c, y, hk, dh, v = dtype_bytes(m.compute_dtype), m.num_layers, m.num_kv_heads, m.head_dim, m.vocab_size
    b, length = rows, seq_len
    t_ = tiling.factor
    tok, pair = _per_layer(m, m.remat, tp, tiling, length, length)
    gathered = _gathered(m, tp)
    doc_tokens = b * length
    doc_held, doc_pairs = attended(m, doc_tokens, length, b)
    doc_transient = (_transient(m, doc_tokens, doc_held, tp, tiling, length, length)
                     + blockwise_extra(m, doc_tokens, length, tp, b))
    logits = lambda slots, per_row, copies: copies * 4 * slots * v * t_(per_row, v / tp, 4) / tp   # noqa: E731
    if objective == "ntp":
        saved = y * (tok * doc_tokens + pair * doc_pairs)
        return {"loss": saved + max(logits(b * length, length, 3), doc_transient) + gathered}
    ro = rlp.rollout
    n, t = ro.positions_per_row * ro.group_size, ro.thought_len
    s = t + 1 + rlp.reward.horizon
    # caches as XLA:TPU lays them: a document's [.., head_dim, tokens] (tokens minor), a thought's
    # [.., slots, head_dim] (head_dim minor: a small head pads to 128 lanes)
    kv = lambda slots: 2 * y * slots * hk * dh * c * t_(dh, length, c) / tp              # noqa: E731
    thought_kv = lambda slots: 2 * y * slots * hk * dh * c * t_(t, dh, c) / tp           # noqa: E731
    teacher = param_copy + logits(b * min(length, TOKEN_CHUNK), min(length, TOKEN_CHUNK), 2) + doc_transient + gathered
    sampling_weights = c * m.num_params() / tp if m.sampler_weights == "gathered" else gathered
    decode = (thought_kv(b * n * t) + logits(b * n, n, 4)
              + _transient(m, b * n, attended(m, b * n, length, b, t, b * n)[0], tp, tiling, n, length + t)
              + blockwise_extra(m, b * n, length, tp, b) + blockwise_extra(m, b * n, t, tp, b * n) + sampling_weights)
    rollout = kv(b * length) + max(doc_transient + gathered, decode)
    br_tokens = b * n * s
    br_held, br_pairs = attended(m, br_tokens, length, b, s, b * n)
    br_tok, br_pair = _per_layer(m, m.remat, tp, tiling, s, length + s)
    br_transient = (_transient(m, br_tokens, br_held, tp, tiling, s, length + s)
                    + blockwise_extra(m, br_tokens, length, tp, b) + blockwise_extra(m, br_tokens, s, tp, b * n))
    vocab_slots = min(THOUGHT_CHUNK, t) + rlp.reward.horizon   # one chunk of thought slots + the targets
    # the head's logits live before the layers' backward, whose working set lives after: one or the other
    head = logits(b * n * vocab_slots, vocab_slots, 4) + (logits(b * length, length, 3) if rlp.loss.ntp_weight > 0
                                                          else 0.0)
    loss = (y * (tok * doc_tokens + pair * doc_pairs + br_tok * br_tokens + br_pair * br_pairs) + kv(b * length)
            + max(head, doc_transient, br_transient) + gathered)
    if rlp.loss.kl_beta > 0:   # the reference forward runs while the policy's residuals are kept
        loss += kv(b * length) + logits(b * n * vocab_slots, vocab_slots, 3)
    return {"teacher": teacher, "rollout": rollout, "loss": loss}


# ----------------------------------------------------------------------------------------------
# FLOPs (see the module docstring)
# ----------------------------------------------------------------------------------------------

CACHES = "KV caches"   # what the rollout phase caches (the planner's label)


def describe(m: ModelConfig) -> str:
    """The planner's line about the model."""
    return f"model: params {m.param_dtype}, compute {m.compute_dtype}, remat {m.remat}"


def decode_step_bytes(m: ModelConfig, *, rows: int, seq_len: int, branches: int, thought_len: int,
                      tp: int, fsdp: int = 1) -> float:
    """Bytes one sampling step reads from (and writes to) HBM, averaged over the thought: the weights
    (`weight_traffic`), the documents' keys/values, each of the rows x branches caches up to its last filled block
    of `decode_block` slots ((T + block) / 2 slots on average), the new keys/values written once."""
    c = dtype_bytes(m.compute_dtype)
    n = rows * branches
    block = min(m.decode_block, thought_len)
    slots = rows * seq_len + n * (thought_len + block) / 2 + n
    weights = weight_traffic(m.num_params() * dtype_bytes(m.param_dtype) / tp, m.num_params() * c / tp,
                             m.sampler_weights, fsdp)
    return weights + 2 * m.num_layers * slots * m.num_kv_heads * m.head_dim * c / tp


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
    n, t = b * ro.positions_per_row * ro.group_size, ro.thought_len
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
    return ro.positions_per_row * ro.group_size * (seq_len + ro.thought_len) * batch + batch * seq_len
