"""demo: the first command to run, and the short form of the running-sum study (experiments/modsum_rlp).
CPU, under 10 minutes on 2 cores, nothing downloaded.

    python -m rlp_jax.train --experiment=demo [--workdir runs/demo]

The task (`rlp_jax.data.modsum`): k = 8-12 digits in {0, 1, 2}, then `; A` and their sum mod 3. One forward
pass cannot compute it; writing the running sums can. Documents come answer-only, worked (the running sums
written out), as a trace (the working inside `<think> ... </think>` right before the answer) or with an
aside (a thought copying a few words at another position, after which the text resumes).

1. `prepare` writes the data into WORKDIR/data: a pretraining mix rich in worked examples, a continuation
   corpus poor in them (90% answer-only), held-out problems that never occur in training, and the task's
   sentencepiece tokenizer (one token per word, with the markers).
2. `stages`: WORKDIR/pretrain trains the `mini` model (0.4M parameters) from scratch with next-token
   prediction on the pretraining mix; WORKDIR/rlp continues it with RLP on the continuation corpus with the
   paper's settings (`config()`: uniform positions, G = 8, temperature 0.7, no next-token term).
3. `report` scores both checkpoints at the answer position of the same held-out problems with the same
   thought keys: answering directly, after an empty `<think></think>` (the format control), after a greedy
   and after a sampled thought, and the information gain of a sampled thought against no thought and
   against the empty thought (WORKDIR/report.md, report.json), then shows a few held-out problems with the
   thought and the answer after RLP.
Each stage resumes if interrupted; rerunning a finished demo only reprints the report. The full study, with
the pre-registered criteria, FLOP-matched CPT and three seeds, is experiments/modsum_rlp/.
"""

import dataclasses
import json
from pathlib import Path

from rlp_jax.data.config import DataConfig, SourceConfig
from rlp_jax.rlp.config import LossConfig, RLPConfig, RolloutConfig
from rlp_jax.runs.config import ModelSection, OptimConfig, RunConfig, TrainSection
from rlp_jax.sharding import MeshConfig

DATA = dict(pretrain_docs=64_000, continuation_docs=20_000, heldout=256, heldout_docs=256)
SEQ_LEN = 48
PRETRAIN = dict(steps=1500, lr=1e-3, warmup_steps=50, batch_size=32, b2=0.98, weight_decay=0.01)
SHOWN = 6   # held-out problems printed with their thought
EVAL_KEY = 0


def config() -> RunConfig:
    """The RLP stage (stage 2): the study's RLP arm (experiments/modsum_rlp/run.py), fewer steps."""
    return RunConfig(
        model=ModelSection(preset="mini"),
        data=DataConfig(sources=(SourceConfig(path="WORKDIR/data/continuation.jsonl", name="continuation"),),
                        seq_len=SEQ_LEN, batch_size=16, packing="window", shuffle_buffer=4096),
        rlp=RLPConfig(rollout=RolloutConfig(group_size=8, positions_per_doc=4, thought_len=32, min_context=6,
                                            temperature=0.7, position_rule="uniform"),
                      loss=LossConfig(ntp_weight=0.0), ema_decay=0.999),
        optim=OptimConfig(lr=1e-4, warmup_steps=10, schedule="constant", b2=0.95, weight_decay=0.0),
        train=TrainSection(objective="rlp", steps=150, save_every=150, eval_every=0, log_every=1,
                           mesh=MeshConfig(data=-1), min_thought_len=1.0),
    )


def _data(workdir: Path) -> dict:
    from rlp_jax.data.modsum import build_study_data

    return build_study_data(Path(workdir).resolve() / "data", seed=0, **DATA)


