"""The host loop around the jitted step (`rlp_jax.train.train_step`): `run(cfg, workdir)` builds the mesh, model,
optimizer and Grain pipeline, resumes from the latest Orbax checkpoint in the workdir (params, EMA,
optimizer, step, RNG and data-iterator state), runs the steps with a progress bar, writes metrics (JSONL +
TensorBoard), evaluates on the held-out split, saves every N steps, on SIGTERM / Ctrl-C and at the end, and plots
the curves. The command line is `rlp_jax.train.cli`."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from rlp_jax import fetch, sharding
from rlp_jax.data.pipeline import DataError, make_iterator
from rlp_jax.data.tokenizer import TokenizerError, load_tokenizer
from rlp_jax.model import family
from rlp_jax.model.family import Config
from rlp_jax.model.safetensors_io import CheckpointError
from rlp_jax.rlp.objective import Objective
from rlp_jax.rlp.prompt import PromptError
from rlp_jax.rlp.think_ids import ThinkIdsError, think_ids
from rlp_jax.runs import checkpoint, layout, loading
from rlp_jax.runs.config import ConfigError, RunConfig, to_dict
from rlp_jax.train import aot, lock, train_step
from rlp_jax.train.metrics import MetricsWriter
from rlp_jax.train.optim import learning_rate, make_optimizer
from rlp_jax.train.preemption import Preemption

log = logging.getLogger("rlp_jax.train")

USER_ERRORS = (ConfigError, DataError, TokenizerError, CheckpointError, checkpoint.CheckpointMismatch,
               checkpoint.CheckpointRestoreError, checkpoint.CheckpointSaveError, layout.LoadError,
               fetch.FetchError)


class TrainingStopped(RuntimeError):
    """The run stopped itself (non-finite steps in a row); the last good state was saved."""


# ----------------------------------------------------------------------------------------------
# Building the pieces
# ----------------------------------------------------------------------------------------------

def build_model(cfg: RunConfig, tokenizer, rng, mesh=None) -> tuple[Config, dict | None]:
    """Model config and params: from a Hugging Face checkpoint or GGUF file (onto `mesh` when given: each process
    reads only its devices' slices) or an rlp_jax run directory (its latest policy params), or None for a random
    init (done later on the mesh). Embeddings grow when the tokenizer added tokens (the think markers)."""
    m = cfg.model
    if m.init_from is None:
        return trained_model_config(cfg, tokenizer), None
    if layout.is_run_dir(m.init_from):  # an earlier rlp_jax run (e.g. the NTP stage before RLP): its policy
        mcfg, params, step, _ = loading.load_run_params(m.init_from)
        log.info("initialising from %s step %d", m.init_from, step)
        mcfg = mcfg.replace(**m.overrides)
        params = jax.tree.map(lambda p: p.astype(mcfg.jnp_param_dtype), params)
        if tokenizer.vocab_size != mcfg.vocab_size:
            raise ConfigError(f"model.init_from={m.init_from} has vocab_size {mcfg.vocab_size} but the tokenizer has "
                              f"{tokenizer.vocab_size}; use the tokenizer that run trained with")
        return mcfg, params
    mcfg, params = loading.load_pretrained(m.init_from, mesh=mesh, **m.overrides)
    if tokenizer.vocab_size > mcfg.vocab_size:
        log.info("growing the embedding from %d to %d rows for added tokens (%s init)", mcfg.vocab_size,
                 tokenizer.vocab_size, m.new_token_init)
    return loading.fit_embeddings(mcfg, params, tokenizer, rng, init=m.new_token_init, marker_rows=m.marker_rows)


def objective_of(cfg: RunConfig, tokenizer) -> Objective:
    """The run's objective: its settings (`cfg.rlp`) and what they take from the tokenizer (the markers, the
    banned ids, the rendered prompt: `rlp.think_ids.think_ids`). A prompt the tokenizer cannot render is a
    ConfigError."""
    try:
        return Objective(rlp=cfg.rlp, ids=think_ids(cfg.rlp, tokenizer))
    except (PromptError, ThinkIdsError) as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


# Every random use of a run draws from its own fold of the run's key (train.seed), never from another's.
KEY_STREAMS = {"build": 0, "init": 1, "steps": 2, "eval": 3}


def run_key(base_rng, use: str, index: int | None = None):
    """The key of one random use of a run ("build": the added embedding rows, "init": a random init,
    "steps": step `index`'s positions and thoughts, "eval": eval batch `index`'s)."""
    key = jax.random.fold_in(base_rng, KEY_STREAMS[use])
    return key if index is None else jax.random.fold_in(key, index)


def evaluate_batches(eval_fn, params, batches, seed: int) -> dict:
    """The held-out eval of `params`: `eval_fn` on each batch with its own fixed eval key (the same at
    every step, so evals of a run compare like with like), averaged over the batches. Floats."""
    ev = [jax.device_get(eval_fn(params, b, run_key(jax.random.key(seed), "eval", i))) for i, b in enumerate(batches)]
    return {k: float(np.mean([e[k] for e in ev])) for k in ev[0]}


def check_workdir(workdir: Path) -> None:
    """Create the (local) run directory, or a one-line ConfigError when it cannot be written there."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; choose another path")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".rlp_jax_write_test.{socket.gethostname()}.{os.getpid()}"   # one per process
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot write a run directory there ({e.strerror or e}); choose "
                          "a writable directory path") from None


