"""SmolLM2 marker warm-start (issue 30, item 5): teach the markers by next-token training, gate, then RLP. Resumable.

    python experiments/smollm2_rlp/warmstart.py run     --workdir runs/smollm2_warm
    python experiments/smollm2_rlp/warmstart.py report  --workdir runs/smollm2_warm

Why: at step 0 an *empty* `<think></think>` already costs SmolLM2 2.4-3.1 nats, `</think>` is never sampled
(thoughts are cut at the limit) and pure RLP has no gradient that teaches the reader to resume after
`</think>` (`../shared/reviews/science-review.md`). A short next-token stage on text that contains the markers
where they belong gives the reader that skill before RLP starts.

Everything below was fixed on 2026-12-07, before any of these runs:
- Start: SmolLM2-135M-Instruct (the GGUF of `experiments/smollm2.py`), markers added; `<think>` from its
  spelling (`model.new_token_init=pieces`), `</think>` a copy of the row of `.` (`model.marker_rows`; tied
  embeddings, so it starts with `.`'s logit: a thought can end where a sentence could).
- Warm-start (NTP, unit `warm`): the smollm2 corpus regenerated with traces (30% of problem documents write
  their working as a thought at the answer) and asides (30% of the other documents: a thought that copies the
  2-6 words before it, then the text resumes), both laid out as RLP lays a thought (`corpus.thought_in_text`);
  WARM_STEPS steps of 8 x 128 tokens, AdamW lr 1e-4, 10 warmup steps, then constant.
- The setting RLP and every evaluation here use (`COMMON`): the plain corpus of the replication (no markers in
  it), positions drawn uniformly (the paper's rule) among word starts (`rlp.rollout.word_starts`: never a bare
  space, a digit inside a number or `<|im_end|>`), no prompt (the warm-start taught the markers inside plain
  text, which is what an unprompted reader sees), thoughts of at most T = 64 tokens at temperature 0.7, G = 4.
- **Gate** (`GATE`), on GATE_BATCHES held-out batches of the plain corpus at those positions: the empty-thought
  cost (NLL after `<think></think>` minus NLL without a thought) < 0.5 nats, and the share of sampled thoughts
  that end (sample `</think>` before T) > 50%. The same numbers for the model before the warm-start (unit
  `start`) show what the warm-start did.
- If the gate passes: RLP from the warm-start (`warm-rlp`: 30 steps of 4 x 128, lr 1e-5, `ntp_weight` 0, EMA
  tau 0.999, K = 1 per document), then the paired evaluation (`paired-warm-rlp`): the warm-start and the
  RLP policy on the same PAIRED_BATCHES held-out batches, positions and thought keys; RLP minus warm-start per
  batch, mean and standard error, for the information gain against no thought and against the empty thought.
  If the gate fails, RLP does not run and the report says so.
Variant 2 (fixed on 2026-12-07 after variant 1 failed its gate, before it ran; unit names prefixed `v2-`):
variant 1's warm-start never showed the reader an empty thought (every aside copied 2-6 words), and at lr 1e-4 it
took the no-thought NLL at the scored positions from 2.13 to 0.18 nats, leaving a thought almost nothing to gain.
Variant 2 changes those two settings only: asides copy 0-6 words (0 is the empty thought `word<think></think>
next`), lr 3e-5. The gate, the RLP arm and the paired evaluation are the same.
Results: one JSON per finished unit under experiments/smollm2_rlp/results/warmstart/ (committed; a rerun skips
them). A unit stopped midway resumes from WORKDIR/units/NAME if this machine still holds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rlp_jax import train  # noqa: E402
from rlp_jax.runs.config import RunConfig  # noqa: E402
from rlp_jax.train.cli import EXIT_PREEMPTED  # noqa: E402
from smollm2_rlp.run import (  # noqa: E402
    CURVE_KEYS,
    _override,
    _write as write_result,
    base_config,
    paired_diff,
    paired_metrics,
    start_model,
    step0_metrics,
    unit_curves,
)

RESULTS = HERE / "results" / "warmstart"
MARKER_ROWS = ["", "."]
COMMON = {"model.new_token_init": "pieces", "model.marker_rows": MARKER_ROWS, "rlp.prompt.style": "none",
          "rlp.rollout.position_rule": "uniform", "rlp.rollout.word_starts": True, "rlp.rollout.thought_len": 64,
          "rlp.rollout.group_size": 4, "rlp.rollout.positions_per_doc": 1, "rlp.rollout.temperature": 0.7,
          "data.seq_len": 128}
WARM_STEPS = 150
WARM = {"train.objective": "ntp", "train.steps": WARM_STEPS, "train.save_every": 25, "train.eval_every": WARM_STEPS,
        "train.eval_batches": 1, "data.batch_size": 8, "optim.warmup_steps": 10,
        "optim.schedule": "constant"}
# Per variant (unit-name prefix): the warm-start's lr and the words an aside copies (min, max).
VARIANTS = {"": {"lr": 1e-4, "aside_words": (2, 6)}, "v2-": {"lr": 3e-5, "aside_words": (0, 6)}}
TRACE_FRACTION = 0.3   # problem documents of the warm-start corpus whose working is a thought at the answer
ASIDE_FRACTION = 0.3   # other documents of the warm-start corpus given an aside
RLP_STEPS = 30
RLP = {"train.objective": "rlp", "train.steps": RLP_STEPS, "train.save_every": 10, "train.eval_every": 10,
       "train.eval_batches": 4, "data.batch_size": 4, "optim.lr": 1e-5, "rlp.loss.ntp_weight": 0.0}
GATE_BATCHES = 16
PAIRED_BATCHES = 32
GATE = {"empty_thought_cost_below": 0.5, "ended_fraction_above": 0.5}


def gate_of(metrics: dict) -> dict:
    """The pre-registered gate on a model's held-out eval metrics."""
    cost = metrics["eval/nll_empty_think"] - metrics["eval/nll_no_think"]
    ended = metrics["eval/ended_fraction"]
    return {"empty_thought_cost": cost, "ended_fraction": ended,
            "passed": bool(cost < GATE["empty_thought_cost_below"] and ended > GATE["ended_fraction_above"])}


