"""cpt_baseline: next-token continued pretraining on web_mix's data, compute-matched to its RLP run.

The paper's effective token budget of RLP (RLP_METHOD.md):
    T_flop = n_rollouts * l_seq * batch * iters + T_inp
with n_rollouts = G, l_seq the thought length, batch the (context, next token) pairs per step and
T_inp the input tokens. CPT at `batch * seq_len` tokens per step then runs T_flop / (batch * seq_len)
steps. The CPT recipe: AdamW (0.9, 0.95), weight decay 0.1, lr 1e-6 cosine-decayed to 1e-7.
A token-matched CPT is the same with `--set train.steps=<RLP steps>`.
"""

import dataclasses
import importlib.util
from pathlib import Path

from rlp_jax.config import OptimConfig, RunConfig

_spec = importlib.util.spec_from_file_location("web_mix", Path(__file__).with_name("web_mix.py"))
web_mix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(web_mix)


def rlp_effective_tokens(cfg: RunConfig) -> int:
    """T_flop of an RLP config: G * thought_len * batch * steps + input tokens (batch * seq_len * steps)."""
    ro, d, steps = cfg.rlp.rollout, cfg.data, cfg.train.steps
    pairs = d.batch_size * ro.positions_per_doc
    return ro.group_size * ro.thought_len * pairs * steps + d.batch_size * d.seq_len * steps


def compute_matched_steps(rlp_cfg: RunConfig) -> int:
    return max(1, round(rlp_effective_tokens(rlp_cfg) / (rlp_cfg.data.batch_size * rlp_cfg.data.seq_len)))


def config() -> RunConfig:
    rlp = web_mix.config()
    return dataclasses.replace(
        rlp,
        optim=OptimConfig(lr=1e-6, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95),
        train=dataclasses.replace(rlp.train, objective="ntp", steps=compute_matched_steps(rlp)))
