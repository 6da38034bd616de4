"""One RLP optimisation step, jit-compiled: positions -> rollout -> reward -> advantages -> loss -> update -> EMA
(the math in `rlp_jax.rlp.objective`; here the train state, the update, micro-batching and the jit wrappers).

The step is pure: `step(state, batch, rng) -> (state, metrics)`; the host loop owns data, logging and
checkpoints. A batch is a dict of [B, L] int32 arrays: `tokens`, `segment_ids` (0 = padding, packed
documents numbered 1, 2, ...) and `positions` (rotary positions, restarting per document).

Shapes: B rows, L tokens, K positions per row, G thoughts per position, T thought slots, H horizon,
R = B*K*G thoughts, M micro-batches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlp_jax import sharding
from rlp_jax.model import family
from rlp_jax.model.family import Config
from rlp_jax.rlp import think_eval
from rlp_jax.rlp.losses import next_token_count, shifted_ntp_loss
from rlp_jax.rlp.objective import (
    METRIC_REDUCTIONS,
    Objective,
    Scale,
    accumulation_weights,
    finish_metrics,
    loss_and_grad,
    rollout_metrics,
    rollout_phase,
)
from rlp_jax.rlp.teacher import ema_update, init_ema
from rlp_jax.runs import checkpoint, layout
from rlp_jax.runs.checkpoint import all_finite
from rlp_jax.train.optim import make_optimizer


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


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """A run's train state before it exists: its abstract shapes and its shardings on a mesh.

    params: abstract params ([ShapeDtypeStruct] pytree); param_shardings: theirs on the mesh.
    abstract: the abstract TrainState; shardings: its shardings (params, EMA, optimizer moments sharded
    like the params; scalars replicated)."""

    cfg: Config
    optimizer: optax.GradientTransformation
    keep_reference: bool
    params: Any
    param_shardings: Any
    abstract: TrainState
    shardings: Any

    def init(self, params) -> TrainState:
        """The fresh state of `params`, placed as `shardings` say (one jitted init, nothing gathered)."""
        return jax.jit(functools.partial(init_train_state, optimizer=self.optimizer,
                                         keep_reference=self.keep_reference), out_shardings=self.shardings)(params)

    def init_params(self, rng):
        """Random params of the model, created sharded."""
        return jax.jit(lambda k: family.init_params(self.cfg, k), out_shardings=self.param_shardings)(rng)

    def restore_target(self) -> TrainState:
        """The abstract state with its shardings attached: what Orbax restores into."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract,
                            self.shardings)


def state_layout(cfg: Config, optimizer: optax.GradientTransformation, mesh, *,
                 keep_reference: bool = False) -> StateLayout:
    """The one recipe for a sharded train state (training, loading a run, the planner, benchmarks).
    `mesh` may be a `jax.sharding.AbstractMesh` (the planner's: no devices needed)."""
    params = jax.eval_shape(lambda k: family.init_params(cfg, k), jax.random.key(0))
    p_sh = sharding.tree_shardings(family.param_logical_axes(cfg), params, mesh)
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, keep_reference=keep_reference), params)
    return StateLayout(cfg, optimizer, keep_reference, params, p_sh, abstract,
                       sharding.state_shardings(abstract, p_sh, mesh))


def _apply_update(state: TrainState, grads, loss, optimizer, ema_decay: float | None):
    """Optimizer + EMA update; skipped (all but the step counter unchanged) if the loss, the gradients or the
    updated params are non-finite."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The update itself must be finite too: a finite gradient times a non-finite or overflowing step size
    # would otherwise write NaN params into the "last good state".
    finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if ema_decay is not None:
        new = new.replace(ema_params=ema_update(state.ema_params, params, ema_decay))
    # A skipped step keeps params, EMA and optimizer state but still counts as a step (state.step is
    # the number of batches consumed, which checkpoints and the data iterator agree on).
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
    metrics = {"train/grad_norm": optax.tree.norm(grads), "train/skipped_nonfinite": (~finite).astype(jnp.int32)}
    return new, metrics


def split_micro_batches(x, m: int):
    """[B, ...] -> [M, B/M, ...]. Micro-batch i takes rows i, i + M, i + 2M, ...: with rows sharded in
    contiguous blocks over the mesh, every device holds its share of every micro-batch (no resharding)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def _merge_micro_batches(x):
    """[M, B/M, ...] -> [B, ...] (row order irrelevant: used for metrics only)."""
    return x.reshape(-1, *x.shape[2:])


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