def configs(workdir: Path, variant: str = "") -> dict[str, RunConfig]:
    """The start (what the warm-start trains from), the variant's warm-start, its RLP arm and the evaluation
    setting (units under WORKDIR/units/VARIANT...)."""
    from rlp_jax.data.corpus import build_corpus

    settings = VARIANTS[variant]
    base = _override(base_config(workdir), COMMON)   # the smollm2 recipe, its plain corpus under WORKDIR/data
    warm_data = workdir / f"{variant}data_warm"
    if not (warm_data / "train.jsonl").exists():
        build_corpus(warm_data, num_train_docs=20_000, num_eval_problems=200, seed=0, think_fraction=TRACE_FRACTION,
                     aside_fraction=ASIDE_FRACTION, aside_words=settings["aside_words"])
    warm = _override(base, {**WARM, "optim.lr": settings["lr"]})
    source = dataclasses.replace(warm.data.sources[0], path=str(warm_data / "train.jsonl"), name="warm")
    warm = dataclasses.replace(warm, data=dataclasses.replace(warm.data, sources=(source,)))
    rlp = _override(base, {**RLP, "model.init_from": str(workdir / "units" / f"{variant}warm")})
    return {"start": _override(base, RLP), "warm": warm, "rlp": rlp,
            "eval": _override(rlp, {"train.eval_batches": GATE_BATCHES})}


def _write(name: str, row: dict) -> None:
    write_result(name, row, RESULTS)


