"""Prompted completion for evaluation: `Decoder` runs jit-compiled batched generation of a loaded model
over a device mesh, with or without a thought first, and scores answers by teacher forcing.

Modes:
  no_think: prompt -> answer.
  think:    prompt `<think>` -> sampled thought (stops at `</think>` or after `think_tokens`, then
            `</think>` is appended) -> answer cue -> answer. The thought sits where the answer is
            predicted, exactly where RLP inserts it in training (`<think> c </think> x_t`).

Prompts are token lists; generated texts are returned as token lists and decoded by the caller.
Shapes inside: B prompts per batch (a multiple of the mesh's data x fsdp size), L padded length.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlp_jax import sharding
from rlp_jax.generate.generation import SamplingConfig, generate, pad_prompts
from rlp_jax.model import family
from rlp_jax.model.scoring import shifted_token_logprobs
from rlp_jax.rlp.config import RolloutConfig

MODES = ("no_think", "think")
_ROLLOUT_TEMPERATURE = RolloutConfig.temperature   # one declaration of the thought temperature


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeOptions:
    """Attributes:
      max_new_tokens: answer budget. think_tokens: thought budget (T_think).
      temperature: answer sampling temperature (0 = greedy). think_temperature: thought sampling
        temperature (default: training's, `RolloutConfig.temperature`; a run's own is
        `LoadedModel.think_temperature`).
      top_k, top_p: sampling filters for both.
      think_banned_ids: token ids never sampled in a thought besides `<think>` (the run's
        rlp.rollout.banned_ids, so thoughts are sampled as in training; see `LoadedModel.think_banned_ids`).
    """

    max_new_tokens: int = 32
    think_tokens: int = 32
    temperature: float = 0.0
    think_temperature: float = _ROLLOUT_TEMPERATURE
    top_k: int = 0
    top_p: float = 1.0
    think_banned_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if min(self.max_new_tokens, self.think_tokens) < 1:
            raise ValueError("max_new_tokens and think_tokens must be >= 1")


@dataclasses.dataclass
class Completion:
    """One completion: thought token ids ([] in no_think mode), answer token ids (stop id dropped)."""

    thought: list[int]
    answer: list[int]


class Decoder:
    """Batched generation and answer scoring for one model (params placed on `mesh`).

    Args:
      params, cfg: the model. tokenizer: an `rlp_jax.data.tokenizer.Tokenizer` (marker and eos ids).
      mesh: a `jax.sharding.Mesh` (default: every device on the data axis); prompts split over its
        data x fsdp axes, params by the logical rules.
      batch_size: prompts per compiled batch (rounded up to a multiple of data x fsdp).
    """

    def __init__(self, params, cfg, tokenizer, mesh=None, batch_size: int = 32):
        self.cfg, self.tok, self.batch_size = cfg, tokenizer, batch_size
        self.mesh = mesh if mesh is not None else sharding.make_mesh(sharding.MeshConfig(data=-1))
        p_abs = jax.eval_shape(lambda: params)
        self._p_sh = sharding.tree_shardings(family.param_logical_axes(cfg), p_abs, self.mesh)
        self.params = jax.device_put(params, self._p_sh)
        self._rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self._row_sh = NamedSharding(self.mesh, P(("data", "fsdp")))
        self._replicated_sh = NamedSharding(self.mesh, P())
        self._stop = tuple(i for i in (tokenizer.eos_id,) if i is not None)

    # -- compiled pieces, shared by every Decoder of the same model shape and mesh --

    def _gen_fn(self, sc: SamplingConfig):
        return _compiled("generate", self.cfg, self.mesh, self._p_sh, sc)

    def _lp_fn(self):
        return _compiled("logprob", self.cfg, self.mesh, self._p_sh, None)

    # -- public API --

    def sample(self, prompts: Sequence[Sequence[int]], sc: SamplingConfig, rng) -> list[list[int]]:
        """Generated token ids per prompt (up to and including a stop id), in batches."""
        out: list[list[int]] = []
        bs = self._bs()
        for i in range(0, len(prompts), bs):
            chunk = prompts[i:i + bs]
            x, n = pad_prompts(chunk, pad_id=self.tok.pad_id or 0, multiple=64, batch_multiple=bs)
            key = jax.random.key_data(jax.random.fold_in(rng, i))
            g = jax.device_get(self._gen_fn(sc)(self.params, _global(x, self._row_sh), _global(n, self._row_sh),
                                                _global(key, self._replicated_sh)))
            out += [g.tokens[j, : g.lengths[j]].tolist() for j in range(len(chunk))]
        return out

    def complete(self, prompts: Sequence[Sequence[int]], mode: str, opts: DecodeOptions, rng,
                 answer_cue: Sequence[int] = ()) -> list[Completion]:
        """Answers to `prompts` in `mode` ("no_think" or "think"); see the module docstring."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        answer_sc = SamplingConfig(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                                   top_k=opts.top_k, top_p=opts.top_p, stop_ids=self._stop,
                                   banned_ids=(self.tok.think_start_id, self.tok.think_end_id))
        k_think, k_answer = jax.random.split(rng)
        thoughts = [[] for _ in prompts]
        if mode == "think":
            thoughts = self.think(prompts, opts, k_think)
            prompts = [self.with_thought(p, t, answer_cue) for p, t in zip(prompts, thoughts)]
        answers = self.sample(prompts, answer_sc, k_answer)
        return [Completion(thought=t, answer=[x for x in a if x not in self._stop]) for t, a in zip(thoughts, answers)]

    def think(self, prompts: Sequence[Sequence[int]], opts: DecodeOptions, rng) -> list[list[int]]:
        """Sampled thought content after `prompt <think>` (no markers), as the RLP rollout samples them:
        `<think>` banned, `</think>` banned in the first slot, at most think_tokens content tokens."""
        start, end = self.tok.think_start_id, self.tok.think_end_id
        sc = SamplingConfig(max_new_tokens=opts.think_tokens, temperature=opts.think_temperature, top_k=opts.top_k,
                            top_p=opts.top_p, stop_ids=(end,), banned_ids=(start, *opts.think_banned_ids),
                            min_new_tokens=1)
        return [[x for x in t if x != end] for t in self.sample([list(p) + [start] for p in prompts], sc, rng)]

    def with_thought(self, prompt: Sequence[int], thought: Sequence[int], answer_cue: Sequence[int] = ()) -> list[int]:
        """`prompt <think> thought </think> answer_cue` as token ids."""
        return list(prompt) + [self.tok.think_start_id, *thought, self.tok.think_end_id, *answer_cue]

    def logprob(self, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> np.ndarray:
        """log p(continuation | prefix) summed over the continuation's tokens, by teacher forcing: [N] float64."""
        return np.asarray([lp.sum() for lp, _ in self.token_scores(prefixes, continuations)], np.float64)

    def token_scores(self, prefixes: Sequence[Sequence[int]],
                     continuations: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per continuation: (log p(c_j | prefix, c_<j) [len(c)] float32, greedy [len(c)] bool: c_j is the
        argmax of the model's next-token distribution), by teacher forcing `prefix + continuation`."""
        seqs = [list(p) + list(c) for p, c in zip(prefixes, continuations)]
        out: list[tuple[np.ndarray, np.ndarray]] = []
        bs = self._bs()
        for i in range(0, len(seqs), bs):
            chunk = seqs[i:i + bs]
            x, n = pad_prompts(chunk, pad_id=0, multiple=64, batch_multiple=bs)
            seg = (np.arange(x.shape[1])[None] < n[:, None]).astype(np.int32)
            lp, greedy = jax.device_get(self._lp_fn()(self.params, _global(x, self._row_sh), _global(seg, self._row_sh)))
            for j, (p, c) in enumerate(zip(prefixes[i:i + bs], continuations[i:i + bs])):   # [:, k]: token k
                span = slice(len(p), len(p) + len(c))
                out.append((np.asarray(lp[j, span]), np.asarray(greedy[j, span])))
        return out

    def _bs(self) -> int:
        """Rows per compiled batch: batch_size rounded up to the mesh rows. Every chunk is padded to it,
        so there is one compiled shape per prompt-length bucket."""
        return -(-self.batch_size // self._rows) * self._rows


def _global(x, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as one global array with `sharding`: each process places
    only the pieces of its own devices, so multi-host evaluation works as is."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


_JITTED: dict = {}


def _compiled(kind: str, cfg, mesh, p_sh, sc):
    """One jitted function per (kind, model config, mesh, sampling config): decoders of several
    checkpoints of one model (e.g. before and after RLP) reuse each other's compilations."""
    key = (kind, repr(cfg), mesh, sc)
    if key not in _JITTED:
        # Inputs split over the mesh rows; outputs (token ids, log-probs: small) replicated, so that every
        # process of a multi-host run can read all of them.
        rows, replicated = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
        if kind == "generate":
            fn = lambda p, x, n, kd: generate(p, cfg, x, n, jax.random.wrap_key_data(kd), sc)
            _JITTED[key] = jax.jit(fn, in_shardings=(p_sh, rows, rows, replicated), out_shardings=replicated)
        else:
            def fn(p, x_bl, seg_bl):
                logits, _ = family.forward(p, cfg, x_bl, segment_ids_bl=seg_bl)
                greedy = jnp.pad(jnp.argmax(logits[:, :-1], axis=-1) == x_bl[:, 1:], ((0, 0), (1, 0)))
                return shifted_token_logprobs(logits, x_bl), greedy            # [B, L] float32, [B, L] bool
            _JITTED[key] = jax.jit(fn, in_shardings=(p_sh, rows, rows), out_shardings=replicated)
    return _JITTED[key]


def encode_answer(tokenizer, prompt_text: str, answer_text: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt_text` and of the answer that follows it (`" " + answer_text`), split so that
    the answer's ids are exactly those the tokenizer gives the joined text after the prompt's ids
    (falls back to encoding the two parts separately when the boundary merges)."""
    prompt = tokenizer.encode(prompt_text)
    joined = tokenizer.encode(f"{prompt_text} {answer_text}")
    if joined[: len(prompt)] == prompt:
        return prompt, joined[len(prompt):]
    return prompt, tokenizer.encode(f" {answer_text}")
