"""Per-device activations and per-step FLOPs of a Nemotron-H run (`rlp_jax.model.nemotron_h.hybrid`, `branch`).

The accounting follows the dense family's (`rlp_jax.plan.costs`, the package docstring): the same phases, state
(`costs.state_bytes`: the hybrid's `TrainState` sharded by `hybrid.param_logical_axes`), vocabulary chunks and
conventions, with each block's terms replaced. What differs:

  * Dtypes as `hybrid` runs them: the residual stream, attention, the MLP, the projections and the attention
    keys/values in model.compute_dtype (c bytes); the Mamba conv, scan, gated norm and states, attention scores
    and logits in float32.
  * Attention reads each key set (the documents' L keys; a branch's own S = T + 1 + H keys in the loss, its T
    cache slots while sampling) as `hybrid` and `branch` run it, like the dense family
    (`costs.attended`, `costs.blockwise_extra`): densely and masked where `blockwise_for` the set's length is
    false, every (query, key) pair held and kept; else blockwise, one chunk of `attention_block` queries by one
    key block per row held, no pair kept, plus the online softmax's and its custom backward's working arrays.
    FLOPs do not depend on it (the blockwise passes compute the same products).
  * Weights gathered for compute: the whole model in the compute dtype, in every phase, not the dense family's
    two layers and head (`_gathered`: XLA:TPU hoists each block's gather out of the micro-batch loop).
  * A branch at position t starts from each Mamba block's state after x_<t: num_heads x head_dim x state_size
    floats + (conv_kernel-1) x conv_dim conv inputs per block (`mamba2.Mamba2State`), instead of keys/values.
    Only the attention blocks keep keys/values (of the documents, and of the thought tokens while sampling).
  * FLOPs of a Mamba-2 block (chunk length C): the in_proj/out_proj matmuls and the depthwise conv (2 x weights
    per token), then the chunked scan as `mamba2.ssd_scan` runs it: per chunk the full C x C scores C.B (per
    group) and their product with x (per head), the last chunk padded; 2 x H P N per token for the state each
    chunk adds and 2 x H P N for the start state it reads; 2 C H P N per state read at a branch position. A
    sampled token (`mamba2.mamba2_step`): 4 H P N for the state update and read-out.
  * Activations a block keeps for the backward, per token (remat "none"; bytes = c x the compute-dtype values
    + 4 x the float32 ones), as the target's compiler keeps them (`tiling`: `TPU_TILING` for TPU targets):
      Mamba-2   XLA:CPU (also used for GPUs, not measured there): c (3 D + I) + 4 (9 I + (K + 5) X + 2.5 H C +
                0.5 H N + 2.5 I N / C): the norm, in_proj's outputs (gate, x B C, dt), the K conv taps and the
                conv's activations, x dt, the per-chunk C x C decay and mixing arrays, the chunk-start states,
                the gated norm and out_proj's input. Read from JAX's saved residuals and fitted to XLA's buffer
                assignment in float32 (11 shapes, each block within 3% on CPU; tests/test_plan.py checks whole
                passes).
                XLA:TPU fuses the elementwise steps into their consumers and keeps less: c 2 D + 4 (D + 3 I + 6 X
                + (H + 3 G) C + I N / C), each array's two minor dimensions padded to the tile: 2 residual-wide
                arrays in the compute dtype and one in float32, 3 inner-wide (gate, x dt, the gated output), 6 conv-
                wide (in_proj's x B C, its slice, the conv's output and activation, ...), per chunk the decay's
                cumulative sums (per head) and the C.B scores with 2 masked copies (per group), the chunk-start
                states. Fitted to XLA:TPU's HBM temporaries of jax.grad of `hybrid.forward` compiled for one v5p
                chip, one Mamba block more at a time (10 shapes varying D, H, P, G, N and C, float32 and bfloat16:
                each within 5%; XLA:CPU's set is 1.6-2.0x XLA:TPU's there). One block's working set while it is
                differentiated (`_block_transient`) is counted with XLA:CPU's set on every target: the 12B under
                remat full agrees with XLA:TPU that way (README, "Scale-out").
      attention c (2 D + 2 Q W + 2 E W) per token + Q (4 + c) per (query, key) pair of a key set read densely
                (float32 probabilities and their cast: the masked scores; XLA:TPU keeps no float32 copy of
                float32 probabilities: Q 4 when c = 4); none of a set read blockwise.
      MLP       c (2 D + 2 F) (the relu input and its square; XLA:TPU's one block more is 0.3-0.9 of it, too
                noisy at these sizes to fit).
    with I = H P the Mamba inner width, X = I + 2 G N its conv channels, K the conv kernel, N the state size;
    Q/E/W the attention heads/key-value heads/head width; F the MLP width. "full" keeps the block input (D),
    "dots" the block input and the weight matmuls' outputs, as `Numerics.checkpointed` does per block. The
    tensor axis divides attention heads, MLP and vocabulary widths, not the Mamba blocks: their weights are not
    split on it (`hybrid.param_logical_axes`), so each tensor rank holds a Mamba block's arrays and states whole.

Shapes: B rows per device, L tokens, K positions per row, G thoughts per position, T thought tokens, H horizon.
"""

