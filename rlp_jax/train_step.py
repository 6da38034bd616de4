"""One RLP optimisation step, jit-compiled: positions -> rollout -> reward -> advantages -> loss -> update -> EMA.

The step is pure: `step(state, batch, rng) -> (state, metrics)`; the host loop owns data, logging and
checkpoints. A batch is a dict of [B, L] int32 arrays: `tokens`, `segment_ids` (0 = padding, packed
documents numbered 1, 2, ...) and `positions` (rotary positions, restarting per document).

Shapes: B rows, L tokens, K positions per row, G thoughts per position, T thought slots, H horizon,
M = B*K*G thoughts.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rlp_jax import advantages as adv_lib
from rlp_jax import model, naive, positions, reward, sharding
from rlp_jax.ema import ema_update, init_ema
from rlp_jax.losses import combined_loss, next_token_mask, rlp_loss, shifted_ntp_loss
from rlp_jax.model_config import ModelConfig
from rlp_jax.rlp_config import RLPConfig
from rlp_jax.rollout import Thoughts, thought_forward, thought_rollout


@flax.struct.dataclass
class TrainState:
    """step: [] int32 steps taken (batches consumed, skipped non-finite steps included). params: the policy theta. ema_params: phi (float32).
    opt_state: optax state. ref_params: frozen initial params for the KL penalty (None when beta = 0).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    ref_params: Any = None


