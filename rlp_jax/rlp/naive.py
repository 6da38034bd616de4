"""The naive RLP path: every thought materialised as its own sequence `x_<t <think> c </think> x_t ..`.

This is the reference the shared-prefix fast path (`rlp_jax.rlp.rollout`) must equal, and the baseline of
`benchmarks/rollout_bench.py`. It costs one full context per thought (B*K*G sequences of length
~L + S) instead of one per document. Same shapes and outputs as the fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlp_jax.model import family
from rlp_jax.model.branches import Branches
from rlp_jax.model.family import Config
from rlp_jax.model.sampling import filter_logits, sample_categorical
from rlp_jax.rlp.config import RolloutConfig
from rlp_jax.rlp.objective import ThoughtPath
from rlp_jax.rlp.rollout import Thoughts, branch_tokens, score_branches, thought_logits
from rlp_jax.rlp.think_ids import ThinkIds


def branch_sequences(batch, t_bn, branch_bns, prompt_ids=()):
    """Rows [prompt, x_<t (its own document only), branch tokens], right-padded: tokens/segment_ids/positions
    [B*N, P+L+S].

    The branch continues the document of x_t: same segment id, positions from pos(t) on. With a prompt
    (token ids [P]) each row starts with its own copy of it, in x_t's segment at positions 0..P-1, and
    the document's positions shift by P; indices into a row shift by P too.
    """
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    b, n, s = branch_bns.shape
    length = tokens.shape[1]
    idx = jnp.arange(length + s)
    t = t_bn[..., None]                                                          # [B, N, 1]
    doc_idx = jnp.broadcast_to(jnp.minimum(idx, length - 1), (b, n, length + s))
    take = lambda x: jnp.take_along_axis(jnp.broadcast_to(x[:, None], (b, n, length)), doc_idx, 2)
    seg_t = jnp.take_along_axis(seg, t_bn, 1)[..., None]
    pos_t = jnp.take_along_axis(pos, t_bn, 1)[..., None]
    in_doc, in_branch = idx < t, (idx >= t) & (idx < t + s)
    branch = jnp.take_along_axis(branch_bns, jnp.clip(idx - t, 0, s - 1), 2)
    out_tok = jnp.where(in_doc, take(tokens), jnp.where(in_branch, branch, 0))
    out_seg = jnp.where(in_doc, take(seg), jnp.where(in_branch, seg_t, 0))
    out_pos = jnp.where(in_doc, take(pos), pos_t + idx - t)
    p = len(prompt_ids)                                                          # 0 without a prompt
    lead = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32).reshape(1, 1, -1), (b, n, p))
    out_tok = jnp.concatenate([lead(prompt_ids), out_tok], axis=2)
    out_seg = jnp.concatenate([jnp.broadcast_to(seg_t, (b, n, p)), out_seg], axis=2)
    out_pos = jnp.concatenate([lead(jnp.arange(p)), out_pos + p], axis=2)
    flat = lambda x: x.reshape(b * n, p + length + s).astype(jnp.int32)
    return flat(out_tok), flat(out_seg), flat(out_pos)


def naive_thought_forward(params, cfg: Config, batch, positions_bk, thoughts: Thoughts, targets_bkh,
                          rollout: RolloutConfig, ids: ThinkIds):
    """Same outputs as `rollout.thought_forward`, each thought run as its own full sequence (after its own
    copy of the prompt `ids.prompt`, if any)."""
    b, k, g, _ = thoughts.tokens.shape
    prompt_ids = ids.prompt
    seq, pred_idx = branch_tokens(thoughts, targets_bkh, ids)                 # [B, N, S]
    t_bn = jnp.repeat(positions_bk, g, axis=1)
    toks, seg, pos = branch_sequences(batch, t_bn, seq, prompt_ids)
    logits, _ = family.forward(params, cfg, toks, segment_ids_bl=seg, positions_bl=pos)
    s = seq.shape[-1]
    rows = jnp.take_along_axis(logits.reshape(b, k * g, -1, logits.shape[-1]),
                               (len(prompt_ids) + t_bn[..., None] + jnp.arange(s))[..., None], axis=2)  # [B, N, S, V]
    return score_branches(rows, pred_idx, thoughts, targets_bkh, rollout, ids)


def naive_thought_rollout(params, cfg: Config, batch, positions_bk, rng, rollout: RolloutConfig,
                          ids: ThinkIds) -> Thoughts:
    """Same sampling as `rollout.thought_rollout` (same rng -> same thoughts), but every branch is its
    own prompt `[prompt] x_<t <think>` prefilled separately and decoded with a per-sequence KV cache."""
    params = jax.lax.stop_gradient(params)
    start, end, prompt_ids = ids.start, ids.end, ids.prompt
    b, k = positions_bk.shape
    g, t_max = rollout.group_size, rollout.thought_len
    n = k * g
    t_bn = jnp.repeat(positions_bk, g, axis=1)
    first = jnp.full((b, n, 1), start, jnp.int32)
    toks, seg, pos = branch_sequences(batch, t_bn, first, prompt_ids)            # prompts [B*N, P+L+1]
    # The decode state of prompt rows; a branch hangs off the end of its row's own prompt.
    t_flat = t_bn.reshape(-1) + len(prompt_ids)
    logits, prefix = family.forward(params, cfg, toks, segment_ids_bl=seg, positions_bl=pos, return_cache=True,
                                   branch_positions_bk=(t_flat + 1)[:, None])
    last = logits[jnp.arange(b * n), t_flat]                                     # logits after <think>
    branches = Branches(start=(t_flat + 1)[:, None], segment=seg[jnp.arange(b * n), t_flat][:, None],
                        position=(pos[jnp.arange(b * n), t_flat] + 1)[:, None])
    cache = family.init_branch_cache(cfg, prefix, branches, t_max)
    tokens = jnp.zeros((b * n, t_max), jnp.int32)
    logps = jnp.zeros((b * n, t_max), jnp.float32)
    active = jnp.zeros((b * n, t_max), bool)
    done = jnp.zeros((b * n,), bool)

    def body(i, carry):
        last, cache, tokens, logps, active, done, rng = carry
        policy = thought_logits(last, i, rollout, ids).reshape(b, n, -1)
        rng, key = jax.random.split(rng)
        token = sample_categorical(key, filter_logits(policy, rollout.top_k, rollout.top_p))[0].reshape(-1)
        logp = jnp.take_along_axis(jax.nn.log_softmax(policy).reshape(b * n, -1), token[:, None], -1)[:, 0]
        live = ~done
        token = jnp.where(live, token, 0)
        tokens, logps = tokens.at[:, i].set(token), logps.at[:, i].set(jnp.where(live, logp, 0.0))
        active = active.at[:, i].set(live)
        done = done | (token == end)
        nxt, cache = family.branch_forward(params, cfg, prefix, branches, token[:, None, None], cache=cache, offset=i)
        return nxt[:, 0, 0], cache, tokens, logps, active, done, rng

    _, _, tokens, logps, active, _, _ = jax.lax.fori_loop(
        0, t_max, body, (last, cache, tokens, logps, active, done, rng))
    ended = jnp.any(active & (tokens == end), -1)
    lengths = active.sum(-1) - ended
    shape = (b, k, g)
    return Thoughts(tokens=tokens.reshape(*shape, t_max), action_mask=active.reshape(*shape, t_max),
                    logprobs=logps.reshape(*shape, t_max), lengths=lengths.reshape(shape).astype(jnp.int32),
                    ended=ended.reshape(shape))


def _sample(params, cfg, objective, batch, t_bk, rng):
    return naive_thought_rollout(params, cfg, batch, t_bk, rng, objective.rlp.rollout, objective.ids)


def _score(params, cfg, objective, batch, prefix, t_bk, thoughts, targets):
    del prefix
    return naive_thought_forward(params, cfg, batch, t_bk, thoughts, targets, objective.rlp.rollout, objective.ids)


NAIVE = ThoughtPath("naive", _sample, _score)   # `objective.SHARED_PREFIX`'s reference (tests, benchmarks)
