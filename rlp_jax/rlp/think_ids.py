"""The token ids the objective reads from the run's tokenizer: a runtime value, never a setting.

The markers `<think>` / `</think>`, the ids a thought never samples and the rendered prompt depend on the
tokenizer, not on the user: `think_ids(rlp, tokenizer)` builds them once, and `objective.Objective` carries
them beside the settings (`RLPConfig`) to every function that samples or scores a thought. Nothing of it is in
a config file: a run directory rebuilds it from its own tokenizer.
"""

from __future__ import annotations

import dataclasses

from rlp_jax.rlp.config import RLPConfig
from rlp_jax.rlp.prompt import render_prompt


class ThinkIdsError(ValueError):
    """Settings this tokenizer cannot serve (one line, says the fix)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThinkIds:
    """start, end: the ids of `<think>` and `</think>`. banned: ids never sampled inside a thought besides
    `<think>` (and `</think>` in the first slot). prompt: the ids of the prompt the policy reads before every
    document (() without one, `rlp.prompt.style` "none"). word_starts: with `rlp.rollout.word_starts`, the ids
    a position's token x_t must be one of (`Tokenizer.word_start_ids`); () places thoughts before any token."""

    start: int
    end: int
    banned: tuple[int, ...] = ()
    prompt: tuple[int, ...] = ()
    word_starts: tuple[int, ...] = ()

    def __post_init__(self):
        if self.start == self.end:
            raise ValueError(f"<think> and </think> must be two tokens, got id {self.start} for both")


def think_ids(rlp: RLPConfig, tokenizer) -> ThinkIds:
    """The ids `rlp` takes from `tokenizer`: its markers; banned: `rlp.rollout.banned_ids`, plus (with
    `rollout.ban_special_tokens`) the tokenizer's special tokens other than the markers (eos, bos, pad and
    chat-control tokens such as `<|im_start|>`); the rendered `rlp.prompt`; with `rlp.rollout.word_starts`, the
    tokenizer's word-start ids. Raises `prompt.PromptError` (one line, with the fix) for a prompt the tokenizer
    cannot render, `ThinkIdsError` for word starts it does not have."""
    start, end = tokenizer.think_start_id, tokenizer.think_end_id
    banned = set(rlp.rollout.banned_ids)
    if rlp.rollout.ban_special_tokens:
        special = {tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id} | set(tokenizer.special_ids)
        banned |= special - {None, start, end}
    word_starts = tokenizer.word_start_ids() if rlp.rollout.word_starts else ()
    if rlp.rollout.word_starts and not word_starts:
        raise ThinkIdsError("rlp.rollout.word_starts: the tokenizer has no piece that begins a word (a space marker "
                         "then a letter or digit); set rlp.rollout.word_starts=false for this tokenizer")
    return ThinkIds(start=start, end=end, banned=tuple(sorted(banned)), prompt=render_prompt(rlp.prompt, tokenizer),
                    word_starts=word_starts)