def prepare(cfg: RunConfig, workdir: Path) -> RunConfig:
    """Data and tokenizer under WORKDIR/data (built once; reruns reuse them). Thoughts are kept to the task's
    own tokens (`modsum.unused_token_ids`: pieces no document contains have untrained embeddings), as in the
    study's protocol 2."""
    from rlp_jax.data.modsum import unused_token_ids
    from rlp_jax.data.tokenizer import load_tokenizer

    workdir = Path(workdir).resolve()
    paths = _data(workdir)
    tokenizer = cfg.train.tokenizer or str(paths["tokenizer"])
    sources = tuple(dataclasses.replace(s, path=s.path.replace("WORKDIR", str(workdir))) for s in cfg.data.sources)
    rollout = cfg.rlp.rollout
    banned = tuple(sorted(set(rollout.banned_ids) | set(unused_token_ids(load_tokenizer(tokenizer)))))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources),
                               rlp=dataclasses.replace(cfg.rlp, rollout=dataclasses.replace(rollout, banned_ids=banned)),
                               train=dataclasses.replace(cfg.train, tokenizer=tokenizer))


def pretrain_config(cfg: RunConfig) -> RunConfig:
    """Stage 1: next-token prediction from scratch on the pretraining mix (rich in worked examples)."""
    src = cfg.data.sources[0]
    pre = dataclasses.replace(src, path=str(Path(src.path).with_name("pretrain.jsonl")), name="pretrain")
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, sources=(pre,), batch_size=PRETRAIN["batch_size"]),
        optim=OptimConfig(lr=PRETRAIN["lr"], warmup_steps=PRETRAIN["warmup_steps"], schedule="constant",
                          b2=PRETRAIN["b2"], weight_decay=PRETRAIN["weight_decay"]),
        train=dataclasses.replace(cfg.train, objective="ntp", steps=PRETRAIN["steps"], save_every=500, log_every=50))


def stages(cfg: RunConfig, workdir: Path):
    workdir = Path(workdir).resolve()
    rlp = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(workdir / "pretrain")))
    return [("pretrain", pretrain_config(cfg)), ("rlp", rlp)]


ROW_KEYS = {   # report.json field: (think_eval summary key, shown as)
    "acc_no_think": ("acc_no_think", "acc direct"), "acc_empty": ("acc_empty", "acc after <think></think>"),
    "acc_greedy": ("acc_greedy", "acc greedy thought"), "acc_think": ("acc_think", "acc sampled thought"),
    "answer_info_gain": ("info_gain", "gain vs no thought"),
    "answer_info_gain_vs_empty": ("info_gain_vs_empty", "gain vs empty thought"),
    "thought_ok": ("thought_ok", "thought states the answer"), "thought_len": ("thought_len", "thought len"),
    "ended": ("ended", "ended"),
}