def combine_metrics(metrics_m: dict, shares_m: dict) -> dict:
    """Per-micro-batch metrics [M] -> the batch's, each by its declared reduction
    (`rlp.objective.METRIC_REDUCTIONS`); shares_m: {"thoughts" | "tokens" | "ntp_tokens": [M] shares summing to 1}."""
    out = {}
    for k, v in metrics_m.items():
        how = METRIC_REDUCTIONS.get(k)
        if how is None:
            raise KeyError(f"metric {k!r} declares no reduction over micro-batches (rlp.objective.METRIC_REDUCTIONS)")
        if how in shares_m:
            out[k] = jnp.sum(v * shares_m[how])
        else:
            out[k] = {"sum": jnp.sum, "max": jnp.max, "min": jnp.min, "rows": jnp.mean}[how](v)
    return out


def rlp_step(state: TrainState, batch, rng, *, cfg: Config, objective: Objective,
             optimizer: optax.GradientTransformation, micro_batches: int = 1):
    """One RLP step (un-jitted; see `make_rlp_train_step`): the batch's rows as M micro-batches (M = 1: one of
    B rows), all rollouts first, then the gradients, one update. Returns (new state, metrics of scalars).

    Micro-batch i takes rows i, i + M, ... (`split_micro_batches`) and samples with `fold_in(rng, i)` (M = 1:
    `rng`); its loss is weighted by its share of the batch's thoughts (RLP term) and target tokens (next-token
    term), so given the same thoughts the gradient is the whole batch's (groups live inside a row; the `batch`
    baseline becomes per micro-batch).
    """
    m = micro_batches
    mb = jax.tree.map(lambda x: split_micro_batches(x, m), batch)                        # [M, B/M, L]
    keys = rng[None] if m == 1 else jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(m))
    _, rollouts = jax.lax.scan(lambda c, xs: (c, rollout_phase(state, cfg, objective, xs[0], xs[1])), None, (mb, keys))
    counts = jax.vmap(accumulation_weights)(rollouts, mb)                              # {kind: [M]}
    shares = {k: v / jnp.maximum(v.sum(), 1.0) for k, v in counts.items()}

    def value_and_grad(xs):
        b, ro, w_rlp, w_ntp = xs
        out, g = loss_and_grad(state.params, cfg, objective, b, ro, Scale(rlp=w_rlp, ntp=w_ntp))
        return (out.loss, out.metrics), g

    grads, (losses, metrics_m) = _accumulated_grads(value_and_grad, state.params,
                                                    (mb, rollouts, shares["thoughts"], shares["ntp_tokens"]))
    loss = losses.sum()                                                                # = the whole batch's loss
    metrics = finish_metrics(combine_metrics(metrics_m, shares))
    new_state, upd = _apply_update(state, grads, loss, optimizer, objective.rlp.ema_decay)
    flat = jax.tree.map(_merge_micro_batches, rollouts)
    out = {**metrics, **rollout_metrics(flat.thoughts, flat.mask), **upd}
    if m > 1:
        out["train/micro_batches"] = jnp.asarray(m, jnp.int32)
    return new_state, out


