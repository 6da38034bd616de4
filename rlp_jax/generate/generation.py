"""Batched text generation with the KV cache: `generate` (one jitted `lax.while_loop`) and `stream`.

Decoding reuses the model's decode mode (`model.prefill` / `model.decode_step`): one KV cache per
layer holds the prompts' keys/values and then the generated tokens', so nothing is re-encoded per token.

Shapes: B sequences, L prompt length (right-padded), J = max_new_tokens, V vocab.

`generate` stops a sequence at its first stop id (kept in the output) and ends the loop early once
every sequence has stopped; `banned_ids` are never sampled; `min_new_tokens` bans the stop ids before
that many tokens (the sampler of thoughts in training bans `</think>` in the first slot the same way).
Temperature 0 is greedy decoding; otherwise logits are divided by the temperature, then restricted by
top-k and top-p (`sampling.filter_logits`) before sampling (`sampling.sample_categorical`: one uniform
per sequence and token, by inverting the CDF).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlp_jax.model import family
from rlp_jax.model.family import Config
from rlp_jax.model.sampling import NEG, argmax, filter_logits, sample_categorical


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Attributes:
      max_new_tokens: J, the token budget per sequence.
      temperature: 0 = greedy; > 0 divides the logits.
      top_k: keep the k most likely tokens (0 = all). top_p: nucleus mass (1.0 = all).
      stop_ids: token ids that end a sequence (kept in the output), e.g. eos or `</think>`.
      banned_ids: token ids never sampled, e.g. `<think>` inside a thought.
      min_new_tokens: stop ids are banned before this many tokens were generated.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    banned_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, "
                             f"{self.top_p}, {self.top_k}")


@flax.struct.dataclass
class Generated:
    """tokens: [B, J] int32 generated ids (0 after the end). lengths: [B] int32 tokens generated
    (the stop id included). stopped: [B] bool, a stop id was generated. logprobs: [B, J] float32
    log-probs of the generated tokens under the sampling distribution (0 after the end)."""

    tokens: jax.Array
    lengths: jax.Array
    stopped: jax.Array
    logprobs: jax.Array


def next_token_logits(logits_bv, step, sc: SamplingConfig):
    """The sampling distribution's logits [B, V] float32: bans, temperature (1 when greedy), top-k/top-p."""
    vocab = jnp.arange(logits_bv.shape[-1])
    banned = jnp.isin(vocab, jnp.asarray(sc.banned_ids, jnp.int32)) if sc.banned_ids else jnp.zeros_like(vocab, bool)
    if sc.stop_ids and sc.min_new_tokens > 0:
        banned = banned | (jnp.isin(vocab, jnp.asarray(sc.stop_ids, jnp.int32)) & (step < sc.min_new_tokens))
    logits = jnp.where(banned, NEG, logits_bv.astype(jnp.float32) / max(sc.temperature, 1e-6) if sc.temperature
                       else logits_bv.astype(jnp.float32))
    return filter_logits(logits, sc.top_k, sc.top_p)


