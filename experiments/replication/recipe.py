"""The replication's recipe (experiments/replication/run.py): the project's demo until 2026-12-06, kept as it
ran so that the replication reproduces. Generated reasoning-rich text -> tokenizer -> next-token pretraining
(stage 1) -> RLP from that checkpoint (stage 2) -> a before/after table. CPU, ~10 minutes.

    python -m rlp_jax.train --experiment=experiments/replication/recipe.py [--workdir runs/arith]

1. `prepare` writes a generated corpus (`rlp_jax.data.corpus`: arithmetic and word problems with and without
   worked steps, unit conversions, orderings, descriptive text; in 10% of the problems the working
   is written as a `<think> ... </think>` at the answer, as web text with reasoning traces has it)
   and held-out problems that never occur in training into WORKDIR/data, and trains a sentencepiece
   tokenizer with the think markers.
2. `stages`: WORKDIR/pretrain trains the `small` Qwen3-style preset from scratch with next-token
   prediction; WORKDIR/rlp continues it with RLP (`config()` below; `--set` overrides apply to it).
   Positions are drawn by the `ema_band` rule (tokens the teacher finds 1-8 nats surprising) rather
   than uniformly: on this templated text most tokens are trivially predictable.
3. `report` evaluates both checkpoints on the same held-out documents and problems and prints the
   table (also WORKDIR/report.md and report.json) and a few sampled thoughts.
Each stage resumes if interrupted; rerunning a finished demo only reprints the report.
"""

import dataclasses
import json
from pathlib import Path

from rlp_jax.data.config import DataConfig, SourceConfig
from rlp_jax.rlp.config import LossConfig, RLPConfig, RolloutConfig
from rlp_jax.runs.config import ModelSection, OptimConfig, RunConfig, TrainSection
from rlp_jax.sharding import MeshConfig

NUM_TRAIN_DOCS = 30_000
NUM_HELDOUT = 200
THINK_FRACTION = 0.1   # problem documents whose working is a <think> ... </think> at the answer (corpus.py)
VOCAB = 1024
PRETRAIN = dict(steps=300, lr=2e-3, warmup_steps=20, batch_size=16)


def config() -> RunConfig:
    """The RLP stage (stage 2)."""
    return RunConfig(
        model=ModelSection(preset="small"),
        data=DataConfig(sources=(SourceConfig(path="WORKDIR/data/train.jsonl", name="generated"),),
                        seq_len=64, batch_size=8, packing="pack", eval_fraction=0.02, shuffle_buffer=1024),
        rlp=RLPConfig(rollout=RolloutConfig(group_size=4, positions_per_doc=4, thought_len=20, min_context=8,
                                            temperature=1.0, position_rule="ema_band", ema_band=(1.0, 8.0)),
                      loss=LossConfig(), ema_decay=0.99),
        optim=OptimConfig(lr=2e-4, warmup_steps=5, schedule="constant"),
        train=TrainSection(objective="rlp", steps=50, save_every=25, eval_every=25, eval_batches=4,
                           mesh=MeshConfig(data=-1), min_thought_len=1.0),
    )


def prepare(cfg: RunConfig, workdir: Path) -> RunConfig:
    """Corpus, held-out problems and tokenizer under WORKDIR/data (built once; reruns reuse them)."""
    from rlp_jax.data.corpus import build_corpus, generate_documents
    from rlp_jax.data.tokenizer import train_sentencepiece

    workdir = Path(workdir).resolve()
    data_dir = workdir / "data"
    sp_model = data_dir / "tokenizer.model"
    if not (data_dir / "train.jsonl").exists() or not sp_model.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        build_corpus(data_dir, num_train_docs=NUM_TRAIN_DOCS, num_eval_problems=NUM_HELDOUT, seed=0,
                     think_fraction=THINK_FRACTION)
        train_sentencepiece(generate_documents(5000, seed=0, think_fraction=THINK_FRACTION), data_dir / "tokenizer",
                            vocab_size=VOCAB)
    sources = tuple(dataclasses.replace(s, path=s.path.replace("WORKDIR", str(workdir))) for s in cfg.data.sources)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources),
                               train=dataclasses.replace(cfg.train, tokenizer=cfg.train.tokenizer or str(sp_model)))


def pretrain_config(cfg: RunConfig) -> RunConfig:
    """Stage 1: next-token prediction from scratch on the same data, model and eval settings."""
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, batch_size=PRETRAIN["batch_size"]),
        optim=OptimConfig(lr=PRETRAIN["lr"], warmup_steps=PRETRAIN["warmup_steps"], schedule="cosine"),
        train=dataclasses.replace(cfg.train, objective="ntp", steps=PRETRAIN["steps"], save_every=200,
                                  eval_every=PRETRAIN["steps"] if cfg.train.eval_every else 0))


def stages(cfg: RunConfig, workdir: Path):
    workdir = Path(workdir).resolve()
    rlp = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(workdir / "pretrain")))
    return [("pretrain", pretrain_config(cfg)), ("rlp", rlp)]


def report(cfg: RunConfig, workdir: Path) -> None:
    from rlp_jax.evaluate.heldout import compare_runs, format_table, sample_thoughts

    workdir = Path(workdir).resolve()
    rows = compare_runs({"before RLP (NTP stage)": workdir / "pretrain", "after RLP": workdir / "rlp"},
                        heldout=workdir / "data" / "heldout.jsonl", think_tokens=cfg.rlp.rollout.thought_len)
    table = format_table(rows)
    shown = sample_thoughts(workdir / "rlp", workdir / "data" / "heldout.jsonl", n=4,
                            think_tokens=cfg.rlp.rollout.thought_len)
    (workdir / "report.json").write_text(json.dumps({"rows": rows, "thoughts": shown}, indent=2))
    (workdir / "report.md").write_text(table + "\n\n" + "\n".join(f"- {s}" for s in shown) + "\n")
    print("\n" + table + "\n\nSampled thoughts after RLP (held-out problems):")
    for s in shown:
        print("  " + s)
    print(f"\nreport: {workdir / 'report.md'}; plots: {workdir / 'rlp' / 'plots'}")
