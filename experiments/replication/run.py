"""Small-scale replication: RLP vs compute-matched continued pretraining (CPT) from one NTP checkpoint.

    python experiments/replication/run.py --workdir runs/replication [--seeds 0,1,2] [--no-ablations]

Everything uses the replication's recipe (`recipe.py` here: the demo as it was until 2026-12-06; generated
corpus, `small` Qwen3-style model, CPU):
1. WORKDIR/pretrain: stage 1, next-token pretraining from scratch (shared by every arm).
2. From its final checkpoint, per seed (train.seed and data.shuffle_seed):
   rlp          the demo's RLP stage (G = 4, tau = 0.99)
   cpt_tokens   NTP for the same steps and batch: the same input tokens as RLP
   cpt_paper    NTP for the paper's effective-token budget of RLP (`plan.effective_tokens`: K G (L + T)
                per row + L, i.e. T_flop = n_rollouts * l_seq * batch * iters + T_inp)
   cpt_flops    NTP for the model FLOPs of the RLP run (`plan.rlp_step_flops` / `plan.ntp_step_flops`)
   The CPT arms use RLP's optimizer settings (AdamW, same lr and warmup).
3. Ablations (seed 0): G = 2 and 8; EMA tau = 0.999 and a frozen teacher (tau = 1: the stage-1 model);
   and, every seed, `rlp_ban_special`: RLP with eos/bos/pad banned inside thoughts
   (rollout.ban_special_tokens, the diagnosis in REPORT.md).
4. Evaluation (`rlp_jax.evaluate.heldout`): held-out documents (NLL without/with a thought, info gain) and
   held-out problems that never occur in training (accuracy answering directly and after a sampled
   thought; answer NLL). Writes WORKDIR/results.json, WORKDIR/results.md and WORKDIR/*.png.
Runs that already finished are skipped (their evaluation is cached in RUN/heldout_eval.json), so an
interrupted replication resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from rlp_jax import plan, train
from rlp_jax.evaluate import heldout
from rlp_jax.runs.config import RunConfig, load_experiment
from rlp_jax.runs.loading import model_config
from rlp_jax.train.cli import EXIT_PREEMPTED


def _seeded(cfg: RunConfig, seed: int) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed),
                               data=dataclasses.replace(cfg.data, shuffle_seed=seed))


def _ntp(cfg: RunConfig, steps: int) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, objective="ntp", steps=steps,
                                                              save_every=steps, eval_every=steps))


def matched_steps(rlp_cfg: RunConfig) -> dict[str, int]:
    """NTP steps (same batch and sequence length) matching the RLP run by tokens, effective tokens, FLOPs."""
    m = model_config(dataclasses.replace(rlp_cfg.model, init_from=None))
    if rlp_cfg.train.tokenizer:   # the preset's vocabulary is replaced by the tokenizer's, as in training
        from rlp_jax.data.tokenizer import load_tokenizer
        m = m.replace(vocab_size=load_tokenizer(rlp_cfg.train.tokenizer).vocab_size)
    b, length, steps = rlp_cfg.data.batch_size, rlp_cfg.data.seq_len, rlp_cfg.train.steps
    rlp_flops = sum(plan.rlp_step_flops(m, rlp_cfg.rlp, b, length).values())
    return {"cpt_tokens": steps,
            "cpt_paper": round(plan.effective_tokens(rlp_cfg.rlp, b, length) * steps / (b * length)),
            "cpt_flops": round(rlp_flops * steps / plan.ntp_step_flops(m, b, length))}


def arms(rlp_cfg: RunConfig, seeds: list[int], ablations: bool) -> list[tuple[str, str, int, RunConfig]]:
    """(arm, run name, seed, config) of every run after stage 1."""
    # The published runs sampled thoughts without banning special tokens (the default since): reproduce them.
    rlp_cfg = dataclasses.replace(rlp_cfg, rlp=dataclasses.replace(rlp_cfg.rlp, rollout=dataclasses.replace(
        rlp_cfg.rlp.rollout, ban_special_tokens=False)))
    steps = matched_steps(rlp_cfg)
    out = []
    for s in seeds:
        base = _seeded(rlp_cfg, s)
        out.append(("rlp", f"rlp-s{s}", s, base))
        out += [(arm, f"{arm}-s{s}", s, _ntp(base, n)) for arm, n in steps.items()]
    if ablations:
        ro, r = rlp_cfg.rlp.rollout, rlp_cfg.rlp
        for g in (2, 8):
            out.append((f"rlp_G{g}", f"rlp_G{g}-s0", 0, dataclasses.replace(
                _seeded(rlp_cfg, 0), rlp=dataclasses.replace(r, rollout=dataclasses.replace(ro, group_size=g)))))
        for name, tau in (("rlp_tau0.999", 0.999), ("rlp_frozen_teacher", 1.0)):
            out.append((name, f"{name}-s0", 0, dataclasses.replace(_seeded(rlp_cfg, 0),
                                                                   rlp=dataclasses.replace(r, ema_decay=tau))))
        # Diagnosis (REPORT.md): thoughts sampled with the end-of-document token banned, every seed.
        ban = dataclasses.replace(r, rollout=dataclasses.replace(ro, ban_special_tokens=True))
        for s in seeds:
            out.append(("rlp_ban_special", f"rlp_ban_special-s{s}", s,
                        dataclasses.replace(_seeded(rlp_cfg, s), rlp=ban)))
    return out


def _evaluate(run_dir: Path, data_dir: Path, think_tokens: int) -> dict:
    cache = run_dir / "heldout_eval.json"
    step = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    if cache.exists():
        row = json.loads(cache.read_text())
        if row.get("step") == step:
            return row
    row = heldout.evaluate_run(run_dir, data_dir / "heldout.jsonl", think_tokens=think_tokens)
    cache.write_text(json.dumps(row, indent=2))
    return row


METRICS = ("nll_tokens", "nll_no_think", "nll_think", "info_gain", "acc_no_think", "acc_think", "answer_nll_no_think",
           "answer_nll_think", "answer_gain", "answer_thought_len")


def summarise(rows: list[dict], metrics=METRICS) -> list[dict]:
    """Mean and sample std over seeds per arm (std 0 for single-seed arms)."""
    by_arm: dict[str, list[dict]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    out = []
    for arm, rs in by_arm.items():
        agg = {"arm": arm, "seeds": len(rs), "steps": rs[0]["train_steps"]}
        for k in metrics:
            vals = np.array([r[k] for r in rs if r.get(k) is not None], float)
            agg[k] = float(vals.mean()) if vals.size else None
            agg[k + "_std"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        out.append(agg)
    return out


def format_summary(summary: list[dict], metrics=METRICS) -> str:
    cols = [("steps", "CPT/RLP steps")] + [(k, k) for k in metrics]
    lines = ["| arm | seeds | " + " | ".join(c for _, c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for a in summary:
        cells = [str(a["steps"])]
        for k in metrics:
            v, sd = a.get(k), a.get(k + "_std", 0.0)
            scale, unit = (100, "%") if "acc" in k else (1, "")
            cells.append("-" if v is None else f"{scale * v:.2f}{unit} ± {scale * sd:.2f}")
        lines.append(f"| {a['arm']} | {a['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rows: list[dict], metrics=("nll_tokens", "nll_no_think", "info_gain", "acc_no_think", "acc_think",
                                       "answer_nll_no_think", "answer_gain")) -> list[dict]:
    """Per CPT arm: mean and std over seeds of (RLP - CPT) of each metric, paired by seed (the
    held-out document batches depend on the data seed; the held-out problems do not)."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    rlp_seeds = sorted(s for a, s in by if a == "rlp")
    out = []
    for arm in sorted({a for a, _ in by if a.startswith("cpt")}):
        agg = {"arm": arm}
        for k in metrics:
            d = np.array([by[("rlp", s)][k] - by[(arm, s)][k] for s in rlp_seeds
                          if (arm, s) in by and by[("rlp", s)].get(k) is not None and by[(arm, s)].get(k) is not None])
            agg[k] = (float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else 0.0, int(d.size))
        out.append(agg)
    return out