def tokenizer_source(cfg: RunConfig) -> str:
    """Where a run's tokenizer is read from: train.tokenizer, else model.init_from's (a run's own tokenizer
    when it names a run directory)."""
    tc = cfg.train
    path = tc.tokenizer or cfg.model.init_from
    if tc.tokenizer is None and path is not None and layout.is_run_dir(path):
        path = layout.run_tokenizer_path(layout.local_dirs(path)[0], layout.read_run_record(path).run)
    if path is None:
        raise ConfigError("no tokenizer: set --set train.tokenizer=PATH (a sentencepiece .model, a .gguf file or a "
                          "Hugging Face tokenizer dir) or model.init_from")
    return path


def run_tokenizer(cfg: RunConfig):
    """The tokenizer a run trains with (`tokenizer_source`), with the think markers of model.think_tokens."""
    return load_tokenizer(tokenizer_source(cfg), think_tokens=cfg.model.think_tokens)


def trained_model_config(cfg: RunConfig, tokenizer) -> Config:
    """The model config `build_model` gives `cfg`, read without weights (its vocabulary grown to the tokenizer's
    when the tokenizer added the markers): what a train step for `cfg` is compiled for."""
    mcfg = loading.model_config(cfg.model)
    if cfg.model.init_from is None or tokenizer.vocab_size > mcfg.vocab_size:
        mcfg = mcfg.replace(vocab_size=tokenizer.vocab_size)
    return mcfg


def run_mesh(cfg: RunConfig, mcfg: Config):
    """The run's mesh, after the checks that need it (rows split over it and into micro-batches)."""
    tc = cfg.train
    try:
        mesh = sharding.make_mesh(tc.mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ro, seq_len = cfg.rlp.rollout, cfg.data.seq_len
    if tc.objective == "rlp" and (ro.min_context + cfg.rlp.reward.horizon > seq_len or ro.positions_per_doc > seq_len):
        raise ConfigError(f"no position of a {seq_len}-token row can be chosen: rlp.rollout.min_context "
                          f"({ro.min_context}) + reward.horizon must be <= data.seq_len and "
                          f"rollout.positions_per_doc ({ro.positions_per_doc}) <= data.seq_len")
    if not family.supports_prompt(mcfg) and cfg.rlp.prompt.style != "none":
        raise ConfigError("a Nemotron-H model reads documents without a prompt: leave rlp.prompt.style=none (prompts "
                          "are supported for the transformer families)")
    if mcfg.param_dtype == "bfloat16" and cfg.optim.lr < 1e-4:
        log.warning("model.param_dtype=bfloat16 keeps no float32 master weights: updates of lr=%g are below bf16 "
                    "resolution for most weights; prefer param_dtype=float32 with compute_dtype=bfloat16",
                    cfg.optim.lr)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % rows:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split over the mesh's data x fsdp = "
                          f"{rows} devices; use a multiple of {rows}")
    if cfg.data.batch_size % (rows * tc.micro_batches):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split into train.micro_batches="
                          f"{tc.micro_batches} micro-batches of whole rows on each of the {rows} data x fsdp "
                          f"devices; use a batch size that is a multiple of {rows * tc.micro_batches}")
    return mesh