def _pick(logits_bv, step, rng, sc: SamplingConfig):
    """(token [B] int32, its log-prob [B] float32 under the sampling distribution)."""
    with jax.named_scope("sample"):
        policy = next_token_logits(logits_bv, step, sc)
        if sc.temperature:
            return sample_categorical(rng, policy)
        token = argmax(policy)
        logp = jnp.take_along_axis(policy, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(policy, axis=-1)
        return token.astype(jnp.int32), logp


@flax.struct.dataclass
class _GenState:
    step: jax.Array        # [] int32
    logits: jax.Array      # [B, V] float32, next-token logits
    tokens: jax.Array      # [B, J] int32
    logprobs: jax.Array    # [B, J] float32
    done: jax.Array        # [B] bool
    decode: object         # the model family's decode state (`model.prefill`)
    rng: jax.Array


def generate(params, cfg: Config, prompts_bl, prompt_lens_b, rng, sc: SamplingConfig) -> Generated:
    """Sample up to J tokens after each right-padded prompt.

    Args:
      params: model params. prompts_bl: [B, L] int32 right-padded. prompt_lens_b: [B] int32 (>= 1).
      rng: PRNG key (unused when greedy). sc: SamplingConfig (static: jit with it closed over).
    Returns:
      `Generated` ([B, J]). One `lax.while_loop` over tokens that ends when every sequence stopped.
    """
    b = prompts_bl.shape[0]
    j = sc.max_new_tokens
    logits, dstate = family.prefill(params, cfg, prompts_bl, prompt_lens_b, j)
    # once, not a copy of every weight per token; gathered once over fsdp where `cfg.sampler_weights` says so
    layer_params = family.split_layers(params, cfg)
    stop = jnp.asarray(sc.stop_ids or (-1,), jnp.int32)
    state = _GenState(step=jnp.zeros((), jnp.int32), logits=logits, tokens=jnp.zeros((b, j), jnp.int32),
                      logprobs=jnp.zeros((b, j), jnp.float32), done=jnp.zeros((b,), bool), decode=dstate, rng=rng)

    def cond(s: _GenState):
        return (s.step < j) & ~jnp.all(s.done)

    def body(s: _GenState):
        rng, key = jax.random.split(s.rng)
        token, logp = _pick(s.logits, s.step, key, sc)
        live = ~s.done
        token = jnp.where(live, token, 0)
        put = lambda buf, val: jax.lax.dynamic_update_slice_in_dim(buf, val[:, None], s.step, axis=1)
        logits, dstate = family.decode_step(layer_params, cfg, s.decode, token)
        return _GenState(step=s.step + 1, logits=logits, tokens=put(s.tokens, token),
                         logprobs=put(s.logprobs, jnp.where(live, logp, 0.0)),
                         done=s.done | (live & jnp.isin(token, stop)), decode=dstate, rng=rng)

    s = jax.lax.while_loop(cond, body, state)
    stopped = s.done
    first_stop = jnp.argmax(jnp.isin(s.tokens, stop) & (jnp.arange(j) < s.step), axis=1)
    lengths = jnp.where(stopped, first_stop + 1, s.step).astype(jnp.int32)
    keep = jnp.arange(j)[None, :] < lengths[:, None]
    return Generated(tokens=jnp.where(keep, s.tokens, 0), lengths=lengths, stopped=stopped,
                     logprobs=jnp.where(keep, s.logprobs, 0.0))


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, multiple: int = 32,
                batch_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to [B', L] (L rounded up to `multiple` so few shapes compile; B' rounded
    up to `batch_multiple` with copies of the last prompt so the batch splits over the mesh).
    Returns (prompts [B', L] int32, lengths [B'] int32)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    rows = list(prompts) + [prompts[-1]] * (-len(prompts) % batch_multiple)
    length = -(-max(len(p) for p in rows) // multiple) * multiple
    out = np.full((len(rows), length), pad_id, np.int32)
    for i, p in enumerate(rows):
        out[i, :len(p)] = p
    return out, np.asarray([len(p) for p in rows], np.int32)


def stream(params, cfg: Config, prompt: Sequence[int], rng, sc: SamplingConfig) -> Iterator[int]:
    """Yield the sampled tokens of one prompt one at a time (for interactive use); the same sampling
    rules as `generate`, with one jitted decode step per token."""
    prompts, lens = pad_prompts([prompt])
    j = sc.max_new_tokens
    prefill = jax.jit(lambda p, x, n: family.prefill(p, cfg, x, n, j))
    step_fn = jax.jit(lambda p, st, tok: family.decode_step(p, cfg, st, tok))
    pick = jax.jit(lambda logits, i, key: _pick(logits, i, key, sc)[0])
    logits, state = prefill(params, jnp.asarray(prompts), jnp.asarray(lens))
    layer_params = jax.jit(lambda p: family.split_layers(p, cfg))(params)
    for i in range(j):
        rng, key = jax.random.split(rng)
        token = pick(logits, i, key)
        tid = int(token[0])
        yield tid
        if tid in sc.stop_ids:
            return
        logits, state = step_fn(layer_params, state, token)