from __future__ import annotations

import math

import jax

from rlp_jax.model.nemotron_h import hybrid
from rlp_jax.model.nemotron_h.hybrid import ATTENTION, MAMBA, MLP, HybridConfig
from rlp_jax.model.scoring import TOKEN_CHUNK
from rlp_jax.plan.costs import (DENSE, TPU_TILING, Tiling, attended, blockwise_extra, dtype_bytes, mean_position,
                                weight_traffic)
from rlp_jax.rlp.config import RLPConfig
from rlp_jax.rlp.rollout import THOUGHT_CHUNK

F32 = 4


CACHES = "Mamba states + KV caches"   # what the rollout phase caches (the planner's label)


def describe(h: HybridConfig) -> str:
    """The planner's line about the model."""
    n = block_counts(h)
    return (f"model: Nemotron-H, {n[MAMBA]} Mamba-2 + {n[ATTENTION]} attention + {n[MLP]} MLP blocks; params "
            f"{h.param_dtype}, compute {h.compute_dtype}, remat {h.remat}")


def block_counts(h: HybridConfig) -> dict[str, int]:
    return {kind: h.block_types.count(kind) for kind in (MAMBA, ATTENTION, MLP)}


def _padded(h: HybridConfig, length: int) -> int:
    """Tokens of one sequence as the chunked scan runs it: rounded up to whole chunks."""
    c = h.mamba.chunk_size
    return -(-length // c) * c


# ----------------------------------------------------------------------------------------------
# FLOPs (see the module docstring)
# ----------------------------------------------------------------------------------------------

def matmul_weights(h: HybridConfig) -> int:
    """Weights one token multiplies with in the block stack (no norms, biases, head): Mamba in_proj, conv,
    out_proj; attention q, k, v, o; MLP up, down."""
    m, d, n = h.mamba, h.hidden_size, block_counts(h)
    mamba = d * (m.inner + m.conv_dim + m.num_heads) + m.conv_kernel * m.conv_dim + m.inner * d
    attention = 2 * d * h.num_heads * h.head_dim + 2 * d * h.num_kv_heads * h.head_dim
    return n[MAMBA] * mamba + n[ATTENTION] * attention + n[MLP] * 2 * d * h.intermediate_size


def scan_flops(h: HybridConfig, seqs: float, length: int) -> float:
    """One Mamba block's chunked scan over `seqs` sequences of `length` tokens: per (padded) token 2 C G N for the
    chunk's scores, 2 C I for mixing x, 2 I N each for the state a chunk adds and the start state it reads."""
    m = h.mamba
    per_token = 2 * m.chunk_size * (m.n_groups * m.state_size + m.inner) + 4 * m.inner * m.state_size
    return seqs * _padded(h, length) * per_token


def forward_flops(h: HybridConfig, *, seqs: float, length: int, pairs: float, head_tokens: float,
                  states: float = 0.0) -> float:
    """A teacher-forced pass over `seqs` sequences of `length` tokens: 2 x matmul weights per token, the chunked
    scans, 4 Q W per attended (query, key) pair in each attention block, 2 D V per token with logits, and
    2 C I N per Mamba block for each of `states` states read at branch positions (`mamba2._ssm_states_at`)."""
    m, n = h.mamba, block_counts(h)
    return (2 * matmul_weights(h) * seqs * length + n[MAMBA] * scan_flops(h, seqs, length)
            + n[MAMBA] * states * 2 * m.chunk_size * m.inner * m.state_size
            + 4 * n[ATTENTION] * h.num_heads * h.head_dim * pairs + 2 * h.hidden_size * h.vocab_size * head_tokens)


def decode_flops(h: HybridConfig, *, tokens: float, pairs: float) -> float:
    """`tokens` sampled one at a time (`branch.decode_step`): per token 2 x matmul weights, 4 I N per Mamba
    block (state update and read-out) and 2 D V for the next token's logits; 4 Q W per attended pair."""
    m, n = h.mamba, block_counts(h)
    per_token = 2 * matmul_weights(h) + 4 * n[MAMBA] * m.inner * m.state_size + 2 * h.hidden_size * h.vocab_size
    return per_token * tokens + 4 * n[ATTENTION] * h.num_heads * h.head_dim * pairs


def rlp_step_flops(h: HybridConfig, rlp: RLPConfig, batch: int, seq_len: int) -> dict[str, float]:
    """Model FLOPs of one RLP step by part, split as `costs.rlp_step_flops` (all rows of the batch): rollout (the
    prefix pass with the states at K positions per row + sampling T tokens for each of the K G branches), reward
    (the EMA teacher's pass with logits), update (3 x the loss forward: documents + branches of S = T + 1 + H
    tokens from their start states), reference (kl_beta > 0). Attention pairs are causal pairs (MFU convention)."""
    ro = rlp.rollout
    b, length, t = batch, seq_len, ro.thought_len
    positions, branches = b * ro.positions_per_row, b * ro.positions_per_row * ro.group_size
    s = t + 1 + rlp.reward.horizon
    tbar = mean_position(rlp, seq_len)
    causal = b * length * (length + 1) / 2
    branch_pairs = lambda steps: branches * (steps * tbar + steps * (steps + 1) / 2)   # noqa: E731
    docs = lambda head: forward_flops(h, seqs=b, length=length, pairs=causal, head_tokens=head,   # noqa: E731
                                      states=positions)
    thoughts = forward_flops(h, seqs=branches, length=s, pairs=branch_pairs(s), head_tokens=branches * s)
    return {
        "rollout": docs(0) + decode_flops(h, tokens=branches * t, pairs=branch_pairs(t)),
        "reward": forward_flops(h, seqs=b, length=length, pairs=causal, head_tokens=b * length),
        "update": 3 * (docs(b * length if rlp.loss.ntp_weight > 0 else 0) + thoughts),
        "reference": docs(0) + thoughts if rlp.loss.kl_beta > 0 else 0.0,
    }


def ntp_step_flops(h: HybridConfig, batch: int, seq_len: int) -> float:
    """Next-token step: 3 x the forward over batch x seq_len tokens with logits."""
    return 3 * forward_flops(h, seqs=batch, length=seq_len, pairs=batch * seq_len * (seq_len + 1) / 2,
                             head_tokens=batch * seq_len)


# ----------------------------------------------------------------------------------------------
# Caches: what a branch starts from, what sampling keeps
# ----------------------------------------------------------------------------------------------

def mamba_state_bytes(h: HybridConfig) -> float:
    """One branch's start state over all Mamba blocks: the SSM state H P N and the K-1 conv inputs X, float32
    (whole on every tensor rank)."""
    m = h.mamba
    return block_counts(h)[MAMBA] * F32 * (m.inner * m.state_size + (m.conv_kernel - 1) * m.conv_dim)


def _kv_bytes(h: HybridConfig, tokens: float, tp: int) -> float:
    """Keys and values of `tokens` tokens in every attention block, in the compute dtype."""
    return block_counts(h)[ATTENTION] * 2 * tokens * h.num_kv_heads * h.head_dim * dtype_bytes(h.compute_dtype) / tp


def prefix_cache_bytes(h: HybridConfig, *, rows: float, seq_len: int, positions: int, tp: int = 1) -> float:
    """What branches start from (`branch.HybridPrefix`): the documents' keys and values in each attention
    block, and each Mamba block's state at every (row, position)."""
    kv = _kv_bytes(h, rows * seq_len, tp)
    return kv + rows * positions * mamba_state_bytes(h)


def branch_cache_bytes(h: HybridConfig, *, branches: float, slots: int, tp: int = 1) -> float:
    """A sampling cache (`branch.BranchCache`) of `branches` branches with `slots` token slots each: a
    Mamba state per branch and block, keys and values of `slots` tokens per branch and attention block."""
    return branches * mamba_state_bytes(h) + _kv_bytes(h, branches * slots, tp)


def _weights_on_rank(h: HybridConfig, tp: int) -> list[float]:
    """Weights each block and the embedding put on one tensor rank (a Mamba block's are whole on every rank)."""
    shapes = hybrid.param_shapes(h)
    leaves = lambda tree: jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple))   # noqa: E731
    size = lambda tree: sum(math.prod(s) for s in leaves(tree))   # noqa: E731
    blocks = [size(b) / (1 if kind == MAMBA else tp) for kind, b in zip(h.block_types, shapes["blocks"])]
    return blocks + [size({k: v for k, v in shapes.items() if k != "blocks"}) / tp]


