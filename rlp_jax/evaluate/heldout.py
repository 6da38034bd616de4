"""Held-out evaluation of runs on the generated corpus (`rlp_jax.data.corpus`): the demo's and the
replication's before/after table.

Two kinds of numbers per run:
- document metrics: the run's last held-out eval (`eval/nll_no_think`, `eval/nll_think`,
  `eval/info_gain`, `eval/nll_tokens`) from its metrics.jsonl; every run of one recipe evaluates the
  same held-out batches with the same positions and seed, so the rows are comparable.
- answer metrics on held-out problems (`heldout.jsonl`, never in training): exact-match accuracy
  answering directly (`acc_no_think`, greedy) and after a sampled thought (`acc_think`, thought sampled
  at the run's rollout temperature as in training, then a greedy answer; averaged over `thoughts` samples per
  problem), and the NLL of the answer tokens without and with the thought (`answer_nll_*`;
  `answer_gain` = their difference, positive when thinking helps).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from rlp_jax.evaluate import tasks
from rlp_jax.evaluate.decoder import DecodeOptions, Decoder, encode_answer
from rlp_jax.runs.loading import LoadedModel, load_model

DOC_KEYS = ("eval/nll_tokens", "eval/nll_no_think", "eval/nll_think", "eval/info_gain")


def last_eval(run_dir) -> dict:
    """The last `split == "eval"` record of RUN_DIR/metrics.jsonl ({} when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    last = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("split") == "eval":
                last = rec
    return last


def load_problems(heldout, limit: int | None = None) -> list[tasks.Item]:
    """Held-out problems of a generated corpus (`heldout.jsonl` written by `corpus.build_corpus`; the
    `generated` task reads it from its directory)."""
    return tasks.load_task("generated", Path(heldout).parent, limit=limit)


def answer_metrics(decoder: Decoder, problems: list[tasks.Item], *, think_tokens: int, thoughts: int = 4,
                   seed: int = 0, think_banned_ids: tuple[int, ...] = (), think_prompt_ids: tuple[int, ...] = (),
                   think_temperature: float = 1.0) -> dict:
    """Accuracy and answer NLL with and without a thought (see the module docstring). Floats.

    think_prompt_ids: the run's prompt (`rlp.prompt`, the prompted setting): thoughts are sampled and the
    answer after them scored with it before the question, as in training; direct answers read none."""
    spec = tasks.TASKS["generated"]
    tok = decoder.tok
    enc = [encode_answer(tok, p.question, p.answer) for p in problems]
    prompts, answers = [e[0] for e in enc], [e[1] for e in enc]
    rng = jax.random.key(seed)
    opts = DecodeOptions(max_new_tokens=8, think_tokens=think_tokens, temperature=0.0,
                         think_temperature=think_temperature, think_banned_ids=think_banned_ids)
    direct = decoder.complete(prompts, "no_think", opts, rng)
    ok_direct = [tasks.score(spec, tok.decode(c.answer), p, think=False)[1] for c, p in zip(direct, problems)]
    lp_direct = decoder.logprob(prompts, answers)
    rep = lambda xs: [x for x in xs for _ in range(thoughts)]
    prompts = [list(think_prompt_ids) + list(p) for p in prompts]
    thought_runs = decoder.complete(rep(prompts), "think", opts, jax.random.fold_in(rng, 1))
    ok_think = [tasks.score(spec, tok.decode(c.answer), p, think=True)[1]
                for c, p in zip(thought_runs, rep(problems))]
    lp_think = decoder.logprob([decoder.with_thought(p, c.thought) for p, c in zip(rep(prompts), thought_runs)],
                               rep(answers))
    lp_think = lp_think.reshape(len(problems), thoughts)
    return {"acc_no_think": float(np.mean(ok_direct)), "acc_think": float(np.mean(ok_think)),
            "answer_nll_no_think": float(-lp_direct.mean()), "answer_nll_think": float(-lp_think.mean()),
            "answer_gain": float((lp_think.mean(1) - lp_direct).mean()),
            "answer_thought_len": float(np.mean([len(c.thought) for c in thought_runs]))}


def model_answer_metrics(lm: LoadedModel, heldout, *, think_tokens: int, thoughts: int = 4, seed: int = 0,
                         limit: int | None = None) -> dict:
    """`answer_metrics` of a loaded model on the held-out problems in `heldout` (a heldout.jsonl path),
    thinking as the run trained to (its banned ids, prompt and rollout temperature)."""
    decoder = Decoder(lm.params, lm.cfg, lm.tokenizer, batch_size=64)
    return answer_metrics(decoder, load_problems(heldout, limit), think_tokens=think_tokens, thoughts=thoughts,
                          seed=seed, think_banned_ids=lm.think_ids.banned, think_prompt_ids=lm.think_ids.prompt,
                          think_temperature=lm.think_temperature)


def evaluate_run(run_dir, heldout, *, think_tokens: int, thoughts: int = 4, seed: int = 0,
                 limit: int | None = None) -> dict:
    """Document and answer metrics of one run directory's latest checkpoint."""
    lm = load_model(run_dir)
    row = {"run": str(run_dir), "step": lm.step}
    row.update({k.split("/")[1]: last_eval(run_dir).get(k) for k in DOC_KEYS})
    row.update(model_answer_metrics(lm, heldout, think_tokens=think_tokens, thoughts=thoughts, seed=seed,
                                    limit=limit))
    return row


def compare_runs(runs: dict, heldout, *, think_tokens: int, thoughts: int = 4, seed: int = 0) -> list[dict]:
    """`evaluate_run` for each {label: run_dir}; rows carry their label."""
    return [{"label": label, **evaluate_run(d, heldout, think_tokens=think_tokens, thoughts=thoughts, seed=seed)}
            for label, d in runs.items()]


COLUMNS = (("nll_no_think", "no-think NLL"), ("nll_think", "think NLL"), ("info_gain", "info gain"),
           ("acc_no_think", "acc (no think)"), ("acc_think", "acc (think)"),
           ("answer_nll_no_think", "answer NLL (no think)"), ("answer_nll_think", "answer NLL (think)"),
           ("answer_thought_len", "thought len"))


def format_table(rows: list[dict]) -> str:
    """A markdown table of `compare_runs` rows (document metrics in nats per predicted token)."""
    head = "| run | step | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    def cell(key, v):
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if key.startswith("acc") else f"{v:.3f}"

    for r in rows:
        cells = [cell(k, r.get(k)) for k, _ in COLUMNS]
        lines.append(f"| {r['label']} | {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_thoughts(model, heldout, *, n: int, think_tokens: int, seed: int = 0) -> list[str]:
    """`question <think> thought </think> answer` strings for the first n held-out problems, from a run
    directory's latest checkpoint or a LoadedModel."""
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    decoder = Decoder(lm.params, lm.cfg, lm.tokenizer, batch_size=64)
    problems = load_problems(heldout, n)
    prompts = [list(lm.think_ids.prompt) + lm.tokenizer.encode(p.question) for p in problems]
    opts = DecodeOptions(max_new_tokens=8, think_tokens=think_tokens, think_temperature=lm.think_temperature,
                         think_banned_ids=lm.think_ids.banned)
    out = decoder.complete(prompts, "think", opts, jax.random.key(seed))
    dec = lm.tokenizer.decode
    return [f"{p.question} <think> {dec(c.thought)} </think> {dec(c.answer)}  [gold: {p.answer}]"
            for p, c in zip(problems, out)]