def run_record(cfg: RunConfig, mcfg: Config, experiment: str) -> dict:
    """What config.json and every checkpoint hold (`run_dir.read_run_record` reads it back, typed). "model"
    holds what must match to resume (shapes and storage dtype); remat and compute dtype may change."""
    return {"model": mcfg.stored_fields(), "model_full": dataclasses.asdict(mcfg), "run": to_dict(cfg),
            "experiment": experiment}


def held_out(cfg: RunConfig, objective: Objective, tokenizer, mcfg: Config, mesh, param_shardings):
    """(eval_fn, the held-out batches) of a run, or (None, []) when train.eval_every is 0."""
    tc = cfg.train
    if tc.eval_every <= 0:
        return None, []
    if cfg.data.eval_fraction <= 0:
        raise ConfigError("train.eval_every > 0 needs a held-out split: --set data.eval_fraction=0.05")
    eval_iter = make_iterator(cfg.data, tokenizer, split="eval")
    try:
        batches = [sharding.global_batch(eval_iter.next(), mesh) for _ in range(tc.eval_batches)]
    except StopIteration:
        raise ConfigError(f"the held-out split has fewer than train.eval_batches={tc.eval_batches} batches; "
                          "lower it or raise data.eval_fraction") from None
    finally:
        eval_iter.close()
    return train_step.make_eval_step(mcfg, objective, mesh=mesh, param_shardings=param_shardings), batches