def decode_step_bytes(h: HybridConfig, *, rows: int, seq_len: int, branches: int, thought_len: int,
                      tp: int, fsdp: int = 1) -> float:
    """Bytes one sampling step reads from HBM, averaged over the thought: the weights (`costs.weight_traffic`),
    the documents' keys and values, each branch's Mamba states and its attention cache up to the last filled
    block of `decode_block` slots ((T + block) / 2 slots on average)."""
    on_rank = sum(_weights_on_rank(h, tp))
    weights = weight_traffic(on_rank * dtype_bytes(h.param_dtype), on_rank * dtype_bytes(h.compute_dtype),
                             h.sampler_weights, fsdp)
    block = min(h.decode_block, thought_len)
    return (weights + prefix_cache_bytes(h, rows=rows, seq_len=seq_len, positions=0, tp=tp)
            + branch_cache_bytes(h, branches=rows * branches, slots=(thought_len + block) / 2, tp=tp))


# ----------------------------------------------------------------------------------------------
# Activations (see the module docstring)
# ----------------------------------------------------------------------------------------------

def _chunk_arrays(h: HybridConfig, tiling: Tiling) -> float:
    """Float32 values per token of the chunk-by-chunk [.., C, C] arrays a Mamba block keeps: XLA:CPU 2.5 per head
    (the decay and mixing arrays); XLA:TPU one per head (the decay's cumulative sums) and 3 per group (the C.B
    scores and their masked copies), their minor C padded to the tile."""
    m = h.mamba
    if tiling == TPU_TILING:
        return (m.num_heads + 3 * m.n_groups) * m.chunk_size * tiling.factor(m.chunk_size, m.chunk_size, F32)
    return 2.5 * m.num_heads * m.chunk_size


