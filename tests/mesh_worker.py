"""Run in a subprocess with 8 host devices: one RLP (or NTP) step on several meshes vs one device; the thought
sampler on an fsdp mesh under each `sampler_weights`, its tokens and the collectives of its token loop."""

import contextlib
import dataclasses
import json
import os
import sys

from tests.xla_env import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(devices=8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlp_jax import sharding  # noqa: E402
from rlp_jax.model import family  # noqa: E402
from rlp_jax.model.dense import transformer  # noqa: E402
from rlp_jax.model.dense.config import ModelConfig  # noqa: E402
from rlp_jax.plan import roofline  # noqa: E402
from rlp_jax.rlp.config import RLPConfig, RolloutConfig  # noqa: E402
from rlp_jax.rlp.objective import Objective  # noqa: E402
from rlp_jax.rlp.rollout import SAMPLER_SCOPE, thought_rollout  # noqa: E402
from rlp_jax.rlp.think_ids import ThinkIds  # noqa: E402
from rlp_jax.train import train_step  # noqa: E402

CFG = ModelConfig.preset("tiny", vocab_size=64)
RLP = Objective(RLPConfig(rollout=RolloutConfig(group_size=2, positions_per_doc=2, thought_len=4, min_context=2,
                                                temperature=1.0)), ThinkIds(start=1, end=2))


def run(mesh_shape, kind):
    params = transformer.init_params(CFG, jax.random.key(0), std=0.2)
    # SGD: updated params differ exactly by the gradient differences (Adam would amplify fp noise in
    # near-zero gradients to +-lr on its first step).
    opt = optax.sgd(0.5)
    toks = jax.random.randint(jax.random.key(1), (8, 16), 3, CFG.vocab_size)
    batch = {"tokens": np.asarray(toks), "segment_ids": np.ones((8, 16), np.int32),
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy()}
    make = train_step.make_rlp_train_step if kind == "rlp" else train_step.make_ntp_train_step
    extra = (RLP,) if kind == "rlp" else ()
    if mesh_shape is None:
        state = train_step.init_train_state(params, opt)
        step = make(CFG, *extra, opt)
        batch = jax.tree.map(jnp.asarray, batch)
    else:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2]))
        layout = train_step.state_layout(CFG, opt, mesh)
        p_sh = layout.param_shardings
        state = layout.init(params)
        step = make(CFG, *extra, opt, mesh=mesh, state_shardings=layout.shardings)
        batch = sharding.global_batch(batch, mesh)
        assert state.params["layers"]["q_proj"].sharding.spec == p_sh["layers"]["q_proj"].spec
    # the model's activation constraints (`sharding.constrain`) reach the program only on a mesh
    hlo = step.lower(state, batch, jax.random.key(3)).as_text()
    constraints = sum("sharding_constraint" in line and "@empty_mesh" not in line for line in hlo.splitlines())
    state, metrics = step(state, batch, jax.random.key(3))
    flat = {jax.tree_util.keystr(k): np.asarray(v).tolist() for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
    specs = {jax.tree_util.keystr(k): str(getattr(v.sharding, "spec", "")) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
    return {"loss": float(metrics["loss/total"]), "params": flat, "specs": specs, "constraints": constraints}


MESHES = {"rlp": [(2, 4, 1), (2, 2, 2)], "ntp": [(2, 2, 2)]}   # data x fsdp, and all three axes


def sample(preset, sampler_weights, mesh_shape):
    """Thoughts sampled from 8 documents on one device (mesh_shape None) or a mesh, and the collectives of the
    token loop of the compiled program (`roofline.Program.collectives`)."""
    cfg = family.preset(preset, sampler_weights=sampler_weights)
    if preset.startswith("nemotron"):   # with the projections' biases too (vectors sharded over fsdp)
        cfg = dataclasses.replace(cfg, use_bias=True, mlp_bias=True)
    params = family.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 3, 64)
    t_bk = jnp.asarray([[3, 9]] * 8, jnp.int32)
    mesh = None
    if mesh_shape is not None:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2]))
        params = jax.device_put(params, sharding.tree_shardings(family.param_logical_axes(cfg), params, mesh))
        tokens, t_bk = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in (tokens, t_bk))

    @jax.jit
    def rollout(params, tokens, t_bk, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext():
            _, prefix = family.forward(params, cfg, tokens, return_cache=True, branch_positions_bk=t_bk)
            return thought_rollout(params, cfg, prefix, t_bk, rng, RLP.rlp.rollout, RLP.ids)

    program = roofline.Program(rollout.lower(params, tokens, t_bk, jax.random.key(3)).compile().as_text())
    loops = [lp for lp in program.loops.values() if lp.written_as(SAMPLER_SCOPE)]
    assert len(loops) == 1, [lp.name for lp in program.loops.values()]
    ops, nbytes = program.collectives(loops[0].body)
    out = rollout(params, tokens, t_bk, jax.random.key(3))
    return {"tokens": np.asarray(out.tokens).tolist(), "logprobs": np.asarray(out.logprobs).tolist(),
            "collectives": ops, "collective_bytes": nbytes}


SAMPLER_MESH = (1, 8, 1)   # fsdp only: every weight matrix is sharded over all 8 devices

if __name__ == "__main__":
    out = {"devices": jax.device_count()}
    for kind in sys.argv[1].split(","):
        if kind == "sampler":
            out[kind] = {f"{preset} {weights} {shape}": sample(preset, weights, shape)
                         for preset in ("tiny", "nemotron-h-tiny") for weights in ("sharded", "gathered")
                         for shape in (None, SAMPLER_MESH)}
            continue
        out[kind] = {"single": run(None, kind)}
        for shape in MESHES[kind]:
            out[kind][str(shape)] = run(shape, kind)
    print("RESULT" + json.dumps(out))