class _StepLog:
    """The host side of logging: pulls a step's metrics off the device on log steps only, adds the
    learning rate, throughput and data counters, writes JSONL/TensorBoard and the progress bar."""

    def __init__(self, cfg: RunConfig, workdir: Path, start: int, experiment: str):
        self.tc, self.lr_fn = cfg.train, learning_rate(cfg.optim, cfg.train.steps)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.writer = MetricsWriter(workdir, resume_step=start, enabled=jax.process_index() == 0,
                                    wandb=cfg.train.wandb, config=to_dict(cfg))
        self.bar = tqdm(total=self.tc.steps, initial=start, desc=experiment, dynamic_ncols=True,
                        disable=jax.process_index() != 0, file=sys.stdout)
        self.t_last, self.warned_len, self.last = time.time(), False, {}

    def train(self, step: int, metrics, data_stats: dict) -> None:
        tc = self.tc
        if not (step % tc.log_every == 0 or step == tc.steps):
            return
        now = time.time()
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        host["train/lr"] = float(self.lr_fn(step - 1))
        host["perf/tokens_per_s"] = self.tokens_per_step * tc.log_every / max(now - self.t_last, 1e-9)
        host.update({f"data/{k}": float(v) for k, v in data_stats.items() if "/" not in k})
        self.t_last, self.last = now, host
        self.writer.write(step, host)
        self.bar.set_postfix(_postfix(host), refresh=False)
        if tc.objective == "rlp" and host.get("thought/mean_len", 1e9) < tc.min_thought_len and not self.warned_len:
            tqdm.write(f"warning: mean thought length {host['thought/mean_len']:.2f} < "
                       f"train.min_thought_len={tc.min_thought_len} at step {step} (thought collapse?)")
            self.warned_len = True

    def eval(self, step: int, ev: dict) -> None:
        self.writer.write(step, ev, split="eval")
        tqdm.write(f"step {step} eval: " + ", ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in ev.items()))
        self.last.update(ev)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def run(cfg: RunConfig, workdir, *, experiment: str = "custom", executable=None) -> dict:
    """Train `cfg` in `workdir` (a local path or a gs:// URL, see `runs.layout.local_dirs`), resuming if it holds
    checkpoints. executable: a train step compiled ahead of time for this run (`--executable`; `python -m
    rlp_jax.plan ... --compile --save-executable FILE`), loaded instead of compiling. Returns the last logged
    metrics (with "preempted": "SIGTERM" or "SIGINT" when a signal stopped it after a save)."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=loading.resolve_model_name(
        cfg.model.init_from)))   # a model name such as "smollm2" -> its fetched file
    workdir, ckpt_dir = layout.local_dirs(workdir)
    if "://" in ckpt_dir:
        print(f"checkpoints in {ckpt_dir}; config, metrics and plots in {workdir}")
    check_workdir(workdir)
    with lock.hold_workdir(workdir, layout.remote_workdir(ckpt_dir), process_index=jax.process_index()):
        return _run(cfg, workdir, ckpt_dir, experiment, executable)


def _run(cfg: RunConfig, workdir: Path, ckpt_dir: str, experiment: str, executable=None) -> dict:
    tc = cfg.train
    tokenizer = run_tokenizer(cfg)
    objective = objective_of(cfg, tokenizer)
    base_rng = jax.random.key(tc.seed)
    mesh = run_mesh(cfg, loading.model_config(cfg.model))
    mcfg, start_params = build_model(cfg, tokenizer, run_key(base_rng, "build"), mesh)
    optimizer = make_optimizer(cfg.optim, tc.steps)
    state_plan = train_step.state_layout(mcfg, optimizer, mesh, keep_reference=cfg.keeps_kl_reference)
    record = run_record(cfg, mcfg, experiment)
    compiled = None
    if executable is not None:   # compiled ahead of time for exactly this step (refused in one line otherwise)
        expected = aot.fingerprint(cfg, mcfg, objective.ids, platform=jax.devices()[0].platform,
                                   devices=jax.device_count(), mesh=dict(mesh.shape))
        compiled = aot.load(executable, expected)
    if (remote := layout.remote_workdir(ckpt_dir)) and jax.process_index() == 0:   # readable from the bucket alone
        try:
            layout.store_tokenizer(tokenizer_source(cfg), remote)
        except Exception as e:   # readers elsewhere then need the recorded path; training is unaffected
            log.warning("could not store the tokenizer next to the checkpoints: %s", e)
    train_iter = make_iterator(cfg.data, tokenizer, split="train")
    ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=tc.save_every, keep=tc.keep)
    try:
        if ckpt.latest_step() is not None:   # resuming: free the pretrained weights before the state comes in
            start_params = None
        restored = ckpt.restore(state_plan.restore_target(), config=record)
        if restored is None:   # a fresh state only when there is nothing to resume
            if start_params is None and cfg.model.init_from is not None:
                start_params = build_model(cfg, tokenizer, run_key(base_rng, "build"), mesh)[1]
            params = (state_plan.init_params(run_key(base_rng, "init")) if start_params is None
                      else jax.device_put(start_params, state_plan.param_shardings))
            state, start = state_plan.init(params), 0
        else:
            state, start, base_rng = restored.state, restored.step, restored.rng
            if restored.data_state is not None:
                train_iter.set_state(restored.data_state)
            print(f"resumed from {workdir} at step {start}")
    except BaseException:   # nothing to save yet: release Orbax's and Grain's threads before the error
        ckpt.close()
        train_iter.close()
        raise
    del start_params
    if (workdir / "config.json").exists():  # keep the record of what earlier steps ran with
        (workdir / f"config.before-step{start}.json").write_text((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps(record, indent=2))
    if start >= tc.steps:
        print(f"{workdir} is already at step {start} >= train.steps={tc.steps}; nothing to do")
        ckpt.close()
        train_iter.close()
        return {}
    make = (functools.partial(train_step.make_rlp_train_step, mcfg, objective) if tc.objective == "rlp"
            else functools.partial(train_step.make_ntp_train_step, mcfg))
    if compiled is None:
        step_fn = make(optimizer, mesh=mesh, state_shardings=state_plan.shardings, micro_batches=tc.micro_batches)
    else:
        step_fn = compiled
        print(f"train step loaded from {executable} (compiled ahead of time)")
    eval_fn, eval_batches = held_out(cfg, objective, tokenizer, mcfg, mesh, state_plan.param_shardings)
    logs, preempt, nonfinite_run, previous = None, Preemption(), 0, None
    save = lambda step, force=False: ckpt.save(step, state, data_state=train_iter.get_state(), rng=base_rng,
                                               config=record, force=force)
    try:
        logs = _StepLog(cfg, workdir, start, experiment)
        for step in range(start + 1, tc.steps + 1):
            try:
                batch = sharding.global_batch(train_iter.next(), mesh)
            except StopIteration:
                tqdm.write(f"data exhausted after {step - 1} steps (data.num_epochs={cfg.data.num_epochs}); "
                           "saving and stopping")
                if step - 1 > start:
                    save(step - 1, force=True)
                break
            state, metrics = step_fn(state, batch, run_key(base_rng, "steps", step))
            if previous is not None:   # the step before's skip flag: read once this step is queued, so the
                prev_step, prev_skipped = previous   # host never waits for the device here
                nonfinite_run = nonfinite_run + 1 if int(prev_skipped) else 0
                if nonfinite_run:
                    log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", prev_step,
                                nonfinite_run)
                if nonfinite_run >= tc.max_nonfinite:
                    save(step, force=True)  # skipped updates leave the params at the last good state
                    raise TrainingStopped(f"{nonfinite_run} non-finite steps in a row at step {prev_step}; the last "
                                          "good state was checkpointed. Lower optim.lr or check the data.")
            previous = (step, metrics["train/skipped_nonfinite"])
            logs.train(step, metrics, train_iter.stats())
            if eval_fn is not None and (step % tc.eval_every == 0 or step == tc.steps):
                logs.eval(step, evaluate_batches(eval_fn, state.params, eval_batches, tc.seed))
            logs.bar.update(1)
            save(step)
            if got := preempt.stop_at(step):
                tqdm.write(f"{got}: saving step {step} and exiting")
                save(step, force=True)
                logs.last["preempted"] = got   # callers that run several jobs stop here too
                logs.last["step"] = step
                break
        else:
            save(tc.steps, force=True)
    finally:
        preempt.restore()
        try:
            ckpt.wait()
        finally:
            ckpt.close()
            train_iter.close()
            if logs is not None:
                logs.close()
    if tc.plot and jax.process_index() == 0:
        _plot(workdir)
    return logs.last


def _postfix(m: dict) -> dict:
    keys = {"loss/total": "loss", "reward/mean": "reward", "eval/info_gain": "gain", "thought/mean_len": "len"}
    out = {short: f"{m[k]:.3g}" for k, short in keys.items() if k in m}
    out["tok/s"] = f"{m.get('perf/tokens_per_s', 0):.0f}"
    return out


def _plot(workdir: Path) -> None:
    try:
        from rlp_jax import plot
    except ImportError as e:  # matplotlib is an install requirement; keep training results regardless
        log.warning("plots skipped: %s", e)
        return
    paths = plot.plot_run(workdir)
    print(f"plots: {', '.join(str(p) for p in paths)}")