def _saved_per_token(h: HybridConfig, kind: str, remat: str, tp: int, tiling: Tiling = DENSE,
                     per_row: float = 1) -> float:
    """Bytes one block of `kind` keeps per token for the backward under `remat` (chunk padding aside), in
    sequences of `per_row` tokens laid out as `tiling` (the module docstring)."""
    d, m, cb = h.hidden_size, h.mamba, dtype_bytes(h.compute_dtype)
    i, x, heads, c, n = m.inner, m.conv_dim, m.num_heads, m.chunk_size, m.state_size     # not split on tensor
    qw, ew, f = h.num_heads * h.head_dim / tp, h.num_kv_heads * h.head_dim / tp, h.intermediate_size / tp
    if remat == "full":
        return cb * d
    if remat == "dots":
        return cb * (d + {MAMBA: i + x + heads + d, ATTENTION: 2 * qw + 2 * ew, MLP: f + d}[kind])
    if kind == MAMBA and tiling == TPU_TILING:
        wide = lambda cols: cols * tiling.factor(per_row, cols, F32)   # noqa: E731   [.., per_row, cols]
        states = i * n / c * tiling.factor(m.head_dim, n, F32)
        return cb * 2 * wide(d) + F32 * (wide(d) + 3 * wide(i) + 6 * wide(x) + _chunk_arrays(h, tiling) + states)
    if kind == MAMBA:
        scan = 9 * i + (m.conv_kernel + 5) * x + _chunk_arrays(h, tiling) + 0.5 * heads * n + 2.5 * i * n / c
        return cb * (3 * d + i) + F32 * scan
    return cb * {ATTENTION: 2 * d + 2 * qw + 2 * ew, MLP: 2 * d + 2 * f}[kind]