def report(cfg: RunConfig, workdir: Path) -> None:
    import jax

    from rlp_jax.data import modsum
    from rlp_jax.evaluate.modsum import evaluate_params, show_thoughts
    from rlp_jax.rlp.think_eval import bootstrap_ci
    from rlp_jax.runs import loading
    from rlp_jax.train import objective_of

    workdir = Path(workdir).resolve()
    data = _data(workdir)
    key = jax.random.key(EVAL_KEY)
    rows, per = [], {}
    for label, name in (("before RLP (NTP stage)", "pretrain"), ("after RLP", "rlp")):
        lm = loading.load_model(workdir / name)
        objective = objective_of(cfg, lm.tokenizer)
        summary, per[name] = evaluate_params(lm.params, lm.cfg, lm.tokenizer, data, objective, cfg.data.seq_len, key)
        row = {"label": label, "step": lm.step, **{k: summary["answer"][src] for k, (src, _) in ROW_KEYS.items()},
               "answer_nll_no_think": -summary["answer"]["lp_none"], "answer_nll_empty": -summary["answer"]["lp_empty"],
               "answer_nll_think": -summary["answer"]["lp_think"],
               "nll_correct_thought": summary["answer"]["nll_correct_thought"],
               "nll_wrong_thought": summary["answer"]["nll_wrong_thought"],
               "uniform_info_gain": summary["uniform"]["info_gain"],
               "uniform_info_gain_vs_empty": summary["uniform"]["info_gain_vs_empty"],
               "step_skill": summary["roles_worked"].get("step"), "answer_after_working": summary["roles_worked"].get("answer")}
        rows.append(row)
    before, after = per["pretrain"]["answer"], per["rlp"]["answer"]
    cis = {"answer_info_gain_vs_empty (after RLP)": bootstrap_ci(after["info_gain_vs_empty"]),
           "answer_info_gain (after RLP)": bootstrap_ci(after["info_gain"]),
           "acc_think after minus before (paired)": bootstrap_ci(after["acc_think"] - before["acc_think"]),
           # the answer's log-prob after RLP's thought against the NTP model's without one: the gains above are
           # relative to each model's own no-thought reading, which RLP changes too (no loss trains it)
           "log p(answer): after RLP with a thought minus before RLP without": bootstrap_ci(after["lp_think"] - before["lp_none"])}
    lm = loading.load_model(workdir / "rlp")
    docs = modsum.read_jsonl(data["heldout_problems"])[:SHOWN]
    shown = show_thoughts(lm.params, lm.cfg, lm.tokenizer, docs, objective_of(cfg, lm.tokenizer),
                          cfg.data.seq_len, key)
    table = format_table(rows)
    verdict = _verdict(rows, cis)
    ci_lines = [f"- {k}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}] (95% bootstrap CI over {len(after['info_gain'])} problems)"
                for k, (m, lo, hi) in cis.items()]
    (workdir / "report.json").write_text(json.dumps({"rows": rows, "ci": cis, "thoughts": shown, "verdict": verdict},
                                                    indent=2))
    (workdir / "report.md").write_text("\n".join([table, "", *ci_lines, "", verdict, ""] + [f"- `{s}`" for s in shown]) + "\n")
    print("\nHeld-out problems, at the answer position (the same problems and thought keys for both rows):\n")
    print(table + "\n\n" + "\n".join(ci_lines) + "\n\n" + verdict + "\n\nHeld-out problems after RLP (one sampled thought each):")
    for s in shown:
        print("  " + s)
    print(f"\nreport: {workdir / 'report.md'}; the full study: experiments/modsum_rlp/RESULTS.md")


def format_table(rows: list[dict]) -> str:
    head = "| model | step | " + " | ".join(name for _, name in ROW_KEYS.values()) + " |"
    lines = [head, "|" + "---|" * (len(ROW_KEYS) + 2)]
    for r in rows:
        cells = [f"{100 * r[k]:.1f}%" if k.startswith(("acc", "ended", "thought_ok")) else f"{r[k]:.2f}" for k in ROW_KEYS]
        lines.append(f"| {r['label']} | {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(rows: list[dict], cis: dict) -> str:
    """What the numbers show, in words computed from them (never a fixed claim)."""
    before, after = rows
    lo_empty = cis["answer_info_gain_vs_empty (after RLP)"][1]
    acc_m, acc_lo, acc_hi = cis["acc_think after minus before (paired)"]
    abs_m, abs_lo, abs_hi = cis["log p(answer): after RLP with a thought minus before RLP without"]
    acc = ("rose" if acc_lo > 0 else "fell" if acc_hi < 0 else "did not change clearly")
    parts = [f"Accuracy after a sampled thought {acc} with RLP ({100 * before['acc_think']:.1f}% -> "
             f"{100 * after['acc_think']:.1f}%, paired CI [{100 * acc_lo:+.1f}, {100 * acc_hi:+.1f}] points).",
             f"After RLP the answer after a thought is predicted {'better' if abs_lo > 0 else 'worse' if abs_hi < 0 else 'no differently'} "
             f"than the NTP model predicted it directly ({abs_m:+.2f} nats).",
             f"Against RLP's own readings the thought gains {after['answer_info_gain']:+.2f} nats over no thought and "
             f"{after['answer_info_gain_vs_empty']:+.2f} over the empty thought (CI lower bound {lo_empty:+.2f})"
             + (f", but RLP also moved those readings: NLL without a thought {before['answer_nll_no_think']:.2f} -> "
                f"{after['answer_nll_no_think']:.2f}, so these gains are not evidence that thinking helps."
                if after["answer_nll_no_think"] > before["answer_nll_no_think"] + 0.5 else ".")]
    return " ".join(parts)