def init_train_state(params, optimizer: optax.GradientTransformation, *, keep_reference: bool = False) -> TrainState:
    """A fresh state: EMA initialised to theta (the paper's lazy init at the first batch)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=init_ema(params),
                      opt_state=optimizer.init(params), ref_params=jax.tree.map(jnp.copy, params) if keep_reference else None)


def _as_compute(params, cfg: ModelConfig):
    return jax.tree.map(lambda p: p.astype(cfg.jnp_param_dtype), params)


def prompt_context(params, cfg: ModelConfig, rlp: RLPConfig, *, teacher: bool = False):
    """The ContextCache of the run's prompt (`rlp.prompt`) under `params`, or None: no prompt, or the
    teacher when `rlp.prompt.teacher_sees` is off."""
    if not rlp.prompt.ids or (teacher and not rlp.prompt.teacher_sees):
        return None
    return model.context_cache(params, cfg, rlp.prompt.ids)


def teacher_logprobs(ema_params, cfg: ModelConfig, batch, rlp: RLPConfig | None = None) -> jax.Array:
    """log p_ema(x_j | x_<j) for every token, from one teacher-forced pass: [B, L] float32, no gradient.
    With `rlp` given, the teacher reads the prompt when `rlp.prompt.teacher_sees`."""
    ema = _as_compute(jax.lax.stop_gradient(ema_params), cfg)
    ctx = None if rlp is None else prompt_context(ema, cfg, rlp, teacher=True)
    hidden, _ = model.forward(ema, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                              positions_bl=batch["positions"], return_hidden=True, context=ctx)
    return reward.shifted_token_logprobs_chunked(ema, cfg, hidden, batch["tokens"])


def _branch_forward_fn(naive_path: bool, batch, prompt_ids=()):
    """The thought forward of the fast shared-prefix path, or of the naive reference path."""
    if not naive_path:
        return thought_forward
    return lambda p, c, _prefix, t, th, tg, ro: naive.naive_thought_forward(p, c, batch, t, th, tg, ro,
                                                                             prompt_ids=prompt_ids)


def rlp_objective(params, cfg: ModelConfig, rlp: RLPConfig, batch, thoughts: Thoughts, t_bk, t_mask_bk,
                  ema_lp_bl, ref_params=None, *, naive_path: bool = False, rlp_scale=1.0, ntp_scale=1.0):
    """The RLP loss of given thoughts, differentiable in params (the loss forward of RLP_METHOD.md).

    Args:
      params: policy params. batch: dict of [B, L] arrays. thoughts: sampled `Thoughts` [B, K, G, T].
      t_bk: [B, K] positions; t_mask_bk: [B, K] bool (valid positions).
      ema_lp_bl: [B, L] float32 no-think teacher log-probs (`teacher_logprobs`).
      ref_params: reference params for the KL term (needed when rlp.loss.kl_beta > 0).
      naive_path: score every thought as its own sequence (`rlp_jax.naive`, the reference and the
        benchmark baseline) instead of as a branch of the shared prefix.
      rlp_scale, ntp_scale: [] float32 factors of the RLP and next-token terms in the returned loss
        (micro-batching weighs each micro-batch by its share of the batch's thoughts and tokens);
        the metrics stay unscaled.
    Returns:
      (loss, (metrics dict, rewards [B, K, G], advantages [B, K, G])).
    """
    h = rlp.reward.horizon
    lc = rlp.loss
    # The documents' full-vocab logits are only needed by the next-token term.
    # With a prompt, the policy reads the documents after it; the next-token term reads them plain.
    ctx = prompt_context(params, cfg, rlp)
    logits_doc, prefix = model.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                                       positions_bl=batch["positions"], return_cache=True,
                                       return_logits=lc.ntp_weight > 0 and ctx is None, context=ctx)
    if lc.ntp_weight > 0 and ctx is not None:
        logits_doc, _ = model.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                                      positions_bl=batch["positions"])
    targets = reward.gather_horizon(batch["tokens"], t_bk, h)                    # [B, K, H]
    ema_t = reward.gather_horizon(ema_lp_bl, t_bk, h)                            # [B, K, H]
    forward_fn = _branch_forward_fn(naive_path, batch, rlp.prompt.ids)
    new_lp, tgt_lp, tgt_argmax = forward_fn(params, cfg, prefix, t_bk, thoughts, targets, rlp.rollout)
    rewards, terms = reward.get_reward_fn(rlp.reward.kind)(
        jax.lax.stop_gradient(tgt_lp), tgt_argmax, targets, jax.lax.stop_gradient(ema_t))
    valid = jnp.broadcast_to(t_mask_bk[:, :, None], rewards.shape)               # [B, K, G]
    if lc.baseline == "group":
        adv = adv_lib.group_advantages(rewards, valid, std_normalize=lc.std_normalize)
    else:
        adv = adv_lib.batch_advantages(rewards, valid, std_normalize=lc.std_normalize)
    t_max = thoughts.tokens.shape[-1]
    action = thoughts.action_mask & valid[..., None]
    ref_lp = None
    if lc.kl_beta > 0:
        ref = jax.lax.stop_gradient(ref_params)
        _, ref_prefix = model.forward(ref, cfg, batch["tokens"],
                                      segment_ids_bl=batch["segment_ids"], positions_bl=batch["positions"],
                                      return_cache=True, return_logits=False, context=prompt_context(ref, cfg, rlp))
        ref_lp = forward_fn(ref, cfg, ref_prefix, t_bk, thoughts, targets, rlp.rollout)[0].reshape(-1, t_max)
    new_flat, act = new_lp.reshape(-1, t_max), action.reshape(-1, t_max)
    # One update per rollout: the surrogate's old policy is the current one, so the importance ratio is
    # exactly 1 in value and its gradient is the policy gradient. The sampler's own log-probs differ from
    # these recomputed ones by numerics alone (token-by-token decoding vs whole branches: up to ~2% under
    # bfloat16); they serve only the policy/max_abs_ratio_minus_1 diagnostic.
    old_flat = jax.lax.stop_gradient(new_flat)
    loss_rlp, metrics = rlp_loss(new_flat, old_flat, adv.reshape(-1), act, (lc.eps_low, lc.eps_high),
                                 ref_logprobs=ref_lp, kl_beta=lc.kl_beta, rewards=rewards.reshape(-1))
    sampler_gap = jnp.abs(jnp.exp(old_flat - thoughts.logprobs.reshape(-1, t_max)) - 1.0)
    metrics["policy/max_abs_ratio_minus_1"] = jnp.max(jnp.where(act, sampler_gap, 0.0))
    if lc.ntp_weight > 0:
        ntp = shifted_ntp_loss(logits_doc, batch["tokens"], batch["segment_ids"])
        loss = combined_loss(rlp_scale * loss_rlp, ntp_scale * ntp, lc.ntp_weight)
        metrics["loss/ntp"] = ntp
    else:
        loss = rlp_scale * loss_rlp
    n_valid = jnp.maximum(valid.sum(), 1)
    vmean = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / n_valid
    metrics.update({
        "loss/total": loss,
        "reward/s_pred": vmean(terms["s_pred"]),
        "reward/s_ema": vmean(terms.get("s_ema", jnp.zeros_like(rewards))),
        "reward/std": jnp.sqrt(vmean((rewards - vmean(rewards)) ** 2)),
        "advantage/std": jnp.sqrt(vmean(adv ** 2)),
        "advantage/zero_spread_groups": adv_lib.zero_spread_fraction(rewards, valid),
        "positions/valid_fraction": t_mask_bk.mean(),
    })
    return loss, (metrics, rewards, adv)


def _rollout_metrics(thoughts: Thoughts, t_mask_bk):
    valid = jnp.broadcast_to(t_mask_bk[:, :, None], thoughts.lengths.shape)
    n = jnp.maximum(valid.sum(), 1)
    lengths = thoughts.lengths.astype(jnp.float32)
    return {
        "thought/mean_len": jnp.sum(jnp.where(valid, lengths, 0.0)) / n,
        "thought/min_len": jnp.where(valid.any(), jnp.min(jnp.where(valid, lengths, jnp.inf)), 0.0),
        "thought/max_len": jnp.max(jnp.where(valid, lengths, 0.0)),
        "thought/ended_fraction": jnp.sum(valid & thoughts.ended) / n,
    }


def _apply_update(state: TrainState, grads, loss, optimizer, ema_decay: float | None):
    """Optimizer + EMA update; skipped (all but the step counter unchanged) if loss or grads are non-finite."""
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if ema_decay is not None:
        new = new.replace(ema_params=ema_update(state.ema_params, params, ema_decay))
    # A skipped step keeps params, EMA and optimizer state but still counts as a step (state.step is
    # the number of batches consumed, which checkpoints and the data iterator agree on).
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
    metrics = {"train/grad_norm": optax.tree.norm(grads), "train/skipped_nonfinite": (~finite).astype(jnp.int32)}
    return new, metrics


def _rollout_phase(state: TrainState, batch, rng, *, cfg: ModelConfig, rlp: RLPConfig, naive_path: bool):
    """Teacher log-probs [B, L], positions [B, K] (+ mask) and sampled thoughts [B, K, G, T] of one
    (micro-)batch; nothing here is differentiated."""
    k_pos, k_roll = jax.random.split(rng)
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    ema_lp = teacher_logprobs(state.ema_params, cfg, batch, rlp)                 # [B, L]
    t_bk, t_mask = positions.select_positions(k_pos, seg, pos, ema_lp, rlp.rollout, rlp.reward.horizon)
    if naive_path:
        thoughts = naive.naive_thought_rollout(state.params, cfg, batch, t_bk, k_roll, rlp.rollout,
                                               prompt_ids=rlp.prompt.ids)
    else:
        policy = jax.lax.stop_gradient(state.params)
        _, prefix = model.forward(policy, cfg, tokens, segment_ids_bl=seg, positions_bl=pos, return_cache=True,
                                  return_logits=False, context=prompt_context(policy, cfg, rlp))
        thoughts = thought_rollout(state.params, cfg, prefix, t_bk, k_roll, rlp.rollout)
    return ema_lp, t_bk, t_mask, thoughts


def split_micro_batches(x, m: int):
    """[B, ...] -> [M, B/M, ...]. Micro-batch i takes rows i, i + M, i + 2M, ...: with rows sharded in
    contiguous blocks over the mesh, every device holds its share of every micro-batch (no resharding)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def _merge_micro_batches(x):
    """[M, B/M, ...] -> [B, ...] (row order irrelevant: used for metrics only)."""
    return x.reshape(-1, *x.shape[2:])


def _thoughts_with_actions(thoughts: Thoughts, t_mask_bk) -> jax.Array:
    """[] float32: thoughts at valid positions with at least one action token (rlp_loss's M')."""
    action = thoughts.action_mask & t_mask_bk[:, :, None, None]
    return (action.sum(-1) > 0).sum().astype(jnp.float32)


def _ntp_tokens(batch) -> jax.Array:
    """[] float32: next-token targets of a packed batch (shifted_ntp_loss's denominator)."""
    return next_token_mask(batch["segment_ids"]).sum().astype(jnp.float32)


def _accumulated_grads(value_and_grad_fn, params, xs):
    """Gradients summed over the leading (micro-batch) axis of the pytree `xs` under `lax.scan`, in
    float32, returned in the params' dtypes; value_and_grad_fn(x) -> (value, grads).
    Returns (grads, values stacked [M, ...])."""
    def body(acc, x):
        value, g = value_and_grad_fn(x)
        return jax.tree.map(lambda a, gi: a + gi.astype(jnp.float32), acc, g), value

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, values = jax.lax.scan(body, zeros, xs)
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), values


def _combine_metrics(metrics_m: dict, weights_m) -> dict:
    """Per-micro-batch metrics [M] -> one value: maxima and minima over micro-batches, everything else
    weighted by `weights_m` [M] (the micro-batches' shares of the thoughts)."""
    out = {}
    for k, v in metrics_m.items():
        if "max" in k:
            out[k] = v.max()
        elif "min" in k:
            out[k] = v.min()
        else:
            out[k] = jnp.sum(v * weights_m)
    return out


def rlp_step(state: TrainState, batch, rng, *, cfg: ModelConfig, rlp: RLPConfig,
             optimizer: optax.GradientTransformation, naive_path: bool = False, micro_batches: int = 1):
    """One RLP step (un-jitted; see `make_rlp_train_step`). Returns (new state, metrics of scalars).

    naive_path: sample and score every thought as its own sequence (the reference; for benchmarks).
    micro_batches: M > 1 splits the B rows into M micro-batches (`split_micro_batches`) processed one
      after another under `lax.scan`, so activations are those of B/M rows. All rollouts come first
      (micro-batch i samples with `fold_in(rng, i)`), then the gradients, each micro-batch's loss
      weighted by its share of the batch's thoughts (RLP term) and tokens (next-token term): given the
      same thoughts this is the gradient of the whole batch's loss (groups live inside a row, so
      group advantages are unchanged; the `batch` baseline becomes per micro-batch).
    """
    grad_fn = jax.value_and_grad(functools.partial(rlp_objective, naive_path=naive_path), has_aux=True)
    roll = functools.partial(_rollout_phase, cfg=cfg, rlp=rlp, naive_path=naive_path)
    if micro_batches == 1:
        ema_lp, t_bk, t_mask, thoughts = roll(state, batch, rng)
        (loss, (metrics, _, _)), grads = grad_fn(state.params, cfg, rlp, batch, thoughts, t_bk, t_mask, ema_lp,
                                                 state.ref_params)
        new_state, upd = _apply_update(state, grads, loss, optimizer, rlp.ema_decay)
        return new_state, {**metrics, **_rollout_metrics(thoughts, t_mask), **upd}

    mb = jax.tree.map(lambda x: split_micro_batches(x, micro_batches), batch)         # [M, B/M, L]
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(micro_batches))
    _, (ema_lp, t_bk, t_mask, thoughts) = jax.lax.scan(
        lambda c, xs: (c, roll(state, xs[0], xs[1])), None, (mb, keys))
    n_th = jax.vmap(_thoughts_with_actions)(thoughts, t_mask)                          # [M]
    n_tok = jax.vmap(_ntp_tokens)(mb)                                                  # [M]
    w_rlp, w_ntp = n_th / jnp.maximum(n_th.sum(), 1.0), n_tok / jnp.maximum(n_tok.sum(), 1.0)

    def value_and_grad(xs):
        b, th, tb, tm, elp, wr, wn = xs
        (loss, (metrics, _, _)), g = grad_fn(state.params, cfg, rlp, b, th, tb, tm, elp, state.ref_params,
                                             rlp_scale=wr, ntp_scale=wn)
        return (loss, metrics), g

    grads, (losses, metrics_m) = _accumulated_grads(value_and_grad, state.params,
                                                    (mb, thoughts, t_bk, t_mask, ema_lp, w_rlp, w_ntp))
    loss = losses.sum()                                 # = the whole batch's loss
    metrics = _combine_metrics(metrics_m, w_rlp)
    metrics["loss/total"] = loss
    if "loss/ntp" in metrics_m:
        metrics["loss/ntp"] = jnp.sum(metrics_m["loss/ntp"] * w_ntp)
    new_state, upd = _apply_update(state, grads, loss, optimizer, rlp.ema_decay)
    flat = jax.tree.map(_merge_micro_batches, thoughts)
    return new_state, {**metrics, **_rollout_metrics(flat, _merge_micro_batches(t_mask)), **upd,
                       "train/micro_batches": jnp.asarray(micro_batches, jnp.int32)}


