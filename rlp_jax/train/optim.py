"""The optimizer: AdamW, warmup + cosine/constant schedule, global-norm clipping, decay mask."""

from __future__ import annotations

import jax
import optax

from rlp_jax.runs.config import OptimConfig


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to cfg.lr, then constant or cosine decay to cfg.lr * cfg.min_lr_ratio."""
    warm = max(cfg.warmup_steps, 0)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0 if warm else cfg.lr, cfg.lr, warm,
                                                  max(total_steps, warm + 1), cfg.lr * cfg.min_lr_ratio)
    if warm == 0:
        return optax.constant_schedule(cfg.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)], [warm])


def decay_mask(params):
    """True for weight matrices; False for norm weights, biases (`*bias`, `*_b`) and a Mamba-2 mixer's decay
    parameters A_log and D (never decayed, as mamba_ssm leaves them)."""
    def keep(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith(("norm", "bias", "_b")) or name in ("A_log", "D"))
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (if clip_norm > 0) then AdamW with the schedule and the decay mask."""
    adamw = optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw
