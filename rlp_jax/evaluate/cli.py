"""Benchmark evaluation with and without thinking:

    python -m rlp_jax.evaluate --checkpoint=RUN_DIR_OR_HF_DIR --tasks=gsm8k,math500,mmlu --data_dir=DIR \
        [--modes=no_think,think] [--shots=N] [--samples=K --temperature=0.7] [--limit=N] [--out=FILE.json]

Task files are the user's (nothing is downloaded): see `rlp_jax.evaluate.tasks` for the file names and row
formats of GSM8K, MATH500, Minerva Math, AIME, AMC, MMLU, MMLU-Pro, GPQA and our generated held-out set.
Per task and mode: few-shot prompts (`tasks.build_prompt`), batched jit-compiled decoding with the KV
cache over the device mesh (`decoder.Decoder`), answer extraction and exact-match / math-equivalence
scoring (`tasks.score`), pass@1 (mean over samples) and pass@k when K > 1 samples are drawn.
`think` mode writes `<think> ... </think>` at the answer position first (`rlp_jax.evaluate.decoder`).

Prints a table and the paper's averages (math: AIME, MATH500, GSM8K, AMC, Minerva; science: MMLU,
MMLU-Pro, GPQA; overall: all of those present; `generated` is reported apart), and writes every
prompt, thought, completion and prediction to a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from rlp_jax import sharding
from rlp_jax.evaluate import tasks
from rlp_jax.evaluate.answers import pass_at_k
from rlp_jax.evaluate.decoder import MODES, DecodeOptions, Decoder
from rlp_jax.runs.layout import local_dirs
from rlp_jax.runs.loading import LOAD_ERRORS, load_model

DEFAULT_BUDGET = {"math": 256, "choice": 8, "generated": 8}   # answer tokens when --max_new_tokens is not given


def evaluate_task(decoder: Decoder, spec: tasks.TaskSpec, items: list[tasks.Item], shots: list[list[tasks.Item]],
                  mode: str, opts: DecodeOptions, *, samples: int, seed: int) -> tuple[dict, list[dict]]:
    """Score one task in one mode. Returns (summary {n, pass@1[, pass@k]}, per-item records)."""
    tok = decoder.tok
    prompts_text = [tasks.build_prompt(spec, it, sh) for it, sh in zip(items, shots)]
    prompts = [tok.encode(p) for p in prompts_text]
    cue = tok.encode(tasks.answer_cue(spec)) if mode == "think" and tasks.answer_cue(spec) else []
    rep = [p for p in prompts for _ in range(samples)]
    rng = jax.random.fold_in(jax.random.key(seed), zlib.crc32(f"{spec.name}/{mode}".encode()) % (2 ** 31))
    outs = decoder.complete(rep, mode, opts, rng, answer_cue=cue)
    records, correct = [], []
    for i, it in enumerate(items):
        runs = []
        for c in outs[i * samples:(i + 1) * samples]:
            text = tok.decode(c.answer)
            pred, ok = tasks.score(spec, text, it, think=mode == "think")
            runs.append({"thought": tok.decode(c.thought) if mode == "think" else None, "completion": text,
                         "prediction": pred, "correct": ok, "thought_ids": c.thought, "answer_ids": c.answer})
        correct.append(sum(r["correct"] for r in runs))
        records.append({"task": spec.name, "mode": mode, "id": it.id, "gold": it.answer, "prompt": prompts_text[i],
                        "samples": runs})
    summary = {"n": len(items), "pass@1": float(np.mean([pass_at_k(samples, c, 1) for c in correct]))}
    if samples > 1:
        summary[f"pass@{samples}"] = float(np.mean([pass_at_k(samples, c, samples) for c in correct]))
    return summary, records


def averages(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Per mode: the paper's math, science and overall averages of pass@1 over the tasks present
    (`generated` excluded)."""
    out: dict[str, dict[str, float]] = {}
    for mode in {m for r in results.values() for m in r}:
        groups: dict[str, list[float]] = {"math": [], "science": []}
        for task, by_mode in results.items():
            if task != "generated" and mode in by_mode:
                groups[tasks.get_task(task).group].append(by_mode[mode]["pass@1"])
        avg = {f"{g}_avg": float(np.mean(v)) for g, v in groups.items() if v}
        every = groups["math"] + groups["science"]
        if every:
            avg["overall_avg"] = float(np.mean(every))
        out[mode] = avg
    return out


