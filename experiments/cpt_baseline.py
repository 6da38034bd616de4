"""cpt_baseline: next-token continued pretraining on web_mix's data, compute-matched to its RLP run.

The paper's effective token budget of RLP (docs/method.md), `rlp_jax.plan.effective_tokens`:
    T_flop = n_rollouts * l_seq * batch * iters + T_inp
read as K*G rollouts per row of l_seq = L + T_think tokens (this reading reproduces the paper's
"170M RLP input tokens ~ 6B CPT tokens"). CPT at `batch * seq_len` tokens per step then runs
T_flop / (batch * seq_len) steps. The CPT recipe: AdamW (0.9, 0.95), weight decay 0.1, lr 1e-6
cosine-decayed to 1e-7. A token-matched CPT is the same with `--set train.steps=<RLP steps>`; a
FLOP-matched one uses `plan.rlp_step_flops` / `plan.ntp_step_flops` (see experiments/replication).
"""

import dataclasses
import importlib.util
from pathlib import Path

from rlp_jax import plan
from rlp_jax.runs.config import OptimConfig, RunConfig

_spec = importlib.util.spec_from_file_location("web_mix", Path(__file__).with_name("web_mix.py"))
web_mix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(web_mix)


def compute_matched_steps(rlp_cfg: RunConfig) -> int:
    """CPT steps whose tokens equal the RLP run's effective tokens T_flop."""
    d = rlp_cfg.data
    per_step = plan.effective_tokens(rlp_cfg.rlp, d.batch_size, d.seq_len)
    return max(1, round(per_step * rlp_cfg.train.steps / (d.batch_size * d.seq_len)))


def config() -> RunConfig:
    rlp = web_mix.config()
    return dataclasses.replace(
        rlp,
        optim=OptimConfig(lr=1e-6, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95),
        train=dataclasses.replace(rlp.train, objective="ntp", steps=compute_matched_steps(rlp)))