def ntp_step(state: TrainState, batch, rng, *, cfg: ModelConfig, optimizer: optax.GradientTransformation,
             micro_batches: int = 1):
    """One next-token (continued pretraining) step, for the compute-matched CPT baseline. With
    micro_batches M > 1 the gradient is accumulated over M micro-batches, each weighted by its share of
    the batch's target tokens (the whole batch's token-mean loss, exactly)."""
    del rng

    def loss_fn(p, b, scale=1.0):
        logits, _ = model.forward(p, cfg, b["tokens"], segment_ids_bl=b["segment_ids"], positions_bl=b["positions"])
        return scale * shifted_ntp_loss(logits, b["tokens"], b["segment_ids"])

    if micro_batches == 1:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    else:
        mb = jax.tree.map(lambda x: split_micro_batches(x, micro_batches), batch)
        n_tok = jax.vmap(_ntp_tokens)(mb)
        w = n_tok / jnp.maximum(n_tok.sum(), 1.0)

        grads, losses = _accumulated_grads(lambda xs: jax.value_and_grad(loss_fn)(state.params, *xs),
                                           state.params, (mb, w))
        loss = losses.sum()
    new_state, upd = _apply_update(state, grads, loss, optimizer, None)
    return new_state, {"loss/total": loss, "loss/ntp": loss, **upd}


