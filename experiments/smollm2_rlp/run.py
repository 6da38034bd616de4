"""RLP on SmolLM2-135M-Instruct: step-0 probes, pilots, and the replication against CPT. Resumable.

    python experiments/smollm2_rlp/run.py probe      --workdir runs/smollm2_rlp   # marker init x prompt, step 0
    python experiments/smollm2_rlp/run.py replicate  --workdir runs/smollm2_rlp   # pilots, then RLP vs CPT
    python experiments/smollm2_rlp/run.py report     --workdir runs/smollm2_rlp   # replication.md from what finished

Everything starts from the same model (`experiments/smollm2.py`: the GGUF of SmolLM2-135M-Instruct,
the generated corpus, the prompted setting). The work is cut into units (the start model's evaluation,
each pilot, each arm x seed) that each finish inside one session; a finished unit writes one JSON file
under experiments/smollm2_rlp/results/ (committed: curves, held-out metrics, sampled thoughts), and a
rerun of the same command, in this or a later session, skips it. A unit stopped midway resumes from
its checkpoint in WORKDIR/units if the machine still holds it, and restarts otherwise.

The evaluation is fixed here, before any run: held-out documents of the corpus's eval split
(`train.eval_batches` batches: NLL with and without a thought, information gain, next-token NLL), and
answers to held-out problems that never occur in training, directly and after a sampled thought: the
first EVAL_LIMIT of the corpus's held-out problems and the GSM8K-style problems written for this report
(`fresh/heldout.jsonl`). The pilot rule (`choose_pilot`) uses training rewards only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rlp_jax import (
    sharding,  # noqa: E402
    train,  # noqa: E402
)
from rlp_jax.data.pipeline import make_iterator  # noqa: E402
from rlp_jax.data.tokenizer import load_tokenizer  # noqa: E402
from rlp_jax.runs.config import RunConfig, load_experiment  # noqa: E402
from rlp_jax.runs.loading import LoadedModel  # noqa: E402
from rlp_jax.train import train_step  # noqa: E402
from rlp_jax.train.cli import EXIT_PREEMPTED  # noqa: E402

# Step-0 probe: (name, prompt style, think tokens, new-token init[, thought length]).
PROBES = (
    ("no_prompt/new_mean", "none", ("<think>", "</think>"), "mean"),
    ("no_prompt/new_pieces", "none", ("<think>", "</think>"), "pieces"),
    ("chat/new_mean", "chat", ("<think>", "</think>"), "mean"),
    ("chat/new_pieces", "chat", ("<think>", "</think>"), "pieces"),
    ("chat/reuse_unused_special", "chat", ("<jupyter_text>", "<jupyter_code>"), "mean"),
    ("text/new_pieces", "text", ("<think>", "</think>"), "pieces"),
    ("chat/new_pieces/T16", "chat", ("<think>", "</think>"), "pieces", 16),
    ("chat/new_pieces/T8", "chat", ("<think>", "</think>"), "pieces", 8),
    ("chat/new_pieces/T32", "chat", ("<think>", "</think>"), "pieces", 32),
)
# The first six probes were measured before the eval key became train.run_key(key, "eval", i) (as in
# training's evals); the held-out positions they score differ from the later rows'. Compare within a group.
PROBES_BEFORE_KEY_CHANGE = 6


def base_config(workdir: Path) -> RunConfig:
    """The recipe as this study ran it: positions by the `ema_band` rule (1-8 nats), the recipe's default
    until 2026-12-06 (now `uniform`, the paper's rule); pinned here so that reruns reproduce the units."""
    module = load_experiment("smollm2")
    cfg = module.prepare(module.config(), workdir)
    rollout = dataclasses.replace(cfg.rlp.rollout, position_rule="ema_band", ema_band=(1.0, 8.0))
    return dataclasses.replace(cfg, rlp=dataclasses.replace(cfg.rlp, rollout=rollout))


def variant(cfg: RunConfig, *, style=None, think_tokens=None, init=None, **train_kw) -> RunConfig:
    model = cfg.model
    if think_tokens is not None:
        model = dataclasses.replace(model, think_tokens=think_tokens)
    if init is not None:
        model = dataclasses.replace(model, new_token_init=init)
    rlp = cfg.rlp if style is None else dataclasses.replace(cfg.rlp, prompt=dataclasses.replace(cfg.rlp.prompt, style=style))
    return dataclasses.replace(cfg, model=model, rlp=rlp, train=dataclasses.replace(cfg.train, **train_kw))


def start_model(cfg: RunConfig) -> tuple[RunConfig, LoadedModel]:
    """The policy every run of `cfg` starts from, built as `train.run` builds it."""
    tokenizer = load_tokenizer(cfg.model.init_from, think_tokens=cfg.model.think_tokens)
    mcfg, params = train.build_model(cfg, tokenizer, train.run_key(jax.random.key(cfg.train.seed), "build"))
    return cfg, LoadedModel(mcfg, jax.device_put(params), tokenizer, "start", 0, cfg.model.init_from, run=cfg)


def step0_metrics(cfg: RunConfig, lm: LoadedModel | None = None) -> dict:
    """The held-out eval metrics of the untrained policy under `cfg` (the eval `train.run` logs)."""
    if lm is None:
        cfg, lm = start_model(cfg)
    tokenizer, mcfg, params = lm.tokenizer, lm.cfg, lm.params
    mesh = sharding.make_mesh(cfg.train.mesh)
    it = make_iterator(cfg.data, tokenizer, split="eval")
    batches = [sharding.global_batch(it.next(), mesh) for _ in range(cfg.train.eval_batches)]
    it.close()
    objective = train.objective_of(cfg, tokenizer)    # markers, prompt and bans, as `train.run` takes them
    out = train.evaluate_batches(train_step.make_eval_step(mcfg, objective), params, batches, cfg.train.seed)
    out["prompt_tokens"] = len(objective.ids.prompt)
    return out


PROBE_FILE = HERE / "probe.json"   # committed: a fresh checkout skips the probes already measured


def probe(workdir: Path) -> dict:
    path = PROBE_FILE
    results = json.loads(path.read_text()) if path.exists() else {}
    cfg = base_config(workdir)
    for name, style, markers, init, *length in PROBES:
        if name in results:
            continue
        t0 = time.time()
        v = variant(cfg, style=style, think_tokens=markers, init=init)
        if length:
            v = dataclasses.replace(v, rlp=dataclasses.replace(v.rlp, rollout=dataclasses.replace(
                v.rlp.rollout, thought_len=length[0])))
        results[name] = step0_metrics(v)
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(f"probe {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in results[name].items()), flush=True)
        path.write_text(json.dumps(results, indent=2))
    return results


# ------------------------------------------------------------------------------------------------
# Pilots and the replication (all fixed on 2026-12-03, before any of these runs)
#
# Scale: the recipe's rows halved twice (4 rows of 128 tokens a step instead of 8 x 256) so that one RLP
# run of 30 steps, its evaluation included, fits in ~15 minutes of 2 shared CPU cores: every unit of work
# must finish inside one session, because a session's machine (and its checkpoints) does not survive it.
# What survives is each unit's result file, committed under experiments/smollm2_rlp/results/.
# ------------------------------------------------------------------------------------------------
SCALE = {"data.batch_size": 4, "data.seq_len": 128, "train.steps": 30, "train.save_every": 30,
         "train.eval_every": 30}
# One setting changed at a time from the recipe (experiments/smollm2.py); pilots run at seed 0.
PILOTS = (
    ("lr1e-5", {}),
    ("lr1e-4", {"optim.lr": 1e-4}),
)
PILOT_RULE_STEPS = 10   # the pilot with the highest mean training reward over its last 10 steps wins
# Second pilots (fixed on 2026-12-04, after the replication and before any of these runs): the settings the
# issue lists that the first pilots did not try, one change each from the chosen pilot (lr 1e-5), seed 0.
# They do not change the replication's arms; they ask whether any of them makes the held-out info gain
# rise, so they evaluate every 10 steps (the held-out info-gain curve, same eval batches and key as every
# other unit) and report the training reward over the last 10 steps as the first pilots did.
PILOTS_EXTRA = (
    ("ntp1", {"rlp.loss.ntp_weight": 1.0}),
    ("uniform", {"rlp.rollout.position_rule": "uniform"}),
    ("G8", {"rlp.rollout.group_size": 8}),
    ("T64", {"rlp.rollout.thought_len": 64}),
)
PILOT_EXTRA_EVAL_EVERY = 10
# Confirmation (fixed on 2026-12-04 after pilot2-uniform's paired result, before these runs): the uniform
# pilot again at seeds 1 and 2, each followed by the same paired evaluation against the start model
# (PAIRED_BATCHES batches), so that training-seed noise is measured too, not only evaluation noise.
CONFIRM = ("uniform", (1, 2))
PAIRED_BATCHES = 32
SEEDS = (0, 1, 2)
MAIN_CPT = "cpt_paper"  # the paper's comparison: CPT for RLP's effective-token budget, every seed
EVAL_LIMIT = 100        # generated held-out problems scored per run (the first 100 of 200), plus all fresh ones
EVAL_THOUGHTS = 4       # thoughts sampled per problem for the with-thought accuracy
SAMPLES = 6             # thoughts shown per run, on the first fresh problems
FRESH = HERE / "fresh" / "heldout.jsonl"
RESULTS = HERE / "results"   # committed: one JSON per finished unit; a rerun skips them
CURVE_KEYS = ("reward/mean", "reward/s_pred", "reward/s_ema", "reward/frac_positive", "thought/mean_len",
              "thought/ended_fraction", "loss/total", "train/grad_norm", "policy/entropy_estimate")


def _override(cfg: RunConfig, changes: dict) -> RunConfig:
    from rlp_jax.runs.config import apply_overrides
    return apply_overrides(cfg, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in changes.items()])


def scaled_config(workdir: Path) -> RunConfig:
    return _override(base_config(workdir), SCALE)


def choose_pilot(results: dict[str, dict]) -> str | None:
    """The pilot rule (fixed before the pilots ran): highest mean `reward/mean` over the last
    PILOT_RULE_STEPS training steps; None until every pilot has a result. Held-out data plays no part."""
    if any(f"pilot-{name}" not in results for name, _ in PILOTS):
        return None
    def score(name):
        curve = [r["reward/mean"] for r in results[f"pilot-{name}"]["curves"] if "reward/mean" in r]
        return sum(curve[-PILOT_RULE_STEPS:]) / len(curve[-PILOT_RULE_STEPS:])
    return max((name for name, _ in PILOTS), key=score)


def units(cfg: RunConfig, results: dict[str, dict]) -> list[tuple[str, str, int, RunConfig]]:
    """(unit name, arm, seed, config) in the order they run: the pilots, then per seed RLP with the chosen
    setting and its matched CPT arms (cpt_flops at seed 0 only). Seed 0's RLP run is the chosen pilot."""
    from replication.run import _ntp, _seeded, matched_steps

    out = [(f"pilot-{name}", "pilot", 0, _seeded(_override(cfg, changes), 0)) for name, changes in PILOTS]
    chosen = choose_pilot(results)
    if chosen is None:
        return out
    rlp_cfg = _override(cfg, dict(PILOTS)[chosen])
    steps = matched_steps(rlp_cfg)
    for seed in SEEDS:
        base = _seeded(rlp_cfg, seed)
        if seed != 0:
            out.append((f"rlp-s{seed}", "rlp", seed, base))
        for arm in ("cpt_tokens", MAIN_CPT) + (("cpt_flops",) if seed == 0 else ()):
            out.append((f"{arm}-s{seed}", arm, seed, _ntp(base, steps[arm])))
    for name, changes in PILOTS_EXTRA:
        extra = _override(rlp_cfg, {**changes, "train.eval_every": PILOT_EXTRA_EVAL_EVERY})
        out.append((f"pilot2-{name}", "pilot2", 0, _seeded(extra, 0)))
    name, seeds = CONFIRM
    confirm = _override(rlp_cfg, {**dict(PILOTS_EXTRA)[name], "train.eval_every": PILOT_EXTRA_EVAL_EVERY})
    out += [(f"confirm-{name}-s{seed}", "confirm", seed, _seeded(confirm, seed)) for seed in seeds]
    return out


def load_results(prefix: str = "") -> dict[str, dict]:
    """The finished units (prefix ""), or the paired comparisons (prefix "paired-"), by name."""
    files = sorted(RESULTS.glob(f"{prefix}*.json")) if RESULTS.exists() else []
    return {p.stem: json.loads(p.read_text()) for p in files if prefix or not p.stem.startswith("paired-")}


def _answers(lm: LoadedModel, generated: Path, think_tokens: int, seed: int) -> dict:
    """Answer metrics on the generated held-out problems (`generated`, first EVAL_LIMIT) and on the fresh
    ones, and a few sampled thoughts on the fresh problems."""
    from rlp_jax.evaluate import heldout

    out = {name: heldout.model_answer_metrics(lm, path, think_tokens=think_tokens, thoughts=EVAL_THOUGHTS,
                                              seed=seed, limit=limit)
           for name, path, limit in (("generated", generated, EVAL_LIMIT), ("fresh", FRESH, None))}
    out["thoughts"] = heldout.sample_thoughts(lm, FRESH, n=SAMPLES, think_tokens=think_tokens, seed=seed)
    return out


def _write(name: str, result: dict, directory: Path = RESULTS) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(directory / f"{name}.json")
    print(f"result {name} written", flush=True)


def unit_curves(run_dir: Path, keys=CURVE_KEYS) -> dict:
    """A finished unit's training curves (`keys` per step), its held-out evals and its last eval."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r.get("split") == "eval"]
    return {"eval_curve": evals,
            "curves": [{"step": r["step"], **{k: r[k] for k in keys if k in r}} for r in recs if r.get("split") == "train"],
            "eval": evals[-1] if evals else {}}


def replicate(workdir: Path, max_units: int | None = None) -> bool:
    """Run every unit without a result file, in order; stops (resumably) on SIGTERM / Ctrl-C and then
    returns True (preempted)."""
    from rlp_jax.runs.loading import load_model

    cfg = scaled_config(workdir)
    generated = workdir / "data" / "heldout.jsonl"
    think = cfg.rlp.rollout.thought_len
    results = load_results()
    if "start" not in results:
        t0 = time.time()
        run_cfg, lm = start_model(cfg)
        row = {"name": "start", "arm": "start", "seed": None, "steps": 0, "eval": step0_metrics(run_cfg, lm),
               **_answers(lm, generated, think, 0)}
        row["seconds"] = round(time.time() - t0)
        _write("start", row)
        results["start"] = row
    done = 0
    while True:
        todo = [u for u in units(cfg, results) if u[0] not in results]
        if not todo or (max_units is not None and done >= max_units):
            return False
        name, arm, seed, run_cfg = todo[0]
        t0 = time.time()
        print(f"== {name}: objective={run_cfg.train.objective} steps={run_cfg.train.steps}", flush=True)
        run_dir = workdir / "units" / name
        if train.run(run_cfg, run_dir, experiment=f"smollm2_rlp/{name}").get("preempted"):
            return True
        lm = load_model(run_dir)
        row = {"name": name, "arm": arm, "seed": seed, "steps": run_cfg.train.steps,
               "lr": run_cfg.optim.lr, "thought_len": run_cfg.rlp.rollout.thought_len, **unit_curves(run_dir),
               **_answers(lm, generated, run_cfg.rlp.rollout.thought_len, seed)}
        row["seconds"] = round(time.time() - t0)
        _write(name, row)
        results[name] = row
        if arm == "confirm":
            paired(workdir, name, PAIRED_BATCHES)
        done += 1


def paired_metrics(cfg: RunConfig, models: dict[str, LoadedModel], batches: int) -> dict[str, dict]:
    """Per held-out batch, the eval metrics of each model on the SAME batches, positions and thought keys: `batches`
    batches of cfg's eval split, cfg's objective (position rule, markers, prompt) and training's eval keys
    (`train.run_key(seed, "eval", i)`). Returns {model: {metric: [batches] array}}."""
    import numpy as np

    tokenizer = next(iter(models.values())).tokenizer
    mesh = sharding.make_mesh(cfg.train.mesh)
    it = make_iterator(cfg.data, tokenizer, split="eval")
    data = [sharding.global_batch(it.next(), mesh) for _ in range(batches)]
    it.close()
    objective = train.objective_of(cfg, tokenizer)
    keys = [train.run_key(jax.random.key(cfg.train.seed), "eval", i) for i in range(batches)]
    out = {}
    for name, lm in models.items():
        step = train_step.make_eval_step(lm.cfg, objective)
        rows = [jax.device_get(step(lm.params, b, k)) for b, k in zip(data, keys)]
        out[name] = {key: np.array([float(r[key]) for r in rows]) for key in rows[0]}
    return out


def paired_diff(per: dict[str, dict], before: str, after: str, keys) -> dict:
    """after minus before per batch: the means, the mean difference and its standard error, per metric."""
    import numpy as np

    out = {}
    for key in keys:
        a, b = per[before][key], per[after][key]
        d = b - a
        out[key] = {before: float(a.mean()), after: float(b.mean()), "diff": float(d.mean()),
                    "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
    return out


def paired(workdir: Path, unit: str, batches: int) -> dict:
    """The held-out info gain of a finished unit's final policy against the start model on the SAME held-out
    positions and thought keys (`paired_metrics`); the paired per-batch differences give the noise. Written to
    results/paired-UNIT.json."""
    from rlp_jax.runs.loading import load_model

    cfg = scaled_config(workdir)
    run_cfg = next(u[3] for u in units(cfg, load_results()) if u[0] == unit)
    run_cfg, start = start_model(run_cfg)
    per = paired_metrics(run_cfg, {"start": start, "trained": load_model(workdir / "units" / unit)}, batches)
    out = {"unit": unit, "batches": batches, "rows_per_batch": run_cfg.data.batch_size,
           "position_rule": run_cfg.rlp.rollout.position_rule,
           **paired_diff(per, "start", "trained", ("eval/info_gain", "eval/nll_think", "eval/nll_no_think",
                                                    "eval/nll_tokens"))}
    _write(f"paired-{unit}", out)
    return out


DOC_METRICS = ("nll_tokens", "nll_no_think", "nll_think", "info_gain")
ANSWER_METRICS = ("acc_no_think", "acc_think", "answer_nll_no_think", "answer_gain", "answer_thought_len")


def flat_rows(results: dict[str, dict]) -> list[dict]:
    """One row per finished run for the replication tables: document metrics, then the answer metrics
    of both problem sets (`gen_*`, `fresh_*`); the chosen pilot is seed 0 of the arm `rlp`."""
    chosen = choose_pilot(results)
    rows = []
    for name, r in results.items():
        arm = r["arm"]
        if arm in ("pilot2", "confirm"):   # their own tables (`report`)
            continue
        if arm == "pilot":
            if name != f"pilot-{chosen}":
                continue
            arm = "rlp"
        row = {"arm": arm, "run": name, "seed": r["seed"], "train_steps": r["steps"]}
        row.update({k: r["eval"].get(f"eval/{k}") for k in DOC_METRICS})
        for prefix, key in (("gen", "generated"), ("fresh", "fresh")):
            row.update({f"{prefix}_{k}": r[key][k] for k in ANSWER_METRICS})
        rows.append(row)
    return rows


def plot_curves(results: dict[str, dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(n, r) for n, r in results.items() if r["arm"] in ("pilot", "rlp", "pilot2")]
    if not runs:
        return None
    keys = ("reward/mean", "reward/s_pred", "reward/s_ema", "reward/frac_positive", "thought/mean_len")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for name, r in runs:
        for ax, key in zip(axes, keys):
            pts = [(c["step"], c[key]) for c in r["curves"] if key in c]
            ax.plot(*zip(*pts), label=name, lw=1)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pilot2_table(results: dict[str, dict]) -> list[str]:
    """The second pilots against the chosen first pilot (seed 0, lr 1e-5): training reward over the first and
    last PILOT_RULE_STEPS steps, the held-out info gain at each evaluation, next-token NLL and accuracies."""
    base = results.get(f"pilot-{choose_pilot(results)}")
    lines = ["", f"## Second pilots (seed 0, {SCALE['train.steps']} steps, one change each from the chosen pilot; "
             "held-out eval every 10 steps)", "",
             "| pilot | change | reward, steps 1-10 | reward, last 10 | held-out info gain (step 10 / 20 / 30) | "
             "next-token NLL | acc generated (direct / think) | acc fresh | thought len |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = [("chosen pilot", "-", base)] if base else []
    rows += [(name, ", ".join(f"{k}={v}" for k, v in changes.items()), results.get(f"pilot2-{name}"))
             for name, changes in PILOTS_EXTRA]
    for name, change, r in rows:
        if r is None:
            lines.append(f"| {name} | {change} | not run yet | | | | | | |")
            continue
        rew = [c["reward/mean"] for c in r["curves"]]
        evals = r.get("eval_curve") or [r["eval"]]
        gains = " / ".join(f"{e['eval/info_gain']:.2f}" for e in evals)
        g, f = r["generated"], r["fresh"]
        lines.append(f"| {name} | {change} | {sum(rew[:PILOT_RULE_STEPS]) / PILOT_RULE_STEPS:.2f} | "
                     f"{sum(rew[-PILOT_RULE_STEPS:]) / PILOT_RULE_STEPS:.2f} | {gains} | {r['eval']['eval/nll_tokens']:.3f} | "
                     f"{100 * g['acc_no_think']:.1f}% / {100 * g['acc_think']:.1f}% | "
                     f"{100 * f['acc_no_think']:.1f}% / {100 * f['acc_think']:.1f}% | "
                     f"{r['eval']['eval/thought_len']:.1f} |")
    return lines


def report(workdir: Path) -> str:
    from replication.run import format_paired, format_summary, paired, summarise

    lines = ["## Step-0 probe (held-out documents, untrained policy, recipe scale 8 x 256)", "",
             "| setting | prompt tokens | NLL no think | NLL think | info gain | thought len |", "|---|---|---|---|---|---|"]
    for name, r in (json.loads(PROBE_FILE.read_text()) if PROBE_FILE.exists() else {}).items():
        lines.append(f"| {name} | {r['prompt_tokens']} | {r['eval/nll_no_think']:.3f} | {r['eval/nll_think']:.3f} | "
                     f"{r['eval/info_gain']:.3f} | {r['eval/thought_len']:.1f} |")
    results = load_results()
    lines += ["", f"## Pilots (seed 0, {SCALE['train.steps']} steps; rule: highest mean training reward over the "
              f"last {PILOT_RULE_STEPS} steps)", "",
              "| pilot | lr | reward, last 10 steps | held-out info gain | NLL no think | NLL think | chosen |",
              "|---|---|---|---|---|---|---|"]
    chosen = choose_pilot(results)
    for name, _ in PILOTS:
        r = results.get(f"pilot-{name}")
        if r is None:
            lines.append(f"| {name} | | not run yet | | | | |")
            continue
        rew = [c["reward/mean"] for c in r["curves"]][-PILOT_RULE_STEPS:]
        e = r["eval"]
        lines.append(f"| {name} | {r['lr']:g} | {sum(rew) / len(rew):.3f} | {e['eval/info_gain']:.3f} | "
                     f"{e['eval/nll_no_think']:.3f} | {e['eval/nll_think']:.3f} | {'yes' if name == chosen else ''} |")
    lines += pilot2_table(results)
    pairs_run = load_results("paired-")
    if pairs_run:
        lines += ["", "## Paired against the start model (`run.py paired`: the same held-out positions and thought "
                  "keys scored by both; trained minus start, mean ± standard error over batches)", "",
                  "| unit | batches x rows | position rule | info gain, start -> trained | info gain diff | "
                  "NLL think diff | NLL no think diff | next-token NLL diff |", "|---|---|---|---|---|---|---|---|"]
        for r in pairs_run.values():
            f = lambda k: f"{r[k]['diff']:+.3f} ± {r[k]['se']:.3f}"
            g = r["eval/info_gain"]
            lines.append(f"| {r['unit']} | {r['batches']} x {r['rows_per_batch']} | {r['position_rule']} | "
                         f"{g['start']:.3f} -> {g['trained']:.3f} | {f('eval/info_gain')} | {f('eval/nll_think')} | "
                         f"{f('eval/nll_no_think')} | {f('eval/nll_tokens')} |")
    rows = flat_rows(results)
    metrics = DOC_METRICS + tuple(f"{p}_{k}" for p in ("gen", "fresh") for k in ANSWER_METRICS)
    if rows:
        if "start" in results:
            rows.insert(0, rows.pop([r["run"] for r in rows].index("start")))
        lines += ["", "## Every finished run: mean ± sample std over seeds (nats; accuracies in %)", "",
                  format_summary(summarise(rows, metrics), metrics)]
        pairs = paired([r for r in rows if r["arm"] != "start"],
                       metrics=("nll_tokens", "info_gain", "gen_acc_no_think", "gen_acc_think", "fresh_acc_no_think",
                                "fresh_acc_think", "gen_answer_gain"))
        if pairs:
            lines += ["", "## RLP minus CPT, paired by seed: mean ± sample std of the differences (n seeds)", "",
                      format_paired(pairs)]
    for name in ("start", f"pilot-{chosen}" if chosen else None):
        if name in results:
            lines += ["", f"## Thoughts sampled by `{name}` (fresh problems)", ""]
            lines += [f"- {t}" for t in results[name]["thoughts"]]
    png = plot_curves(results, HERE / "curves.png")
    if png:
        lines += ["", f"Curves: `{png.relative_to(HERE.parent.parent)}`"]
    text = "\n".join(lines) + "\n"
    (HERE / "replication.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("probe", "replicate", "report", "paired"))
    p.add_argument("--unit", help="paired: a finished unit to compare with the start model (e.g. pilot2-uniform)")
    p.add_argument("--batches", type=int, default=32, help="paired: held-out eval batches")
    p.add_argument("--workdir", default="runs/smollm2_rlp")
    p.add_argument("--max-units", type=int, help="stop after this many units of the replication")
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.what == "probe":
        probe(workdir)
    elif args.what == "paired":
        print(json.dumps(paired(workdir, args.unit, args.batches), indent=1))
        return 0
    elif args.what == "replicate" and replicate(workdir, args.max_units):
        print(f"preempted: rerun the same command to resume ({RESULTS} holds the finished units)", file=sys.stderr)
        return EXIT_PREEMPTED
    print(report(workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