def ntp_step(state: TrainState, batch, rng, *, cfg: Config, optimizer: optax.GradientTransformation,
             micro_batches: int = 1):
    """One next-token (continued pretraining) step, for the compute-matched CPT baseline. With
    micro_batches M > 1 the gradient is accumulated over M micro-batches, each weighted by its share of
    the batch's target tokens (the whole batch's token-mean loss, exactly)."""
    del rng

    def loss_fn(p, b, scale=1.0):
        logits, _ = family.forward(p, cfg, b["tokens"], segment_ids_bl=b["segment_ids"], positions_bl=b["positions"])
        return scale * shifted_ntp_loss(logits, b["tokens"], b["segment_ids"])

    if micro_batches == 1:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    else:
        mb = jax.tree.map(lambda x: split_micro_batches(x, micro_batches), batch)
        n_tok = jax.vmap(next_token_count)(mb["segment_ids"])
        w = n_tok / jnp.maximum(n_tok.sum(), 1.0)

        grads, losses = _accumulated_grads(lambda xs: jax.value_and_grad(loss_fn)(state.params, *xs),
                                           state.params, (mb, w))
        loss = losses.sum()
    new_state, upd = _apply_update(state, grads, loss, optimizer, None)
    return new_state, {"loss/total": loss, "loss/ntp": loss, **upd}


def _with_activation_sharding(fn, mesh):
    """fn(first, batch, rng) traced with the model's activation constraints active on `mesh`."""
    def traced(first, batch, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
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


def make_rlp_train_step(cfg: Config, objective: Objective, optimizer: optax.GradientTransformation, *,
                        mesh=None, state_shardings=None, micro_batches: int = 1):
    """`rlp_train_step(state, batch, rng) -> (state, metrics)`, jit-compiled.

    With `mesh` (and the state's `state_shardings`, see `rlp_jax.sharding.state_shardings`) the step
    runs SPMD over the mesh: batch rows over data x fsdp, activations constrained by logical names.
    micro_batches: gradient accumulation over M micro-batches of B/M rows (see `rlp_step`); B/M must
    still split over the mesh's data x fsdp.
    """
    return _jit_step(rlp_step, mesh, state_shardings, micro_batches, cfg=cfg, objective=objective,
                     optimizer=optimizer)


def make_ntp_train_step(cfg: Config, optimizer: optax.GradientTransformation, *, mesh=None,
                        state_shardings=None, micro_batches: int = 1):
    """`ntp_train_step(state, batch, rng) -> (state, metrics)`, jit-compiled (mesh and micro_batches as above)."""
    return _jit_step(ntp_step, mesh, state_shardings, micro_batches, cfg=cfg, optimizer=optimizer)


def make_eval_step(cfg: Config, objective: Objective, *, mesh=None, param_shardings=None):
    """`eval_step(params, batch, rng) -> metrics`, jit-compiled (sharded like training on a mesh)."""
    fn = functools.partial(think_eval.heldout_metrics, cfg=cfg, objective=objective)
    if mesh is None:
        return jax.jit(fn)
    replicated = NamedSharding(mesh, P())
    return jax.jit(_with_activation_sharding(fn, mesh), in_shardings=(param_shardings, sharding.batch_sharding(mesh), replicated),
                   out_shardings=replicated)


def load_run_state(run_dir, *, step: int | None = None, mesh=None):
    """Restore the whole train state of a run's checkpoint (params, EMA, optimizer, step; read-only), as the
    run built it (its optimizer from the run's record). Readers that need the weights alone use
    `runs.loading.load_run_params`. Returns (checkpoint.Restored, the run's RunRecord)."""
    if not layout.is_run_dir(run_dir):
        raise layout.LoadError(f"{run_dir} is not an rlp_jax run directory (no config.json + checkpoints/)")
    record = layout.read_run_record(run_dir)
    cfg = record.run
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1)) if mesh is None else mesh
    state = state_layout(record.model, make_optimizer(cfg.optim, cfg.train.steps), mesh,
                         keep_reference=cfg.keeps_kl_reference)
    ckpt = checkpoint.Checkpointer(layout.local_dirs(run_dir)[1], save_every=1, read_only=True)
    try:
        restored = ckpt.restore(state.restore_target(), config=record.raw, step=step)
    finally:
        ckpt.close()
    if restored is None:
        raise layout.LoadError(f"{run_dir} holds no checkpoint yet")
    return restored, record