def _with_activation_sharding(fn, mesh):
    """fn(first, batch, rng) traced with the model's activation constraints active on `mesh`."""
    def traced(first, batch, rng):
        with sharding.activation_sharding(mesh):
            return fn(first, batch, rng)
    return traced


def _jit_step(step_fn, mesh, state_shardings, micro_batches: int, **static):
    """`step_fn(state, batch, rng, micro_batches=..., **static)` jitted with donation; on a mesh, batch rows
    split over data x fsdp, the state as `state_shardings`. Refuses micro_batches < 1 before any compile."""
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    fn = functools.partial(step_fn, micro_batches=micro_batches, **static)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    replicated = NamedSharding(mesh, P())
    return jax.jit(_with_activation_sharding(fn, mesh), donate_argnums=0,
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
                   out_shardings=(state_shardings, replicated))


def make_rlp_train_step(cfg: ModelConfig, rlp: RLPConfig, optimizer: optax.GradientTransformation, *,
                        mesh=None, state_shardings=None, naive_path: bool = False, micro_batches: int = 1):
    """`rlp_train_step(state, batch, rng) -> (state, metrics)`, jit-compiled.

    With `mesh` (and the state's `state_shardings`, see `rlp_jax.sharding.state_shardings`) the step
    runs SPMD over the mesh: batch rows over data x fsdp, activations constrained by logical names.
    micro_batches: gradient accumulation over M micro-batches of B/M rows (see `rlp_step`); B/M must
    still split over the mesh's data x fsdp.
    """
    rlp.rollout.markers()
    return _jit_step(rlp_step, mesh, state_shardings, micro_batches, cfg=cfg, rlp=rlp, optimizer=optimizer,
                     naive_path=naive_path)