def format_table(results: dict[str, dict[str, dict]], avgs: dict[str, dict[str, float]]) -> str:
    modes = sorted({m for r in results.values() for m in r}, key=MODES.index)
    extra = sorted({k for r in results.values() for s in r.values() for k in s if k.startswith("pass@")} - {"pass@1"})
    head = ["task", "n"] + [f"{m} pass@1" for m in modes] + [f"{m} {k}" for m in modes for k in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    for task, by_mode in results.items():
        n = next(iter(by_mode.values()))["n"]
        cells = [pct(by_mode.get(m, {}).get("pass@1")) for m in modes]
        cells += [pct(by_mode.get(m, {}).get(k)) for m in modes for k in extra]
        lines.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
    for key in ("math_avg", "science_avg", "overall_avg"):
        if any(key in avgs.get(m, {}) for m in modes):
            cells = [pct(avgs.get(m, {}).get(key)) for m in modes] + ["" for _ in modes for _ in extra]
            lines.append(f"| **{key}** | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlp_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="rlp_jax run directory, Hugging Face checkpoint dir or .gguf file")
    p.add_argument("--tasks", required=True, help=f"comma-separated: {','.join(tasks.TASKS)}")
    p.add_argument("--data_dir", required=True, help="directory holding the task files (see rlp_jax.evaluate.tasks)")
    p.add_argument("--modes", default="no_think,think", help="no_think, think or both")
    p.add_argument("--shots", type=int, help="few-shot exemplars per prompt (default: per task)")
    p.add_argument("--limit", type=int, help="evaluate the first N items of each task")
    p.add_argument("--samples", type=int, default=1, help="samples per item; pass@k is reported for k = samples")
    p.add_argument("--temperature", type=float, default=0.0, help="answer temperature (0 = greedy)")
    p.add_argument("--think_temperature", type=float, default=None,
                   help="thought sampling temperature (default: the run's rlp.rollout.temperature; 1.0 for "
                        "pretrained files)")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, help="answer budget (default: 256 math, 8 choice/generated)")
    p.add_argument("--think_tokens", type=int, default=64, help="thought budget")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per compiled batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="checkpoint step of a run directory (default: latest)")
    p.add_argument("--which", choices=("params", "ema"), default="params", help="policy or EMA teacher")
    p.add_argument("--mesh", default="data=-1", help="mesh axes, e.g. data=2,fsdp=4 (-1: the rest; the syntax of "
                   "every command, `sharding.MeshConfig.parse`)")
    p.add_argument("--out", help="predictions JSON (default: RUN_DIR/eval/eval-<time>.json or ./eval-<time>.json)")
    return p


def _mesh(text: str):
    return sharding.make_mesh(sharding.MeshConfig.parse(text))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Multi-host (a TPU pod slice, several GPU hosts): every process runs this same command on the same
    # files; decoding is sharded over all devices and process 0 prints and writes the results.
    sharding.maybe_initialize_distributed()
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    try:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        specs = [tasks.get_task(t) for t in names]
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ValueError(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
        if args.samples < 1:
            raise ValueError(f"--samples {args.samples}: must be at least 1")
        if args.samples > 1 and args.temperature == 0:
            raise ValueError("--samples K > 1 needs --temperature > 0 (greedy samples are identical)")
        for flag in ("batch_size", "think_tokens", "limit", "max_new_tokens"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise ValueError(f"--{flag} {v}: must be a positive integer")
        if args.shots is not None and args.shots < 0:
            raise ValueError(f"--shots {args.shots}: must be 0 or more")
        if not Path(args.data_dir).is_dir():
            raise ValueError(f"--data_dir {args.data_dir} is not a directory")
        all_items = {s.name: tasks.load_task(s.name, args.data_dir, seed=args.seed) for s in specs}
        if args.out and lead:   # fail now, not after the whole evaluation
            _check_writable(Path(args.out))
        mesh = _mesh(args.mesh)
        t0 = time.time()
        lm = load_model(args.checkpoint, step=args.step, which=args.which, mesh=mesh)
        decoder = Decoder(lm.params, lm.cfg, lm.tokenizer, mesh=mesh, batch_size=args.batch_size)
        say(f"loaded {lm.source} checkpoint {args.checkpoint}" + (f" step {lm.step}" if lm.step is not None else "")
              + f" in {time.time() - t0:.1f} s; devices {jax.devices()[0].platform} x {jax.device_count()}")
        results: dict[str, dict[str, dict]] = {}
        records: list[dict] = []
        for spec in specs:
            items = all_items[spec.name][:args.limit]
            shots = tasks.fewshot_items(spec.name, args.data_dir, items,
                                        spec.default_shots if args.shots is None else args.shots, args.seed,
                                        pool=all_items[spec.name])
            budget = args.max_new_tokens or DEFAULT_BUDGET["generated" if spec.name == "generated" else spec.kind]
            opts = DecodeOptions(max_new_tokens=budget, think_tokens=args.think_tokens, temperature=args.temperature,
                                 think_temperature=lm.think_temperature if args.think_temperature is None else args.think_temperature,
                                 top_k=args.top_k, top_p=args.top_p,
                                 think_banned_ids=lm.think_ids.banned)
            for mode in modes:
                t1 = time.time()
                summary, recs = evaluate_task(decoder, spec, items, shots, mode, opts, samples=args.samples,
                                              seed=args.seed)
                results.setdefault(spec.name, {})[mode] = summary
                records += recs
                say(f"{spec.name} [{mode}]: pass@1 {100 * summary['pass@1']:.1f}% on {summary['n']} items "
                    f"({time.time() - t1:.1f} s)")
    except (ValueError, *LOAD_ERRORS) as e:   # TaskError, LoadError, bad flags: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    avgs = averages(results)
    if not lead:
        return 0
    print("\n" + format_table(results, avgs))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else (
        local_dirs(args.checkpoint)[0] / "eval" / f"eval-{stamp}.json" if lm.source == "run"
        else Path(f"eval-{stamp}.json"))
    payload = json.dumps({"checkpoint": str(args.checkpoint), "step": lm.step, "args": vars(args),
                          "results": results, "averages": avgs, "items": records}, indent=1)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(payload)
    except OSError as e:
        fallback = Path(f"eval-{stamp}.json").resolve()
        fallback.write_text(payload)
        print(f"error: cannot write {out} ({e.strerror}); predictions saved to {fallback} instead", file=sys.stderr)
        return 2
    print(f"predictions: {out}")
    return 0


def _check_writable(out: Path) -> None:
    """ValueError naming --out when its file cannot be created (checked before decoding starts)."""
    import tempfile

    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file path such as {out / 'eval.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}."):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror}); give a file path in a writable "
                         "directory") from None