def _states_at_bytes(h: HybridConfig) -> float:
    """What reading one (row, position)'s state keeps for the backward, over all Mamba blocks: that chunk's x dt,
    B and decay weights (`mamba2._ssm_states_at`), its start state and the state read."""
    m = h.mamba
    per_block = (m.chunk_size * (m.inner + m.n_groups * m.state_size + 2 * m.num_heads)
                 + 2 * m.inner * m.state_size + (m.conv_kernel - 1) * m.conv_dim)
    return block_counts(h)[MAMBA] * F32 * per_block


def _attention(h: HybridConfig, tp: int, *, queries: float, keys: int, rows: float, own_keys: int = 0,
               own_rows: float = 0.0) -> tuple[float, float, float]:
    """One attention block's (pairs held at once, pairs kept for the backward, blockwise working bytes) for
    `queries` over the `keys` keys of each of `rows` rows and the `own_keys` of each of `own_rows` branches: dense
    or blockwise per key set, as `costs.attended` and `costs.blockwise_extra` count the dense family's."""
    held, saved = attended(h, queries, keys, rows, own_keys, own_rows)
    extra = blockwise_extra(h, queries, keys, tp, rows)
    if own_keys:
        extra += blockwise_extra(h, queries, own_keys, tp, own_rows)
    return held, saved, extra


def _stack_bytes(h: HybridConfig, tp: int, *, seqs: float, length: int, saved_pairs: float,
                 tiling: Tiling = DENSE) -> float:
    """What the blocks keep for the backward over `seqs` sequences of `length` tokens, with `saved_pairs` (query,
    key) pairs of float32 probabilities per attention block (`_attention`)."""
    n, tokens = block_counts(h), seqs * length
    saved = sum(n[k] * _saved_per_token(h, k, h.remat, tp, tiling, length) * tokens for k in n)
    if h.remat != "none":
        return saved
    pad = seqs * (_padded(h, length) - length) * F32 * _chunk_arrays(h, tiling)
    cb = dtype_bytes(h.compute_dtype)
    per_pair = F32 + (cb if tiling != TPU_TILING or cb < F32 else 0)   # XLA:TPU: no float32 copy of float32 values
    pairs = per_pair * h.num_heads / tp * saved_pairs
    return saved + n[MAMBA] * pad + n[ATTENTION] * pairs


def _block_transient(h: HybridConfig, tokens: float, attention: tuple[float, float, float], tp: int, *,
                     forward: bool, backward: bool) -> float:
    """The working set of one block at a time (the largest kind): its forward arrays (the remat-none set: a pass
    without gradients, or a rematerialised block) and, in a backward, the cotangents of its widest arrays
    (Mamba in_proj's output and the conv input, attention's float32 scores of the pairs held, the MLP's hidden
    pair); attention read blockwise adds its working arrays. attention: `_attention` of these tokens."""
    pairs, _, blockwise = attention
    n, m = block_counts(h), h.mamba
    cb = dtype_bytes(h.compute_dtype)
    cotangents = {MAMBA: F32 * (m.inner + 2 * m.conv_dim + m.num_heads) * tokens,
                  ATTENTION: F32 * h.num_heads / tp * pairs, MLP: cb * 2 * h.intermediate_size / tp * tokens}
    arrays = {k: _saved_per_token(h, k, "none", tp) * tokens for k in n}
    arrays[ATTENTION] += (2 * F32 + cb) * h.num_heads / tp * pairs      # float32 scores and probabilities, the cast
    return max(forward * arrays[k] + backward * cotangents[k] + (blockwise if k == ATTENTION else 0.0)
               for k in n if n[k])


def _gathered(h: HybridConfig, tp: int) -> float:
    """Weights gathered and cast for compute, in the compute dtype: all of them. The blocks are a Python loop,
    so each block's gather is its own op, the same in every micro-batch: XLA:TPU hoists them out of the
    micro-batch loop and holds every block's gathered matrices for the whole step (the full 12B's peak, from its
    live ranges: 28 bf16[5120,22656] Mamba in_proj, 28 of each MLP matrix, the attention projections and the
    head; the dense family's layer scan gathers one layer at a time instead)."""
    return dtype_bytes(h.compute_dtype) * sum(_weights_on_rank(h, tp))


