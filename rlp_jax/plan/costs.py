"""Per-device memory and per-step FLOPs of a run's pieces (the accounting the package docstring describes)."""

from __future__ import annotations

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

def _per_layer(m: ModelConfig, remat: str, tp: int) -> tuple[float, float]:
    """(bytes per token, bytes per dense attention pair) one layer keeps for the backward under `remat`."""
    c, d, f, h, hk, dh = (dtype_bytes(m.compute_dtype), m.hidden_size, m.intermediate_size, m.num_heads,
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
    return tok * tokens + pairs * m.num_heads * (8 + dtype_bytes(m.compute_dtype)) / tp


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
    float32 output, max and sum per query; in the backward, dq per query, a block's dp and ds per row, and
    the key-blocked copies of k, v and their float32 gradients (dk, dv) for each of `rows` rows."""
    if not m.blockwise_for(int(keys)):
        return 0.0
    h, hk, dh, c, blk = m.num_heads, m.num_kv_heads, m.head_dim, dtype_bytes(m.compute_dtype), m.attention_block
    return (4 * h * (queries * (2 * dh + 2) + rows * 2 * blk * blk) + rows * keys * 2 * hk * dh * (4 + c)) / tp


def _gathered(m: ModelConfig, tp: int) -> float:
    """Weights gathered for compute: two layers (the current and the prefetched) and the output head."""
    c = dtype_bytes(m.compute_dtype)
    emb = m.vocab_size * m.hidden_size
    layer = (m.num_params() - emb * (1 if m.tie_word_embeddings else 2) - m.hidden_size) / m.num_layers
    return c * (2 * layer + emb) / tp


def activation_bytes(m: ModelConfig, rlp: RLPConfig, *, rows: int, seq_len: int, tp: int,
                     objective: str = "rlp", param_copy: float = 0.0) -> dict[str, float]:
    """Peak activation bytes per device of each phase of a step on `rows` local documents of `seq_len`.

    Returns {"teacher", "rollout", "loss"} for objective "rlp" ({"loss"} for "ntp"). param_copy: bytes
    of the param-dtype copy of the EMA the teacher pass makes (0 when params are float32).
    """
    c, y, hk, dh, v = dtype_bytes(m.compute_dtype), m.num_layers, m.num_kv_heads, m.head_dim, m.vocab_size
    b, length = rows, seq_len
    tok, pair = _per_layer(m, m.remat, tp)
    gathered = _gathered(m, tp)
    doc_tokens = b * length
    doc_held, doc_pairs = attended(m, doc_tokens, length, b)
    doc_transient = _transient(m, doc_tokens, doc_held, tp) + blockwise_extra(m, doc_tokens, length, tp, b)
    if objective == "ntp":
        saved = y * (tok * doc_tokens + pair * doc_pairs)
        return {"loss": saved + 3 * 4 * b * length * v / tp + doc_transient + gathered}
    ro = rlp.rollout
    n, t = ro.positions_per_doc * ro.group_size, ro.thought_len
    s = t + 1 + rlp.reward.horizon
    kv = lambda slots: 2 * y * slots * hk * dh * c / tp                              # noqa: E731
    teacher = param_copy + 2 * 4 * b * min(length, TOKEN_CHUNK) * v / tp + doc_transient + gathered
    decode = (kv(b * n * t) + 4 * 4 * b * n * v / tp + _transient(m, b * n, attended(m, b * n, length, b, t, b * n)[0], tp)
              + blockwise_extra(m, b * n, length, tp, b) + blockwise_extra(m, b * n, t, tp, b * n) + gathered)
    rollout = kv(b * length) + max(doc_transient + gathered, decode)
    br_tokens = b * n * s
    br_held, br_pairs = attended(m, br_tokens, length, b, s, b * n)
    br_transient = (_transient(m, br_tokens, br_held, tp) + blockwise_extra(m, br_tokens, length, tp, b)
                    + blockwise_extra(m, br_tokens, s, tp, b * n))
    vocab_slots = min(THOUGHT_CHUNK, t) + rlp.reward.horizon   # one chunk of thought slots + the targets
    loss = (y * (tok * (doc_tokens + br_tokens) + pair * (doc_pairs + br_pairs)) + kv(b * length)
            + 4 * 4 * b * n * vocab_slots * v / tp + max(doc_transient, br_transient) + gathered)
    if rlp.loss.ntp_weight > 0:
        loss += 3 * 4 * b * length * v / tp
    if rlp.loss.kl_beta > 0:   # the reference forward runs while the policy's residuals are kept
        loss += kv(b * length) + 3 * 4 * b * n * vocab_slots * v / tp
    return {"teacher": teacher, "rollout": rollout, "loss": loss}


# ----------------------------------------------------------------------------------------------
# FLOPs (see the module docstring)
# ----------------------------------------------------------------------------------------------

CACHES = "KV caches"   # what the rollout phase caches (the planner's label)


def describe(m: ModelConfig) -> str:
    """The planner's line about the model."""
    return f"model: params {m.param_dtype}, compute {m.compute_dtype}, remat {m.remat}"


def decode_step_bytes(m: ModelConfig, *, rows: int, seq_len: int, branches: int, thought_len: int,
                      tp: int) -> float:
    """Bytes one sampling step reads from (and writes to) HBM, averaged over the thought: every weight in the
    compute dtype, the documents' keys/values, each of the rows x branches caches up to its last filled block of
    `decode_block` slots ((T + block) / 2 slots on average), the new keys/values written once."""
    c = dtype_bytes(m.compute_dtype)
    n = rows * branches
    block = min(m.decode_block, thought_len)
    slots = rows * seq_len + n * (thought_len + block) / 2 + n
    return m.num_params() * c / tp + 2 * m.num_layers * slots * m.num_kv_heads * m.head_dim * c / tp


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
