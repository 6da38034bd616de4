"""Sampling thoughts off the shared prefix (`thought_rollout`) and scoring them (`thought_forward`).

A thought at position t of document b is a branch of the prefix cache: `<think> c_1 .. c_n </think>`,
with rotary positions continuing from t. All K*G thoughts of a document share its prefix keys/values.

Shapes: B documents, L tokens, K positions per document, G thoughts per position, N = K*G branches
(n = k*G + g), T thought slots (T_think), S = T + 1 + H branch tokens, H reward horizon, V vocab.

Thought slots hold the sampled tokens: content tokens c_1..c_n and, when the policy itself chose to
stop, the sampled `</think>` in slot n. These sampled tokens are the actions of the policy gradient
(`action_mask`). A thought that fills all T slots has `</think>` forced after it (not an action).
Every thought has at least one content token (`</think>` is masked in slot 0) and `<think>` is never
sampled inside a thought. Log-probs are those of the temperature-scaled, marker-masked distribution;
top-k/top-p only restrict which tokens are drawn, so the trainer recomputes exactly the behaviour
log-probs (importance ratio 1 before an update).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlp_jax.model import family
from rlp_jax.model.family import Config
from rlp_jax.model.sampling import NEG, filter_logits, sample_categorical
from rlp_jax.rlp.config import RolloutConfig
from rlp_jax.rlp.think_ids import ThinkIds

THOUGHT_CHUNK = 32   # thought slots projected to the vocabulary at a time by `score_hidden`
SAMPLER_SCOPE = "thought_rollout"   # the named scope of the token loop (the planner's roofline counts it by it)


@flax.struct.dataclass
class Thoughts:
    """G sampled thoughts at each of K positions of each document.

    tokens: [B, K, G, T] int32 sampled tokens (0 after the end).
    action_mask: [B, K, G, T] bool, slots holding a sampled token (content and a sampled `</think>`).
    logprobs: [B, K, G, T] float32 behaviour log-probs log pi_old (0 where not an action).
    lengths: [B, K, G] int32 content tokens n (1 .. T).
    ended: [B, K, G] bool, the policy sampled `</think>` (False: forced at T).
    """

    tokens: jax.Array
    action_mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    ended: jax.Array


def thought_logits(logits, slot, rollout: RolloutConfig, ids: ThinkIds):
    """Policy logits of a thought slot: temperature-scaled, `<think>` and `ids.banned` banned,
    `</think>` banned in slot 0.

    logits: [..., V] float32; slot: int or int array broadcastable to logits[..., 0]. Returns [..., V].
    """
    vocab = jnp.arange(logits.shape[-1])
    banned = (vocab == ids.start) | ((vocab == ids.end) & (jnp.asarray(slot)[..., None] == 0))
    if ids.banned:
        banned = banned | jnp.isin(vocab, jnp.asarray(ids.banned, jnp.int32))
    return jnp.where(banned, NEG, logits.astype(jnp.float32) / rollout.temperature)


@flax.struct.dataclass
class _SampleState:
    step: jax.Array         # [] int32, slots filled so far
    last: jax.Array         # [B, N] int32, token fed at this step
    tokens: jax.Array       # [B, N, T]
    logprobs: jax.Array     # [B, N, T]
    active: jax.Array       # [B, N, T] bool (action mask)
    done: jax.Array         # [B, N] bool
    cache: object          # the model family's branch cache (`family.init_branch_cache`)
    rng: jax.Array


def thought_rollout(params, cfg: Config, prefix, positions_bk, rng, rollout: RolloutConfig,
                    ids: ThinkIds) -> Thoughts:
    """Sample G thoughts at each of K positions per document from the policy (no gradients).

    Args:
      params: policy params. cfg: Config. prefix: the documents' PrefixCache (policy params).
      positions_bk: [B, K] int32 indices t of the tokens to predict (the thought sees x_<t).
      rng: PRNG key. rollout: RolloutConfig (G, T_think, temperature, top-k/top-p).
      ids: the tokenizer's marker and banned ids (`rlp_jax.rlp.think_ids.ThinkIds`).
    Returns:
      `Thoughts` ([B, K, G, T]). One `lax.while_loop` over thought slots that stops early once every
      branch has ended; the prefix is shared, only the thought's own keys/values are cached.
    """
    params = family.sampling_params(jax.lax.stop_gradient(params), cfg)   # gathered once (`sampler_weights`)
    start, end = ids.start, ids.end
    b, k = positions_bk.shape
    g, t_max = rollout.group_size, rollout.thought_len
    n = k * g
    branches = family.branches_at(prefix, jnp.repeat(positions_bk, g, axis=1))  # [B, N]
    state = _SampleState(
        step=jnp.zeros((), jnp.int32), last=jnp.full((b, n), start, jnp.int32),
        tokens=jnp.zeros((b, n, t_max), jnp.int32), logprobs=jnp.zeros((b, n, t_max), jnp.float32),
        active=jnp.zeros((b, n, t_max), bool), done=jnp.zeros((b, n), bool),
        cache=family.init_branch_cache(cfg, prefix, branches, t_max), rng=rng)

    def cond(s: _SampleState):
        return (s.step < t_max) & ~jnp.all(s.done)

    def body(s: _SampleState):
        logits, cache = family.branch_forward(params, cfg, prefix, branches, s.last[:, :, None],
                                             cache=s.cache, offset=s.step)
        policy = thought_logits(logits[:, :, 0], s.step, rollout, ids)               # [B, N, V]
        rng, key = jax.random.split(s.rng)
        token, _ = sample_categorical(key, filter_logits(policy, rollout.top_k, rollout.top_p))
        logp = jnp.take_along_axis(jax.nn.log_softmax(policy), token[..., None], axis=-1)[..., 0]
        live = ~s.done
        token = jnp.where(live, token, 0)
        put = lambda buf, val: jax.lax.dynamic_update_slice_in_dim(buf, val[..., None], s.step, axis=2)
        return _SampleState(
            step=s.step + 1, last=token, tokens=put(s.tokens, token),
            logprobs=put(s.logprobs, jnp.where(live, logp, 0.0)), active=put(s.active, live),
            done=s.done | (token == end), cache=cache, rng=rng)

    with jax.named_scope(SAMPLER_SCOPE):
        s = jax.lax.while_loop(cond, body, state)
    ended = jnp.any(s.active & (s.tokens == end), axis=-1)
    lengths = s.active.sum(-1) - ended
    shape = (b, k, g)
    return Thoughts(tokens=s.tokens.reshape(*shape, t_max), action_mask=s.active.reshape(*shape, t_max),
                    logprobs=s.logprobs.reshape(*shape, t_max), lengths=lengths.reshape(shape).astype(jnp.int32),
                    ended=ended.reshape(shape))


def branch_tokens(thoughts: Thoughts, targets_bkh, ids: ThinkIds):
    """Branch sequences `<think> c_1..c_n </think> x_t .. x_{t+H-2}` padded to S = T + 1 + H.

    targets_bkh: [B, K, H] int32 true tokens x_t .. x_{t+H-1}. Returns tokens [B, N, S] int32 and the
    branch index predicting each target, [B, N, H] int32 (= n + 1 + h).
    """
    start, end = ids.start, ids.end
    b, k, g, t_max = thoughts.tokens.shape
    h = targets_bkh.shape[-1]
    s = t_max + 1 + h
    n_len = thoughts.lengths.reshape(b, k * g)[..., None]                         # [B, N, 1]
    tok = thoughts.tokens.reshape(b, k * g, t_max)
    tgt = jnp.repeat(targets_bkh, g, axis=1)                                       # [B, N, H]
    idx = jnp.arange(s)
    content = tok[:, :, jnp.clip(idx - 1, 0, t_max - 1)]                           # [B, N, S]
    after = jnp.take_along_axis(tgt, jnp.clip(idx - n_len - 2, 0, h - 1), axis=2)
    seq = jnp.where(idx == 0, start,
                    jnp.where(idx <= n_len, content,
                              jnp.where(idx == n_len + 1, end,
                                        jnp.where(idx <= n_len + h, after, 0))))
    return seq.astype(jnp.int32), (n_len + 1 + jnp.arange(h)).astype(jnp.int32)


def thought_forward(params, cfg: Config, prefix, positions_bk, thoughts: Thoughts,
                    targets_bkh, rollout: RolloutConfig, ids: ThinkIds):
    """The differentiable forward of every thought as a branch of the shared prefix.

    Returns:
      new_logprobs [B, K, G, T] float32: log pi_theta of each sampled thought token (0 off the
        action mask), under the same temperature and masks as the sampler.
      target_logprobs [B, K, G, H] float32: log p_theta(x_{t+h} | x_<t, <think> c </think>, ...)
        at temperature 1 (S_pred terms).
      target_argmax [B, K, G, H] int32: the policy's most likely token at those places (for RPT).
    """
    g = thoughts.tokens.shape[2]
    seq, pred_idx = branch_tokens(thoughts, targets_bkh, ids)                   # [B, N, S], [B, N, H]
    branches = family.branches_at(prefix, jnp.repeat(positions_bk, g, axis=1))
    hidden, _ = family.branch_forward(params, cfg, prefix, branches, seq, return_hidden=True)   # [B, N, S, D]
    return score_hidden(params, cfg, hidden, pred_idx, thoughts, targets_bkh, rollout, ids)


def score_hidden(params, cfg: Config, hidden_bnsd, pred_idx_bnh, thoughts: Thoughts, targets_bkh,
                 rollout: RolloutConfig, ids: ThinkIds, *, chunk: int = THOUGHT_CHUNK):
    """`score_branches` from final hidden states, without the [B, N, S, V] logits.

    The thought slots are projected `chunk` slots at a time under `jax.checkpoint` (the backward
    recomputes each chunk's logits), so the vocab-wide activations alive at once are [B, N, chunk, V]
    instead of [B, N, S, V]; the H target slots are projected after gathering them. Same outputs as
    `score_branches` (float32).
    """
    b, k, g, t_max = thoughts.tokens.shape
    n, h = k * g, targets_bkh.shape[-1]
    c = max(1, min(chunk, t_max))
    pad = -t_max % c
    x = jnp.pad(hidden_bnsd[:, :, :t_max], ((0, 0), (0, 0), (0, pad), (0, 0)))       # [B, N, T', D]
    tok = jnp.pad(thoughts.tokens.reshape(b, n, t_max), ((0, 0), (0, 0), (0, pad)))    # [B, N, T']
    nc = (t_max + pad) // c
    x_c = x.reshape(b, n, nc, c, -1).transpose(2, 0, 1, 3, 4)                          # [C, B, N, c, D]
    tok_c = tok.reshape(b, n, nc, c).transpose(2, 0, 1, 3)                             # [C, B, N, c]
    slots_c = jnp.arange(nc * c).reshape(nc, c)                                        # [C, c]

    @jax.checkpoint
    def chunk_logprobs(xc, tc, sc):
        policy = thought_logits(family.logits_from_hidden(params, cfg, xc), sc, rollout, ids)   # [B, N, c, V]
        return jnp.take_along_axis(jax.nn.log_softmax(policy), tc[..., None], axis=-1)[..., 0]

    lp = jax.lax.map(lambda a: chunk_logprobs(*a), (x_c, tok_c, slots_c))             # [C, B, N, c]
    new_lp = lp.transpose(1, 2, 0, 3).reshape(b, n, nc * c)[:, :, :t_max]
    new_lp = jnp.where(thoughts.action_mask.reshape(b, n, t_max), new_lp, 0.0)
    x_pred = jnp.take_along_axis(hidden_bnsd, pred_idx_bnh[..., None], axis=2)         # [B, N, H, D]
    at_pred = family.logits_from_hidden(params, cfg, x_pred)                            # [B, N, H, V]
    tgt = jnp.repeat(targets_bkh, g, axis=1)
    tgt_lp = jnp.take_along_axis(jax.nn.log_softmax(at_pred), tgt[..., None], axis=-1)[..., 0]
    return (new_lp.reshape(b, k, g, t_max), tgt_lp.reshape(b, k, g, h),
            jnp.argmax(at_pred, axis=-1).astype(jnp.int32).reshape(b, k, g, h))


def score_branches(logits_bnsv, pred_idx_bnh, thoughts: Thoughts, targets_bkh, rollout: RolloutConfig,
                   ids: ThinkIds):
    """Thought-token log-probs, target log-probs and target argmax from branch logits [B, N, S, V].

    The naive reference path scores with this; the shared-prefix path uses `score_hidden` (same
    outputs, chunked). Returns the three outputs of `thought_forward`.
    """
    b, k, g, t_max = thoughts.tokens.shape
    h = targets_bkh.shape[-1]
    policy = thought_logits(logits_bnsv[:, :, :t_max], jnp.arange(t_max), rollout, ids)  # [B, N, T, V]
    tok = thoughts.tokens.reshape(b, k * g, t_max)
    new_lp = jnp.take_along_axis(jax.nn.log_softmax(policy), tok[..., None], axis=-1)[..., 0]
    new_lp = jnp.where(thoughts.action_mask.reshape(b, k * g, t_max), new_lp, 0.0)
    at_pred = jnp.take_along_axis(logits_bnsv, pred_idx_bnh[..., None], axis=2)     # [B, N, H, V]
    tgt = jnp.repeat(targets_bkh, g, axis=1)
    tgt_lp = jnp.take_along_axis(jax.nn.log_softmax(at_pred), tgt[..., None], axis=-1)[..., 0]
    return (new_lp.reshape(b, k, g, t_max), tgt_lp.reshape(b, k, g, h),
            jnp.argmax(at_pred, axis=-1).astype(jnp.int32).reshape(b, k, g, h))