def make_ntp_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, *, mesh=None,
                        state_shardings=None, micro_batches: int = 1):
    """`ntp_train_step(state, batch, rng) -> (state, metrics)`, jit-compiled (mesh and micro_batches as above)."""
    return _jit_step(ntp_step, mesh, state_shardings, micro_batches, cfg=cfg, optimizer=optimizer)


def eval_metrics(params, batch, rng, *, cfg: ModelConfig, rlp: RLPConfig):
    """Held-out metrics of the policy (no update), means over valid sampled positions:

    eval/nll_no_think: -log p_theta(x_t | x_<t); eval/nll_think: -log p_theta(x_t | x_<t, thought),
    averaged over G sampled thoughts; eval/info_gain: their difference (positive: thinking helps);
    eval/nll_tokens: next-token NLL of every token of the batch; eval/thought_len: mean thought length.
    """
    k_pos, k_roll = jax.random.split(rng)
    h = rlp.reward.horizon
    doc = dict(segment_ids_bl=batch["segment_ids"], positions_bl=batch["positions"])
    ctx = prompt_context(params, cfg, rlp)
    logits, prefix = model.forward(params, cfg, batch["tokens"], return_cache=ctx is None, **doc)
    lp = reward.shifted_token_logprobs(logits, batch["tokens"])                   # [B, L] plain text
    no_think_lp = lp
    if ctx is not None:   # thoughts are sampled after the prompt; "no thought" reads it if the teacher does
        prompted, prefix = model.forward(params, cfg, batch["tokens"], return_cache=True,
                                         return_logits=rlp.prompt.teacher_sees, context=ctx, **doc)
        if rlp.prompt.teacher_sees:
            no_think_lp = reward.shifted_token_logprobs(prompted, batch["tokens"])
    t_bk, t_mask = positions.select_positions(k_pos, batch["segment_ids"], batch["positions"], lp,
                                              rlp.rollout, h)
    thoughts = thought_rollout(params, cfg, prefix, t_bk, k_roll, rlp.rollout)
    targets = reward.gather_horizon(batch["tokens"], t_bk, h)
    _, tgt_lp, _ = thought_forward(params, cfg, prefix, t_bk, thoughts, targets, rlp.rollout)
    no_think = reward.gather_horizon(no_think_lp, t_bk, h).sum(-1)                # [B, K]
    think = tgt_lp.sum(-1).mean(-1)                                               # [B, K]
    n = jnp.maximum(t_mask.sum(), 1)
    vmean = lambda x: jnp.sum(jnp.where(t_mask, x, 0.0)) / n
    return {"eval/nll_no_think": -vmean(no_think), "eval/nll_think": -vmean(think),
            "eval/info_gain": vmean(think - no_think),
            "eval/nll_tokens": shifted_ntp_loss(logits, batch["tokens"], batch["segment_ids"]),
            "eval/thought_len": vmean(thoughts.lengths.mean(-1).astype(jnp.float32))}


def make_eval_step(cfg: ModelConfig, rlp: RLPConfig, *, mesh=None, param_shardings=None):
    """`eval_step(params, batch, rng) -> metrics`, jit-compiled (sharded like training on a mesh)."""
    fn = functools.partial(eval_metrics, cfg=cfg, rlp=rlp)
    if mesh is None:
        return jax.jit(fn)
    replicated = NamedSharding(mesh, P())
    return jax.jit(_with_activation_sharding(fn, mesh), in_shardings=(param_shardings, sharding.batch_sharding(mesh), replicated),
                   out_shardings=replicated)