def format_paired(pairs: list[dict]) -> str:
    keys = [k for k in pairs[0] if k != "arm"] if pairs else []
    lines = ["| RLP minus | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for p in pairs:
        cells = []
        for k in keys:
            m, sd, n = p[k]
            scale, unit = (100, " pt") if "acc" in k else (1, "")
            cells.append(f"{scale * m:+.3f}{unit} ± {scale * sd:.3f} (n={n})")
        lines.append(f"| {p['arm']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(workdir: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in rows:
        if not r["arm"].startswith("rlp"):
            continue
        recs = [json.loads(x) for x in (workdir / r["run"] / "metrics.jsonl").read_text().splitlines()]
        tr = [x for x in recs if x.get("split") == "train"]
        for ax, key in zip(axes, ("reward/mean", "thought/mean_len", "reward/frac_positive")):
            steps = [x["step"] for x in tr if key in x]
            ax.plot(steps, [x[key] for x in tr if key in x], label=r["run"], lw=1)
            ax.set_title(key)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(workdir / "rlp_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    summary = summarise(rows)
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(summary))
    for i, (k, label) in enumerate((("acc_no_think", "answer directly"), ("acc_think", "after a thought"))):
        ax.bar(x + (i - 0.5) * 0.4, [100 * a[k] for a in summary], 0.4,
               yerr=[100 * a[k + "_std"] for a in summary], label=label, capsize=3)
    ax.set_xticks(x, [a["arm"] for a in summary], rotation=20, fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend()
    fig.tight_layout()
    paths.append(workdir / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/replication/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/replication")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the main arms")
    p.add_argument("--no-ablations", action="store_true", help="skip the G and EMA ablations")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild results.md and the plots from an existing WORKDIR/results.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the RLP arm's config (as in rlp_jax.train), e.g. train.steps=40")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"error: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).resolve()
    if args.report_only:
        if not (workdir / "results.json").exists():
            print(f"error: {workdir / 'results.json'} does not exist; run without --report-only first", file=sys.stderr)
            return 2
        write_report(workdir, json.loads((workdir / "results.json").read_text())["rows"])
        return 0
    demo = load_experiment(str(Path(__file__).resolve().parent / "recipe.py"))
    try:
        from rlp_jax.runs.config import apply_overrides

        cfg = demo.prepare(apply_overrides(demo.config(), args.set), workdir)
        (pre_name, pre_cfg), (_, rlp_cfg) = demo.stages(cfg, workdir)
        t0 = time.time()
        print(f"== {pre_name}: {pre_cfg.train.steps} NTP steps")
        if train.run(pre_cfg, workdir / pre_name, experiment=f"replication/{pre_name}").get("preempted"):
            return EXIT_PREEMPTED
        plan_runs = arms(rlp_cfg, seeds, not args.no_ablations)
        for arm, name, seed, run_cfg in plan_runs:
            print(f"== {name}: objective={run_cfg.train.objective} steps={run_cfg.train.steps}")
            if train.run(run_cfg, workdir / name, experiment=f"replication/{name}").get("preempted"):
                return EXIT_PREEMPTED
        train_s = time.time() - t0
        think = rlp_cfg.rlp.rollout.thought_len
        rows = [{"arm": "ntp_stage1", "run": pre_name, "seed": None, "train_steps": 0,
                 **_evaluate(workdir / pre_name, workdir / "data", think)}]
        for arm, name, seed, run_cfg in plan_runs:
            rows.append({"arm": arm, "run": name, "seed": seed, "train_steps": run_cfg.train.steps,
                         **_evaluate(workdir / name, workdir / "data", think)})
    except train.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (workdir / "results.json").write_text(json.dumps({"rows": rows, "summary": summarise(rows),
                                                      "matched_steps": matched_steps(rlp_cfg),
                                                      "wall_seconds": time.time() - t0,
                                                      "train_seconds": train_s}, indent=2))
    write_report(workdir, rows)
    print(f"wall time {time.time() - t0:.0f} s")
    return 0


def write_report(workdir: Path, rows: list[dict]) -> None:
    """results.md (per-arm means, paired RLP - CPT differences) and the plots, printed too."""
    text = format_summary(summarise(rows)) + "\n\n" + format_paired(paired(rows)) + "\n"
    (workdir / "results.md").write_text(text)
    pngs = plot(workdir, rows)
    print("\n" + text)
    print(f"results: {workdir / 'results.json'}, {workdir / 'results.md'}; plots: {', '.join(map(str, pngs))}")


if __name__ == "__main__":
    sys.exit(main())
