"""The parameter pytree of the decoder: every array's shape, its logical axis names (for sharding rules)
and a random init. Per-layer arrays are stacked on a leading `layers` axis (the blocks run under
`lax.scan`). `rlp_jax.model.dense.transformer` re-exports these names; `rlp_jax.model.dense.hf` / `gguf` convert
checkpoints to and from this layout.

Shapes (docs/method.md): Y layers, D width, F MLP width, Q / E query / key-value heads, W head width,
V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlp_jax import sharding
from rlp_jax.model.dense.config import ModelConfig

Params = dict


def param_shapes(cfg: ModelConfig) -> dict:
    """Shapes of every parameter, as a pytree of tuples mirroring `init_params`."""
    y, d, f, h, hk, dh, v = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                             cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    lay = {
        "attn_norm": (y, d),
        "q_proj": (y, d, h, dh),
        "k_proj": (y, d, hk, dh),
        "v_proj": (y, d, hk, dh),
        "o_proj": (y, h, dh, d),
        "mlp_norm": (y, d),
        "gate_proj": (y, d, f),
        "up_proj": (y, d, f),
        "down_proj": (y, f, d),
    }
    if cfg.attention_bias:
        lay.update(q_bias=(y, h, dh), k_bias=(y, hk, dh), v_bias=(y, hk, dh))
    if cfg.qk_norm:
        lay.update(q_norm=(y, dh), k_norm=(y, dh))
    shapes = {"embed": (v, d), "layers": lay, "final_norm": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (d, v)
    return shapes


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every parameter (same structure as `init_params`), for sharding rules."""
    names = {
        "attn_norm": ("layers", "norm"), "mlp_norm": ("layers", "norm"),
        "q_proj": ("layers", "embed", "heads", "head_dim"),
        "k_proj": ("layers", "embed", "kv_heads", "head_dim"),
        "v_proj": ("layers", "embed", "kv_heads", "head_dim"),
        "o_proj": ("layers", "heads", "head_dim", "embed"),
        "q_bias": ("layers", "heads", "head_dim"),
        "k_bias": ("layers", "kv_heads", "head_dim"), "v_bias": ("layers", "kv_heads", "head_dim"),
        "q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim"),
        "gate_proj": ("layers", "embed", "mlp"), "up_proj": ("layers", "embed", "mlp"),
        "down_proj": ("layers", "mlp", "embed"),
    }
    shapes = param_shapes(cfg)
    axes = {"embed": ("vocab", "embed"), "final_norm": ("norm",),
            "layers": {k: names[k] for k in shapes["layers"]}}
    if "lm_head" in shapes:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def init_params(cfg: ModelConfig, rng: jax.Array, std: float = 0.02) -> Params:
    """Random parameters: normal(0, std) matrices, unit norm weights, zero biases; in cfg.param_dtype."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(flat))
    leaves = []
    for (path, shape), key in zip(flat, keys):
        name = path[-1].key
        if name.endswith("norm"):
            leaf = jnp.ones(shape, jnp.float32)
        elif name.endswith("bias"):
            leaf = jnp.zeros(shape, jnp.float32)
        else:
            leaf = std * jax.random.normal(key, shape, jnp.float32)
        leaves.append(leaf.astype(cfg.jnp_param_dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# read(path, index) -> the numpy values of params[path][index]: path as ("embed",) or ("layers", "q_proj"),
# index a tuple of slice(start, stop) over the parameter's whole shape (layers axis included).
LeafReader = Callable[[tuple, tuple], np.ndarray]


def assemble(cfg: ModelConfig, read: LeafReader, mesh: jax.sharding.Mesh | None = None) -> Params:
    """The params pytree of a checkpoint, one parameter at a time, from `read` (our layout).

    mesh None: whole host numpy arrays in cfg.param_dtype. With a mesh: every parameter is a global
    `jax.Array` with its `param_logical_axes` sharding, built by `jax.make_array_from_callback`, so this
    process asks `read` only for the slices its own devices hold (each distinct slice once), and no host
    or device ever holds a parameter it does not serve."""
    shapes, axes, dtype = param_shapes(cfg), param_logical_axes(cfg), cfg.jnp_param_dtype

    def leaf(path: tuple, shape: tuple, names: tuple):
        if mesh is None:
            return np.ascontiguousarray(read(path, tuple(slice(0, n) for n in shape)).astype(dtype, copy=False))
        done: dict[tuple, np.ndarray] = {}   # a replicated slice is read once, however many devices hold it

        def shard(index: tuple) -> np.ndarray:
            key = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
            bounds = tuple((s.start, s.stop) for s in key)
            if bounds not in done:
                done[bounds] = np.ascontiguousarray(read(path, key).astype(dtype, copy=False))
            return done[bounds]

        spec = sharding.logical_to_spec(names, shape, mesh)
        return jax.make_array_from_callback(shape, jax.sharding.NamedSharding(mesh, spec), shard)

    params: Params = {k: leaf((k,), shapes[k], axes[k]) for k in shapes if k != "layers"}
    params["layers"] = {k: leaf(("layers", k), shapes["layers"][k], axes["layers"][k]) for k in shapes["layers"]}
    return params