def loss_pass_bytes(h: HybridConfig, *, rows: int, seq_len: int, positions: int, branches: int, branch_len: int,
                    tp: int = 1, tiling: Tiling = DENSE) -> float:
    """Bytes per device of the differentiable pass the loss runs, without its vocabulary head: the documents
    (`branch.prefix_forward` with the states at `positions` per row) and `branches` per row of `branch_len`
    tokens from those states (`branch_forward`): what the backward reads, plus one block's working set. Branch
    start states: under remat none the reads at positions and a copy per branch are kept; under a per-block
    remat only what the prefix blocks hand to the branches (`prefix_cache_bytes`). `tiling`: the target's
    (`activation_bytes`)."""
    doc_attention = _attention(h, tp, queries=rows * seq_len, keys=seq_len, rows=rows)
    branch_attention = _attention(h, tp, queries=rows * branches * branch_len, keys=seq_len, rows=rows,
                                  own_keys=branch_len, own_rows=rows * branches)
    docs = _stack_bytes(h, tp, seqs=rows, length=seq_len, saved_pairs=doc_attention[1], tiling=tiling)
    thoughts = _stack_bytes(h, tp, seqs=rows * branches, length=branch_len, saved_pairs=branch_attention[1],
                            tiling=tiling)
    if h.remat == "none":
        starts = rows * (positions * _states_at_bytes(h) + branches * 2 * mamba_state_bytes(h))
    else:
        starts = prefix_cache_bytes(h, rows=rows, seq_len=seq_len, positions=positions, tp=tp)
    recompute = h.remat != "none"
    transient = max(_block_transient(h, rows * seq_len, doc_attention, tp, forward=recompute, backward=True),
                    _block_transient(h, rows * branches * branch_len, branch_attention, tp, forward=recompute,
                                     backward=True) if branches else 0.0)
    return docs + thoughts + starts + transient


def activation_bytes(h: HybridConfig, rlp: RLPConfig, *, rows: int, seq_len: int, tp: int, objective: str = "rlp",
                     param_copy: float = 0.0, tiling: Tiling = DENSE) -> dict[str, float]:
    """Peak activation bytes per device of each phase of a step on `rows` documents of `seq_len` tokens:
    {"teacher", "rollout", "loss"} ({"loss"} for "ntp"), laid out as `costs.activation_bytes`. `tiling`: the
    target's layout; `TPU_TILING` also selects what XLA:TPU keeps across blocks under remat none (the module
    docstring). Only the saved Mamba arrays and the chunk padding are tiled; the rest is counted dense."""
    v, b, length = h.vocab_size, rows, seq_len
    gathered = _gathered(h, tp)
    doc_attention = _attention(h, tp, queries=b * length, keys=length, rows=b)
    doc_fwd = _block_transient(h, b * length, doc_attention, tp, forward=True, backward=False)
    if objective == "ntp":
        loss = loss_pass_bytes(h, rows=b, seq_len=length, positions=0, branches=0, branch_len=0, tp=tp,
                               tiling=tiling)
        return {"loss": loss + 3 * F32 * b * length * v / tp + gathered}
    ro = rlp.rollout
    k, n, t = ro.positions_per_row, ro.positions_per_row * ro.group_size, ro.thought_len
    s = t + 1 + rlp.reward.horizon
    prefix = prefix_cache_bytes(h, rows=b, seq_len=length, positions=k, tp=tp)
    teacher = param_copy + 2 * F32 * b * min(length, TOKEN_CHUNK) * v / tp + doc_fwd + gathered
    sampled = _attention(h, tp, queries=b * n, keys=length, rows=b, own_keys=t, own_rows=b * n)   # one token each
    step = _block_transient(h, b * n, sampled, tp, forward=True, backward=False)
    decode = branch_cache_bytes(h, branches=b * n, slots=t, tp=tp) + 4 * F32 * b * n * v / tp + step + gathered
    rollout = prefix + max(doc_fwd + gathered, decode)
    vocab_slots = min(THOUGHT_CHUNK, t) + rlp.reward.horizon     # one chunk of thought slots + the targets
    loss = (loss_pass_bytes(h, rows=b, seq_len=length, positions=k, branches=n, branch_len=s, tp=tp, tiling=tiling)
            + 4 * F32 * b * n * vocab_slots * v / tp + gathered)
    if rlp.loss.ntp_weight > 0:
        loss += 3 * F32 * b * length * v / tp
    if rlp.loss.kl_beta > 0:   # the reference's prefix and branch logits while the policy's residuals are kept
        loss += prefix + 3 * F32 * b * n * vocab_slots * v / tp
    return {"teacher": teacher, "rollout": rollout, "loss": loss}