def _read(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _train(cfg: RunConfig, workdir: Path, name: str) -> dict | None:
    """Train a unit (resumable); its curves, or None when preempted."""
    run_dir = workdir / "units" / name
    if train.run(cfg, run_dir, experiment=f"smollm2_warmstart/{name}").get("preempted"):
        return None
    curves = unit_curves(run_dir, CURVE_KEYS + ("loss/ntp", "train/loss"))
    return {"curves": curves["curves"], "eval_curve": curves["eval_curve"]}


def run_variant(workdir: Path, variant: str) -> bool:
    """The variant's warm-start, gate, RLP and paired evaluation, each unless its result exists; True when
    preempted (rerun to resume)."""
    from rlp_jax.runs.loading import load_model

    cfg = configs(workdir, variant)
    warm_name, rlp_name = f"{variant}warm", f"{variant}warm-rlp"
    if _read(warm_name) is None:
        t0 = time.time()
        trained = _train(cfg["warm"], workdir, warm_name)
        if trained is None:
            return True
        metrics = step0_metrics(cfg["eval"], load_model(workdir / "units" / warm_name))
        _write(warm_name, {"name": warm_name, "steps": WARM_STEPS, "lr": cfg["warm"].optim.lr,
                           "aside_words": VARIANTS[variant]["aside_words"], **trained, "eval": metrics,
                           "gate": gate_of(metrics), "seconds": round(time.time() - t0)})
    gate = _read(warm_name)["gate"]
    print(f"{warm_name} gate: {gate}", flush=True)
    if gate["passed"] and _read(rlp_name) is None:
        t0 = time.time()
        trained = _train(cfg["rlp"], workdir, rlp_name)
        if trained is None:
            return True
        _write(rlp_name, {"name": rlp_name, "steps": RLP_STEPS, **trained, "seconds": round(time.time() - t0)})
    if gate["passed"] and _read(f"paired-{rlp_name}") is None:
        t0 = time.time()
        per = paired_metrics(cfg["eval"], {"warm": load_model(workdir / "units" / warm_name),
                                           "rlp": load_model(workdir / "units" / rlp_name)}, PAIRED_BATCHES)
        per_batch = {m: {k: v.tolist() for k, v in d.items()} for m, d in per.items()}
        _write(f"paired-{rlp_name}", {"batches": PAIRED_BATCHES, "rows_per_batch": cfg["eval"].data.batch_size,
                                      **paired_diff(per, "warm", "rlp", sorted(per["warm"])),
                                      "per_batch": per_batch, "seconds": round(time.time() - t0)})
    return False


def run(workdir: Path) -> bool:
    """Every variant's units without a result, in order, then the start model's gate numbers; True when
    preempted (rerun to resume)."""
    for variant in VARIANTS:
        if run_variant(workdir, variant):
            return True
    if _read("start") is None:
        t0 = time.time()
        cfg = configs(workdir)
        _, lm = start_model(cfg["start"])
        metrics = step0_metrics(cfg["eval"], lm)
        _write("start", {"name": "start", "eval": metrics, "gate": gate_of(metrics), "seconds": round(time.time() - t0)})
    return False


def report() -> str:
    lines = ["## SmolLM2 marker warm-start (`experiments/smollm2_rlp/warmstart.py`)", "",
             f"Gate (fixed before the runs): empty-thought cost < {GATE['empty_thought_cost_below']} nats and ended "
             f"fraction > {GATE['ended_fraction_above']:.0%}, on {GATE_BATCHES} held-out batches (uniform word-start "
             "positions, no prompt, T = 64, G = 4).", "",
             "| model | NLL no think | NLL empty thought | empty-thought cost | NLL think | info gain | info gain vs empty "
             "| thought len | ended | gate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("start", *(f"{v}warm" for v in VARIANTS)):
        r = _read(name)
        if r is None:
            lines.append(f"| {name} | not run yet | | | | | | | | |")
            continue
        e, g = r["eval"], r["gate"]
        lines.append(f"| {name} | {e['eval/nll_no_think']:.3f} | {e['eval/nll_empty_think']:.3f} | "
                     f"{g['empty_thought_cost']:.3f} | {e['eval/nll_think']:.3f} | {e['eval/info_gain']:.3f} | "
                     f"{e['eval/info_gain_vs_empty']:.3f} | {e['eval/thought_len']:.1f} | {g['ended_fraction']:.1%} | "
                     f"{'passed' if g['passed'] else 'failed'} |")
    for variant in VARIANTS:
        p = _read(f"paired-{variant}warm-rlp")
        if p is None:
            continue
        lines += ["", f"Paired, RLP ({RLP_STEPS} steps) minus the warm-start `{variant}warm`, {p['batches']} batches x "
                  f"{p['rows_per_batch']} rows (mean ± standard error over batches):", "",
                  "| metric | warm-start | RLP | difference |", "|---|---|---|---|"]
        for key in ("eval/info_gain", "eval/info_gain_vs_empty", "eval/nll_think", "eval/nll_empty_think",
                    "eval/nll_no_think", "eval/nll_tokens", "eval/thought_len", "eval/ended_fraction"):
            lines.append(f"| {key} | {p[key]['warm']:.3f} | {p[key]['rlp']:.3f} | {p[key]['diff']:+.3f} ± "
                         f"{p[key]['se']:.3f} |")
    text = "\n".join(lines) + "\n"
    if RESULTS.exists():
        (RESULTS / "report.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("run", "report"))
    p.add_argument("--workdir", default="runs/smollm2_warm")
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.what == "run" and run(workdir):
        print(f"preempted: rerun the same command to resume ({RESULTS} holds the finished units)", file=sys.stderr)
        return EXIT_PREEMPTED
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
