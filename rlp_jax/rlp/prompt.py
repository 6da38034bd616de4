"""The prompted setting: the instruction a policy reads before every document (docs/method.md step 1).

`render_prompt(prompt, tokenizer)` turns an `rlp.prompt` config into token ids: with style "chat" the
tokenizer's own Jinja chat template (as `transformers`' `apply_chat_template` renders it: a sandboxed
environment, `trim_blocks` / `lstrip_blocks`) with a system message, a user turn and the opening of the
assistant turn that the document then continues; with style "text" the instruction as plain text.

The prompt is never copied into rows or branches: `model.context_cache` runs it once per step and
every document token and every thought attends to its keys/values (`model.forward(context=...)`),
with the documents' rotary positions shifted by the prompt length, exactly as if each document
(packed or not) followed its own copy of the prompt. `tests/test_prompt.py` checks this against
the naive path with the prompt prepended to every sequence.
"""

from __future__ import annotations

from rlp_jax.data.tokenizer import Tokenizer
from rlp_jax.model import family
from rlp_jax.model.family import Config
from rlp_jax.rlp.config import PromptConfig


class PromptError(ValueError):
    """A prompt that cannot be rendered with this tokenizer (one line, says the fix)."""


def prompt_text(prompt: PromptConfig, tokenizer: Tokenizer) -> str:
    """The prompt as text ("" for style "none")."""
    if prompt.style == "none":
        return ""
    start, end = (tokenizer.decode([i]) for i in (tokenizer.think_start_id, tokenizer.think_end_id))
    fill = lambda t: t.replace("{think_start}", start).replace("{think_end}", end)
    system, user = fill(prompt.system), fill(prompt.user)
    if prompt.style == "text":
        return system + "\n\n"
    template = tokenizer.chat_template
    if not template:
        raise PromptError("rlp.prompt.style=chat needs a tokenizer with a chat template (this one has none); "
                          "use --set rlp.prompt.style=text")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise PromptError(f"the chat template refused the prompt: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    messages = [{"role": "system", "content": system}] + ([{"role": "user", "content": user}] if user else [])
    name = lambda i: tokenizer.decode([i]) if i is not None else ""
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token=name(tokenizer.bos_id), eos_token=name(tokenizer.eos_id))
    except jinja2.TemplateError as e:
        raise PromptError(f"the tokenizer's chat template cannot be rendered ({e}); use --set rlp.prompt.style=text") from None


def render_prompt(prompt: PromptConfig, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The prompt's token ids (() for style "none")."""
    text = prompt_text(prompt, tokenizer)
    return tuple(tokenizer.encode(text)) if text else ()


def prompt_context(params, cfg: Config, prompt_ids: tuple[int, ...]):
    """The ContextCache of a prompt (its token ids, `think_ids.ThinkIds.prompt`) under `params`; None for ()."""
    return family.context_cache(params, cfg, prompt_ids) if prompt_ids else None
