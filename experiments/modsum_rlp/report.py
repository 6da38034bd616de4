"""RESULTS.md and the curves of the modsum study from the finished units in results/seed<N>/ (run.py report).

The criteria are evaluated exactly as run.py's CRITERIA states them, on the per-problem arrays the units saved
(the same 512 held-out problems and thought keys for the start model, RLP and CPT of a seed, so differences
are paired); a seed that has not finished is listed as such, never extrapolated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _load(seed_dir: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in seed_dir.glob("*.json")}


def _ci(x, seed=0):
    import run

    from rlp_jax.rlp.think_eval import bootstrap_ci

    return bootstrap_ci(np.asarray(x, np.float64), n=run.BOOTSTRAP, seed=seed)


def _rows(ev: dict, key: str) -> np.ndarray:
    return np.asarray(ev["answer_rows"][key], np.float64)


def _fmt(ci, pct=False):
    m, lo, hi = ci
    f = (lambda v: f"{100 * v:+.1f}") if pct else (lambda v: f"{v:+.3f}")
    return f"{f(m)} [{f(lo)}, {f(hi)}]"


def _excludes_zero_above(ci) -> bool:
    return ci[1] > 0


def seed_verdicts(units: dict) -> dict:
    """S1 and S2's per-seed parts from one seed's units (stage1 = the start model, rlp, cpt)."""
    start, rlp, cpt = units["stage1"], units.get("rlp"), units.get("cpt")
    out = {"start_gain": _ci(_rows(start, "info_gain"))}
    if rlp is not None:
        out["rlp_gain"] = _ci(_rows(rlp, "info_gain"))
        out["rlp_gain_vs_start"] = _ci(_rows(rlp, "info_gain") - _rows(start, "info_gain"))
        out["rlp_gain_vs_empty"] = _ci(_rows(rlp, "info_gain_vs_empty"))
        out["S1"] = all(_excludes_zero_above(out[k]) for k in ("rlp_gain", "rlp_gain_vs_start", "rlp_gain_vs_empty"))
        # Not a criterion (added after protocol 1's curves): the answer's log-prob after RLP's thought against the
        # start model's without one. The gains above are relative to each model's own no-thought reading, which
        # RLP can lower too (no loss trains it).
        out["rlp_think_vs_start_direct"] = _ci(_rows(rlp, "lp_think") - _rows(start, "lp_none"))
    if rlp is not None and cpt is not None:
        out["acc_diff"] = _ci(_rows(rlp, "acc_think") - _rows(cpt, "acc_think"))
        best = max(("acc_no_think", "acc_greedy", "acc_think"), key=lambda k: cpt["answer"][k])
        out["cpt_best"] = best
        out["acc_diff_best"] = _ci(_rows(rlp, "acc_think") - _rows(cpt, best))
        out["cpt_gain"] = _ci(_rows(cpt, "info_gain"))
    return out


TABLE_KEYS = (("nll_none", "NLL direct", False), ("nll_empty", "NLL after <think></think>", False),
              ("nll_think", "NLL after sampled thought", False), ("acc_no_think", "acc direct", True), ("acc_empty", "acc empty thought", True),
              ("acc_greedy", "acc greedy thought", True), ("acc_think", "acc sampled thought", True),
              ("info_gain", "gain vs no thought", False), ("info_gain_vs_empty", "gain vs empty", False),
              ("nll_correct_thought", "NLL after right thought", False),
              ("nll_wrong_thought", "NLL after wrong thought", False), ("thought_ok", "thought states right answer", True),
              ("thought_len", "thought len", False), ("ended", "ended", True))


def _model_table(units: dict) -> list[str]:
    names = [("start (stage 1)", "stage1"), ("RLP", "rlp"), ("CPT (FLOP-matched)", "cpt")]
    lines = ["| model | step | " + " | ".join(t for _, t, _ in TABLE_KEYS) + " | uniform-position gain | uniform gain vs empty |",
             "|" + "---|" * (len(TABLE_KEYS) + 4)]
    for label, key in names:
        if key not in units:
            continue
        a, u = dict(units[key]["answer"]), units[key].get("uniform", {})
        a.update(nll_none=-a["lp_none"], nll_empty=-a["lp_empty"], nll_think=-a["lp_think"])
        cells = [(f"{100 * a[k]:.1f}%" if pct else f"{a[k]:.3f}") if k in a else "-" for k, _, pct in TABLE_KEYS]
        lines.append(f"| {label} | {units[key]['step']} | " + " | ".join(cells)
                     + f" | {u.get('info_gain', float('nan')):.3f} | {u.get('info_gain_vs_empty', float('nan')):.3f} |")
    return lines


def _partial(p: dict) -> list[str]:
    """An RLP arm stopped before its end: its curve evaluations, labelled as such."""
    lines = [f"RLP was stopped at step {p['stopped_at_step']} ({p['note']}). Its curve evaluations:", "",
             "| RLP step | acc direct | acc greedy thought | acc sampled thought | gain vs no thought | gain vs empty | thought len |",
             "|---|---|---|---|---|---|---|"]
    for c in p["curve"]:
        lines.append(f"| {c['step']} | {100 * c['acc_no_think']:.1f}% | {100 * c['acc_greedy']:.1f}% | "
                     f"{100 * c['acc_think']:.1f}% | {c['info_gain']:+.3f} | {c['info_gain_vs_empty']:+.3f} | "
                     f"{c['thought_len']:.1f} |")
    return lines + [""]


def _plot(all_units: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes.ravel()
    for seed, units in sorted(all_units.items()):
        rlp = units.get("rlp") or units.get("rlp_partial")
        if rlp is None:
            continue
        tc = rlp["train_curve"]
        steps = np.array([m["step"] for m in tc])
        w = min(20, len(steps))
        smooth = lambda v: np.convolve(v, np.ones(w) / w, mode="valid")   # noqa: E731
        for i, (k, title) in enumerate((("reward/mean", "RLP training reward (nats, 20-step mean)"),
                                        ("thought/mean_len", "RLP thought length (training)"),
                                        ("thought/ended_fraction", "RLP ended fraction (training)"))):
            v = np.array([m[k] for m in tc])
            ax[i].plot(steps[w - 1:], smooth(v), color=f"C{seed}", label=f"seed {seed}")
            ax[i].set_title(title)
            ax[i].set_xlabel("RLP step")
        for arm, style in (("rlp", "-"), ("cpt", "--")):
            ev = units.get(arm) or (units.get("rlp_partial") if arm == "rlp" else None)
            if ev is None:
                continue
            total = ev["curve"][-1]["step"] or 1
            x = [c["step"] / total for c in ev["curve"]]           # fraction of the arm's (matched) FLOPs
            for j, (k, title) in enumerate((("info_gain", "answer-position gain vs no thought (128 held-out)"),
                                            ("info_gain_vs_empty", "answer-position gain vs empty thought"),
                                            ("acc_think", "accuracy after a sampled thought"))):
                ax[3 + j].plot(x, [c[k] for c in ev["curve"]], style, marker="o", color=f"C{seed}",
                               label=f"{arm.upper()} seed {seed}")
                ax[3 + j].set_title(title)
                ax[3 + j].set_xlabel("fraction of the arm's FLOPs (RLP and CPT matched)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


PROTOCOLS = {"v1": (1, "Protocol 1 (as first registered; seed 0 only: its defect led to protocol 2)"),
             "v2": (2, "Protocol 2 (protocol 1 with thoughts restricted to the task's tokens; see run.py)"),
             "v2_ntp": (2, "Protocol 2, variant ntp (our extension: + 0.1 x next-token loss in the RLP arm; see run.py)"),
             "v2_lr2e-5": (2, "Protocol 2, variant lr2e-5 (the RLP arm at lr 2e-5 instead of 1e-4; see run.py)")}


def write_report() -> Path:
    import run

    lines = ["# RLP where thinking is useful: running sums mod 3 (pre-registered)", "",
             "Made by `python experiments/modsum_rlp/run.py report` from `results/`; each seed by "
             "`python experiments/modsum_rlp/run.py seed --seed N --workdir runs/modsum_rlp`. The settings, the gate "
             "and the criteria are the constants at the top of `run.py`, committed before any run.", "",
             "## Criteria (fixed before any run)", "", "```", run.CRITERIA, "```", ""]
    for tag, (protocol, title) in PROTOCOLS.items():
        if (RESULTS / tag).is_dir():
            lines += [f"# {title}", ""] + _protocol_report(run, protocol, tag)
    out = HERE / "RESULTS.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return out


def _protocol_report(run, protocol: int, tag: str) -> list[str]:
    root = RESULTS / tag
    all_units = {int(d.name[4:]): _load(d) for d in sorted(root.glob("seed*")) if (d / "stage1.json").exists()}
    lines, verdicts, pooled_diffs = [], {}, []
    for seed, units in sorted(all_units.items()):
        st = units["stage1"]
        trained = ("protocol 1's stage-1 model of this seed" if st.get("reused_stage1")
                   else f"{st['train_seconds']:.0f} s of training")
        lines += [f"## Seed {seed}", "",
                  f"Stage-1 gate ({run.GATE}): measured {st['gate_measured']} -> "
                  f"**{'passed' if st['gate_passed'] else 'FAILED'}** ({trained}).", ""]
        if "first_build" in st:
            lines += [f"This stage-1 model is a rebuild: the first build's run directory did not survive its session, "
                      f"and retraining with the same data, seed and config is not bit-reproducible (the first build "
                      f"measured {st['first_build']['gate_measured']}, gate "
                      f"{'passed' if st['first_build']['gate_passed'] else 'FAILED'}). The arms ran from the "
                      "rebuilt model, and every number of this seed, the start row included, is the rebuilt model's.",
                      ""]
        if not st["gate_passed"]:
            lines += ["No RLP or CPT run follows from a model that fails the gate.", ""]
            continue
        if "rlp_partial" in units:
            lines += _partial(units["rlp_partial"])
        v = seed_verdicts(units)
        verdicts[seed] = v
        lines += _model_table(units) + [""]
        if "flops" in units:
            f = units["flops"]
            wall = {k: units[k]["train_seconds"] for k in ("rlp", "cpt") if k in units}
            lines += [f"FLOP matching: mean RLP thought length {f['mean_thought_len']:.1f} tokens -> "
                      f"{f['rlp_step_flops']:.3g} FLOPs per RLP step, {f['ntp_step_flops']:.3g} per CPT step; "
                      f"RLP {units['rlp']['steps']} steps = CPT {f['cpt_steps']} steps ({f['rlp_total_flops']:.3g} FLOPs). "
                      f"Wall clock (training only): {wall}.", ""]
        if "S1" in v:
            lines += [f"- answer-position gain after RLP: {_fmt(v['rlp_gain'])} nats (start model {_fmt(v['start_gain'])});"
                      f" RLP minus start, paired: {_fmt(v['rlp_gain_vs_start'])}; against the empty thought: "
                      f"{_fmt(v['rlp_gain_vs_empty'])} -> **S1 {'holds' if v['S1'] else 'fails'} in seed {seed}**",
                      f"- not a criterion: log p(answer) after RLP's sampled thought minus the start model's without a "
                      f"thought, paired: {_fmt(v['rlp_think_vs_start_direct'])} nats ("
                      + ("below 0: the thought-reading model predicts the answer worse than the start model did "
                         "without thinking)" if v['rlp_think_vs_start_direct'][0] < 0 else
                         "above 0: after its thought the model predicts the answer better than the start model did "
                         "without thinking)")]
        else:
            lines += ["- RLP has not finished for this seed."]
        if "acc_diff" in v:
            pooled_diffs.append(_rows(units["rlp"], "acc_think") - _rows(units["cpt"], "acc_think"))
            lines += [f"- accuracy after a sampled thought, RLP minus CPT (points, paired): {_fmt(v['acc_diff'], True)};"
                      f" RLP minus CPT's best ({v['cpt_best']}): {_fmt(v['acc_diff_best'], True)}"]
        else:
            lines += ["- CPT has not finished for this seed."]
        lines.append("")
    done = [s for s, v in verdicts.items() if "acc_diff" in v]
    lines += ["## Verdict", ""]
    if protocol < run.PROTOCOL:
        lines += [f"Superseded after seed 0 by protocol {run.PROTOCOL}; no verdict is drawn from it."]
    elif len(done) == len(run.SEEDS):
        s1 = all(verdicts[s]["S1"] for s in done)
        pooled = _ci(np.concatenate(pooled_diffs))
        s2 = all(verdicts[s]["acc_diff"][0] > 0 for s in done) and pooled[1] > 0
        lines += [f"- **S1 {'holds' if s1 else 'fails'}**: it holds in {sum(verdicts[s]['S1'] for s in done)} of "
                  f"{len(done)} seeds (seeds {', '.join(str(s) for s in done if verdicts[s]['S1']) or 'none'}) and "
                  "must hold in every seed.",
                  f"- **S2 {'holds' if s2 else 'fails'}**: RLP minus CPT > 0 in "
                  f"{sum(verdicts[s]['acc_diff'][0] > 0 for s in done)} of {len(done)} seeds; pooled paired difference "
                  f"{_fmt(pooled, True)} points."]
    else:
        lines += [f"Not yet decided: {len(done)} of {len(run.SEEDS)} seeds finished (S1 and S2 need all three). "
                  "What finished is above, per seed, with its CIs."]
    if verdicts:
        _plot(all_units, HERE / f"curves_{tag}.png")
        lines += ["", f"![curves](curves_{tag}.png)", "",
                  "Top: RLP's training reward, thought length and ended fraction per step. Bottom: the curve "
                  f"evaluations (the first {run.CURVE_PROBLEMS} held-out problems, fixed thought keys) of RLP (solid) "
                  "and CPT (dashed) at equal fractions of their matched FLOPs.", ""]
    return lines
