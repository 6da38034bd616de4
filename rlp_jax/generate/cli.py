"""Stream a completion of one prompt: `python -m rlp_jax.generate --checkpoint=DIR --prompt "..." [--think]`.

DIR is an rlp_jax run directory or a Hugging Face checkpoint. With `--think` the model first writes a
thought after `<think>` (at most --think_tokens tokens, `</think>` forced after that), then the answer,
as RLP trains it to. Sampling options are those of training's rollout (temperature, top-k, top-p); a
run directory's thoughts also never contain the tokens its rollout banned (rlp.rollout.banned_ids), as in
`rlp_jax.evaluate`.
"""

from __future__ import annotations

import argparse
import sys

import jax

from rlp_jax.generate.generation import SamplingConfig, stream
from rlp_jax.runs.loading import LOAD_ERRORS, load_model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlp_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="rlp_jax run directory, Hugging Face checkpoint dir or .gguf file")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--think", action="store_true", help="write a <think> ... </think> thought first")
    p.add_argument("--max_new_tokens", type=int, default=64, help="answer token budget")
    p.add_argument("--think_tokens", type=int, default=32, help="thought token budget")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the run's rlp.rollout.temperature; 1.0 for pretrained files)")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="checkpoint step of a run directory (default: latest)")
    p.add_argument("--which", choices=("params", "ema"), default="params", help="policy or EMA teacher")
    return p


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stream_text(lm, ids, rng, sc) -> list[int]:
    """Stream the decoded text of the tokens sampled after `ids`; returns the tokens."""
    out: list[int] = []
    shown = ""
    for tid in stream(lm.params, lm.cfg, ids, rng, sc):
        if tid in sc.stop_ids:
            out.append(tid)
            break
        out.append(tid)
        text = lm.tokenizer.decode(out)
        _emit(text[len(shown):])
        shown = text
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        lm = load_model(args.checkpoint, step=args.step, which=args.which)
        base = dict(temperature=lm.think_temperature if args.temperature is None else args.temperature,
                    top_k=args.top_k, top_p=args.top_p)
        SamplingConfig(max_new_tokens=min(args.max_new_tokens, args.think_tokens), **base)  # validate flags
    except (ValueError, *LOAD_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = lm.tokenizer
    ids = tok.encode(args.prompt)
    if not ids:
        print("error: --prompt is empty after tokenization; give some text", file=sys.stderr)
        return 2
    stops = tuple(i for i in (tok.eos_id,) if i is not None)
    answer_sc = SamplingConfig(max_new_tokens=args.max_new_tokens, stop_ids=stops,
                               banned_ids=(tok.think_start_id, tok.think_end_id), **base)
    rng_think, rng_answer = jax.random.split(jax.random.key(args.seed))
    _emit(args.prompt)
    if args.think:
        think_sc = SamplingConfig(max_new_tokens=args.think_tokens, stop_ids=(tok.think_end_id,),
                                  banned_ids=(tok.think_start_id, *lm.think_ids.banned),
                                  min_new_tokens=1, **base)
        _emit(" <think>")
        ids = list(lm.think_ids.prompt) + ids + [tok.think_start_id]   # the run's prompt, if it trained with one
        thought = [t for t in _stream_text(lm, ids, rng_think, think_sc) if t != tok.think_end_id]
        _emit("</think>")
        ids = ids + thought + [tok.think_end_id]
    _stream_text(lm, ids, rng_answer, answer_sc)
    _emit("\n")
    return 0
