"""A real rlp_jax run directory built in seconds without training: generated corpus, a sentencepiece
tokenizer, a random `tiny` model, and one Orbax checkpoint with the config.json `train.run` writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from rlp_jax.data.corpus import build_corpus, generate_documents
from rlp_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from rlp_jax.model.dense import transformer
from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.runs import checkpoint
from rlp_jax.runs.config import apply_overrides, load_experiment, to_dict
from rlp_jax.train import train_step
from rlp_jax.train.optim import make_optimizer


def make_run_dir(root: Path, *, num_problems: int = 5, seed: int = 0, step: int = 1) -> Path:
    """WORKDIR with data/{train,heldout}.jsonl, data/tokenizer.model, config.json and checkpoints/<step>."""
    root = Path(root)
    data = root / "data"
    build_corpus(data, num_train_docs=200, num_eval_problems=num_problems, seed=0)
    sp = train_sentencepiece(generate_documents(400, seed=0), data / "tokenizer", vocab_size=400)
    tok = load_tokenizer(sp)
    cfg = apply_overrides(load_experiment("smoke").config(), [f"train.tokenizer={sp}", "train.steps=2"])
    sources = (dataclasses.replace(cfg.data.sources[0], path=str(data / "train.jsonl")),)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources))
    mcfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
    params = transformer.init_params(mcfg, jax.random.key(seed))
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim > 1 else p, params)   # a peakier next-token softmax
    opt = make_optimizer(cfg.optim, cfg.train.steps)
    state = train_step.init_train_state(params, opt).replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    run_config = {"model": mcfg.stored_fields(), "model_full": dataclasses.asdict(mcfg), "run": to_dict(cfg),
                  "experiment": "test"}
    (root / "config.json").write_text(json.dumps(run_config, indent=2))
    with checkpoint.Checkpointer(root / "checkpoints", save_every=1) as ck:
        ck.save(step, state, data_state=None, rng=jax.random.key(0), config=run_config, force=True)
    return root


def add_step(root: Path, step: int) -> None:
    """Save the run's latest state again as a later checkpoint `step` (same params; a second step to fall
    back from)."""
    from rlp_jax.train.train_step import load_run_state

    restored, record = load_run_state(root)
    state = restored.state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    with checkpoint.Checkpointer(Path(root) / "checkpoints", save_every=1) as ck:
        ck.save(step, state, data_state=restored.data_state, rng=restored.rng, config=record.raw, force=True)
