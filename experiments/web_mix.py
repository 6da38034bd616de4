"""web_mix: RLP on a weighted mixture of web-text sources (the paper's recipe, docs/method.md).

Point it at your data and model:
    python -m rlp_jax.train --experiment=web_mix \
        --set model.init_from=/ckpt/Qwen3-1.7B-Base \
        --set 'data.sources=[{"path": "/data/fineweb/*.parquet", "weight": 0.7},
                             {"path": "/data/openwebmath/*.jsonl.zst", "weight": 0.3}]'
Without model.init_from the `model.preset` size starts from random init (then train.tokenizer must
name a tokenizer). Paper settings: constant lr 1e-6, 512 (context, next token) pairs per step,
context 2048, G = 16 thoughts at temperature 0.7, thoughts up to 2048 tokens, KL 0, EMA tau 0.999.
float32 master weights with bfloat16 compute: at lr 1e-6 most updates are below bfloat16 resolution.
The sampler reads its weights gathered once per rollout (`model.sampler_weights=gathered`): on a v5p-64 at
micro_batches=2, XLA:TPU's count is 27.0 GB of HBM traffic per sampled token instead of 31.3, for 0.6 GiB more
per device (74.4 of 95; README, "Scale-out").
"""

from rlp_jax.data.config import DataConfig, SourceConfig
from rlp_jax.rlp.config import LossConfig, RewardConfig, RLPConfig, RolloutConfig
from rlp_jax.runs.config import ModelSection, OptimConfig, RunConfig, TrainSection
from rlp_jax.sharding import MeshConfig


def config() -> RunConfig:
    return RunConfig(
        model=ModelSection(preset="qwen3-1.7b", param_dtype="float32", compute_dtype="bfloat16", remat="full",
                           sampler_weights="gathered"),
        data=DataConfig(
            sources=(SourceConfig(path="data/web/*.jsonl", weight=0.7, name="web"),
                     SourceConfig(path="data/math/*.jsonl", weight=0.3, name="math")),
            seq_len=2048, batch_size=512, packing="window", eval_fraction=0.001),
        rlp=RLPConfig(
            rollout=RolloutConfig(group_size=16, positions_per_doc=1, thought_len=2048, temperature=0.7,
                                  min_context=64),
            reward=RewardConfig(kind="info_gain", horizon=1),
            loss=LossConfig(eps_low=0.2, eps_high=0.2, kl_beta=0.0, ntp_weight=0.0),
            ema_decay=0.999),
        optim=OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0, weight_decay=0.1, b1=0.9, b2=0.95),
        train=TrainSection(objective="rlp", steps=1000, save_every=100, eval_every=100, eval_batches=2,
                           mesh=MeshConfig(data=1, fsdp=-1)),
    )
