"""smoke: a tiny Qwen3-style model on a tiny generated corpus; finishes in about a minute on CPU.

Used by the tests and as a first check of an installation. `prepare` writes the corpus
(`rlp_jax.data.corpus`) and trains a sentencepiece tokenizer with the think markers into WORKDIR/data
(once; a resumed run reuses them).
"""

import dataclasses
from pathlib import Path

from rlp_jax.data.config import DataConfig, SourceConfig
from rlp_jax.rlp.config import LossConfig, RLPConfig, RolloutConfig
from rlp_jax.runs.config import ModelSection, OptimConfig, RunConfig, TrainSection
from rlp_jax.sharding import MeshConfig


def config() -> RunConfig:
    return RunConfig(
        model=ModelSection(preset="tiny"),
        data=DataConfig(sources=(SourceConfig(path="WORKDIR/data/train.jsonl", name="generated"),),
                        seq_len=64, batch_size=8, packing="pack", eval_fraction=0.1, shuffle_buffer=64),
        rlp=RLPConfig(rollout=RolloutConfig(group_size=4, positions_per_doc=2, thought_len=8, min_context=8,
                                            temperature=1.0),
                      loss=LossConfig(), ema_decay=0.99),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine"),
        train=TrainSection(objective="rlp", steps=20, save_every=10, eval_every=10, eval_batches=1,
                           mesh=MeshConfig(data=-1), min_thought_len=1.0),
    )


def prepare(cfg: RunConfig, workdir: Path) -> RunConfig:
    """Generate the corpus and tokenizer under WORKDIR/data and point the config at them."""
    from rlp_jax.data.corpus import build_corpus, generate_documents
    from rlp_jax.data.tokenizer import train_sentencepiece

    data_dir = Path(workdir) / "data"
    train_file, sp_model = data_dir / "train.jsonl", data_dir / "tokenizer.model"
    if not (train_file.exists() and sp_model.exists()):
        data_dir.mkdir(parents=True, exist_ok=True)
        build_corpus(data_dir, num_train_docs=600, num_eval_problems=20, seed=0)
        train_sentencepiece(generate_documents(600, seed=0), data_dir / "tokenizer", vocab_size=512)
    sources = tuple(dataclasses.replace(s, path=s.path.replace("WORKDIR", str(workdir))) for s in cfg.data.sources)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources),
                               train=dataclasses.replace(cfg.train, tokenizer=cfg.train.tokenizer or str(sp_model)))
