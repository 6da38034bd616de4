"""NVIDIA Nemotron-H, the hybrid Mamba-2 / attention decoder, as pure functions; checkpoints from Hugging Face.

The model is a stack of blocks named by config.json's `layers_block_type`; each block is RMSNorm -> one mixer ->
residual add. Mixers: "linear_attention" (Mamba-2, `rlp_jax.model.mamba2`), "full_attention" (causal
grouped-query attention without rotary embeddings: Nemotron-H has no position encoding besides the Mamba
layers' order) and "mlp" (up -> relu^2 -> down). Matches transformers' `NemotronHForCausalLM` in float32.

Supported: `config_from_hf` (layers_block_type or the older hybrid_override_pattern, and the older
mamba_* field names), `from_hf` (a safetensors folder with model.* or backbone.* tensor names) and the
teacher-forced `forward` with a padding mask or packed segments. Not supported: MoE blocks (Nemotron-3 Nano /
Super), multi-token prediction layers, attention biases (transformers ignores `attention_bias` too). Thoughts
branched off a teacher-forced prefix (whole, or decoded token by token) are `rlp_jax.model.nemotron_h.branch`'s;
`run_blocks` returns the prefix caches they start from. Dtypes: the residual stream, attention and every
projection run in cfg.compute_dtype; norms' statistics, the Mamba conv and scan, and the logits in float32.

Shapes: B rows, L tokens, D model width, V vocabulary, Q query heads, E key/value heads, W head width,
F MLP width.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlp_jax.model import mamba2
from rlp_jax.model.config import Numerics
from rlp_jax.model.layers import (
    causal_segment_mask,
    constrain_residual,
    full_attention,
    full_attention_blockwise,
    rms_norm,
)
from rlp_jax.model.safetensors_io import CheckpointError, SafetensorsReader

MAMBA, ATTENTION, MLP = "linear_attention", "full_attention", "mlp"
BLOCK_TYPES = (MAMBA, ATTENTION, MLP)
_LEGACY_TYPES = {"mamba": MAMBA, "attention": ATTENTION}
_PATTERN = {"M": MAMBA, "*": ATTENTION, "-": MLP, "E": "moe"}
# older config.json names -> current ones (transformers' NemotronHConfig accepts both)
_ALIASES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_chunk_size": "chunk_size",
            "mamba_dt_limit": "time_step_limit", "mamba_conv_bias": "use_conv_bias"}
Params = dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class HybridConfig(Numerics):
    """Shape of a Nemotron-H model, and how it stores and runs (`Numerics`).

    block_types: one of BLOCK_TYPES per layer. use_bias: biases on the Mamba in/out projections;
    use_conv_bias: on the Mamba conv; mlp_bias: on the MLP projections. Of `Numerics`, param_dtype (storage)
    compute_dtype, remat (per block) and attention ("kernel" runs as "auto": no accelerator kernel here) apply."""

    vocab_size: int                     # V
    hidden_size: int                    # D
    block_types: tuple[str, ...]
    num_heads: int                      # Q
    num_kv_heads: int                   # E
    head_dim: int                       # W
    intermediate_size: int              # F
    mamba: mamba2.Mamba2Config
    eps: float = 1e-5                   # every RMSNorm (layer_norm_epsilon)
    tie_word_embeddings: bool = False
    use_bias: bool = False
    use_conv_bias: bool = True
    mlp_bias: bool = False
    max_position_embeddings: int = 4096   # the context length config.json declares (no position encoding limits it)

    def __post_init__(self):
        bad = sorted(set(self.block_types) - set(BLOCK_TYPES))
        if "moe" in bad:
            raise ValueError("Nemotron-H MoE variants (a 'moe' block) are not supported; use a dense Nemotron-H "
                             "(blocks linear_attention / full_attention / mlp)")
        if bad:
            raise ValueError(f"unsupported Nemotron-H block types {bad}; supported: {list(BLOCK_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                             f"{self.num_kv_heads}; fix the config")
        self.check_numerics()

    @property
    def num_layers(self) -> int:
        return len(self.block_types)

    def num_params(self) -> int:
        """Exact parameter count (`num_params`)."""
        return num_params(self)


def _block_types(hf: dict) -> tuple[str, ...]:
    if hf.get("layers_block_type"):
        return tuple(_LEGACY_TYPES.get(t, t) for t in hf["layers_block_type"])
    if hf.get("hybrid_override_pattern"):
        unknown = sorted(set(hf["hybrid_override_pattern"]) - set(_PATTERN))
        if unknown:
            raise ValueError(f"hybrid_override_pattern has unknown symbols {unknown}; expected {sorted(_PATTERN)}")
        return tuple(_PATTERN[ch] for ch in hf["hybrid_override_pattern"])
    raise ValueError("config.json has neither layers_block_type nor hybrid_override_pattern: it is not a "
                     "Nemotron-H config")


def _number(v) -> float:
    """A config.json number; transformers writes infinity as {"__float__": "Infinity"}, older files Infinity."""
    return float(v["__float__"] if isinstance(v, dict) else v)


def config_from_hf(hf: dict, **numerics) -> HybridConfig:
    """HybridConfig from a Nemotron-H config.json dict (transformers' defaults where a field is absent), with
    `Numerics` fields (param_dtype, remat, ...) from `numerics`."""
    hf = {_ALIASES.get(k, k): v for k, v in hf.items()}
    if hf.get("model_type", "nemotron_h") != "nemotron_h":
        raise ValueError(f"model_type {hf['model_type']!r} is not nemotron_h; load it with rlp_jax.model.dense.hf")
    for key, want in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2")):
        if hf.get(key, want) != want:
            raise ValueError(f"{key}={hf[key]!r} is not supported (only {want!r})")
    if hf.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported (transformers' Nemotron-H has no attention "
                         "biases either); set it to false")
    if hf.get("num_nextn_predict_layers"):
        raise ValueError("multi-token prediction layers are not supported; set num_nextn_predict_layers to 0")
    heads = hf.get("num_attention_heads", 32)
    limit = tuple(_number(v) for v in hf.get("time_step_limit", (0.0, math.inf)))
    mamba = mamba2.Mamba2Config(
        num_heads=hf.get("mamba_num_heads", 128), head_dim=hf.get("mamba_head_dim", 64),
        n_groups=hf.get("n_groups", 8), state_size=hf.get("ssm_state_size", 128),
        conv_kernel=hf.get("conv_kernel", 4), chunk_size=hf.get("chunk_size", 128),
        eps=hf.get("layer_norm_epsilon", 1e-5), dt_limit=limit)
    return HybridConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], block_types=_block_types(hf),
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf.get("attention_head_dim") or 128,
        intermediate_size=hf.get("intermediate_size", 21504), mamba=mamba,
        eps=hf.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        use_bias=bool(hf.get("use_bias", False)), use_conv_bias=bool(hf.get("use_conv_bias", True)),
        mlp_bias=bool(hf.get("mlp_bias", False)), max_position_embeddings=hf.get("max_position_embeddings", 4096),
        **numerics)


# ----------------------------------------------------------------------------------------------
# Loading a transformers checkpoint
# ----------------------------------------------------------------------------------------------

class _Shapes:
    """A reader that holds every tensor the config implies, as zero-size-in-memory arrays of their shape."""

    def __contains__(self, name: str) -> bool:
        return True


def _get(reader: SafetensorsReader | _Shapes, name: str, shape: tuple) -> np.ndarray:
    if isinstance(reader, _Shapes):
        return np.broadcast_to(np.zeros((), np.float32), shape)
    if name not in reader:
        raise CheckpointError(f"checkpoint is missing tensor {name!r} that config.json implies; the config.json "
                              "does not belong to these weights, or the download is incomplete")
    arr = reader.get(name)
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(arr.shape)}, the config implies {tuple(shape)}; "
                              "the config.json does not belong to these weights")
    return arr


def _mamba_params(reader: SafetensorsReader, cfg: HybridConfig, pre: str) -> Params:
    m, d = cfg.mamba, cfg.hidden_size
    width = m.inner + m.conv_dim + m.num_heads
    p = {"in_proj": _get(reader, pre + "in_proj.weight", (width, d)).T,
         "conv_w": _get(reader, pre + "conv1d.weight", (m.conv_dim, 1, m.conv_kernel))[:, 0].T,
         "norm": _get(reader, pre + "norm.weight", (m.inner,)),
         "out_proj": _get(reader, pre + "out_proj.weight", (d, m.inner)).T}
    p |= {k: _get(reader, pre + k, (m.num_heads,)) for k in ("dt_bias", "A_log", "D")}
    if cfg.use_conv_bias:
        p["conv_b"] = _get(reader, pre + "conv1d.bias", (m.conv_dim,))
    if cfg.use_bias:
        p["in_proj_b"] = _get(reader, pre + "in_proj.bias", (width,))
        p["out_proj_b"] = _get(reader, pre + "out_proj.bias", (d,))
    return p


def _attention_params(reader: SafetensorsReader, cfg: HybridConfig, pre: str) -> Params:
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q": _get(reader, pre + "q_proj.weight", (q, d)).T, "k": _get(reader, pre + "k_proj.weight", (kv, d)).T,
            "v": _get(reader, pre + "v_proj.weight", (kv, d)).T, "o": _get(reader, pre + "o_proj.weight", (d, q)).T}


def _mlp_params(reader: SafetensorsReader, cfg: HybridConfig, pre: str) -> Params:
    d, f = cfg.hidden_size, cfg.intermediate_size
    p = {"up": _get(reader, pre + "up_proj.weight", (f, d)).T, "down": _get(reader, pre + "down_proj.weight", (d, f)).T}
    if cfg.mlp_bias:
        p |= {"up_b": _get(reader, pre + "up_proj.bias", (f,)), "down_b": _get(reader, pre + "down_proj.bias", (d,))}
    return p


_LOADERS = {MAMBA: _mamba_params, ATTENTION: _attention_params, MLP: _mlp_params}


def _params(reader, cfg: HybridConfig, root: str) -> Params:
    d, v = cfg.hidden_size, cfg.vocab_size
    params = {"embed": _get(reader, root + "embeddings.weight", (v, d)),
              "blocks": [{"norm": _get(reader, f"{root}layers.{i}.norm.weight", (d,)),
                          "mixer": _LOADERS[kind](reader, cfg, f"{root}layers.{i}.mixer.")}
                         for i, kind in enumerate(cfg.block_types)],
              "final_norm": _get(reader, root + "norm_f.weight", (d,))}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = _get(reader, "lm_head.weight", (v, d)).T
    return params


def param_shapes(cfg: HybridConfig) -> Params:
    """The params pytree's shapes (tuples), as `from_hf` would load them."""
    return jax.tree.map(lambda a: tuple(a.shape), _params(_Shapes(), cfg, "model."))


def num_params(cfg: HybridConfig) -> int:
    return sum(math.prod(s) for s in jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))


# The public shape of NVIDIA-Nemotron-Nano-12B-v2-Base (the paper's hybrid model), as config.json fields:
# 62 blocks (28 Mamba-2, 28 MLP, 6 attention), width 5120, untied 131,072-token vocabulary.
PRESETS = {
    "nemotron-nano-12b-v2": dict(
        vocab_size=131072, hidden_size=5120, intermediate_size=20480, num_attention_heads=40,
        num_key_value_heads=8, head_dim=128, mamba_num_heads=128, mamba_head_dim=80, n_groups=8,
        ssm_state_size=128, conv_kernel=4, chunk_size=128, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
        hybrid_override_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"),
    # A CPU-sized hybrid with every block kind, for tests and demos (random init).
    "nemotron-h-tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4,
        chunk_size=16, layer_norm_epsilon=1e-5, tie_word_embeddings=True, hybrid_override_pattern="M-*M-"),
    # A small hybrid whose widths fill TPU tiles (hidden 256, head_dim 128, Mamba state 128, chunks of 128): the
    # planner's count checked against XLA:TPU's (tests/test_compile.py, benchmarks/planner_vs_xla.py) without the
    # tiny preset's 16-wide chunks padded 8x.
    "nemotron-h-tiny-aligned": dict(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
        head_dim=128, mamba_num_heads=4, mamba_head_dim=64, n_groups=1, ssm_state_size=128, conv_kernel=4,
        chunk_size=128, layer_norm_epsilon=1e-5, tie_word_embeddings=True, hybrid_override_pattern="M*-"),
}


def preset(name: str, **numerics) -> HybridConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown Nemotron-H preset {name!r}; known: {', '.join(PRESETS)}")
    return config_from_hf(PRESETS[name], **numerics)


_AXES = {"embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": ("norm",), "norm": ("norm",),
         # Mamba-2: fsdp splits the model width; the fused in_proj output (gate | x B C | dt) stays whole
         "in_proj": ("embed", None), "in_proj_b": (None,), "conv_w": (None, None), "conv_b": (None,),
         "dt_bias": (None,), "A_log": (None,), "D": (None,), "out_proj": (None, "embed"), "out_proj_b": ("embed",),
         # attention (heads flattened with their width) and the MLP
         "q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"), "o": ("heads", "embed"),
         "up": ("embed", "mlp"), "down": ("mlp", "embed"), "up_b": ("mlp",), "down_b": ("embed",)}


def param_logical_axes(cfg: HybridConfig) -> Params:
    """Logical axis names of every parameter (the structure of `param_shapes`), for `rlp_jax.sharding`'s rules."""
    def names(path, shape):
        key = path[-1].key
        return _AXES["norm" if key == "norm" else key]
    return jax.tree_util.tree_map_with_path(names, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def init_params(cfg: HybridConfig, rng, std: float = 0.02) -> Params:
    """Random parameters in cfg.param_dtype: normal(0, std) matrices and conv weights, unit norms, zero biases; the
    Mamba decays as transformers initialises them (A = 1 .. H, dt between 1e-3 and 0.1 through dt_bias, D = 1)."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(flat))
    h = cfg.mamba.num_heads

    def leaf(name, shape, key):
        if name.endswith("norm") or name == "D":
            return jnp.ones(shape, jnp.float32)
        if name == "A_log":
            return jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32))
        if name == "dt_bias":   # softplus^-1 of dt log-uniform in [1e-3, 0.1]
            dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            return dt + jnp.log(-jnp.expm1(-dt))
        if name.endswith("_b"):
            return jnp.zeros(shape, jnp.float32)
        return std * jax.random.normal(key, shape, jnp.float32)
    leaves = [leaf(path[-1].key, shape, key).astype(cfg.jnp_param_dtype) for (path, shape), key in zip(flat, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def from_hf(path, **numerics) -> tuple[HybridConfig, Params]:
    """(config, params) of a saved `NemotronHForCausalLM` folder (config.json + safetensors), the config with
    `Numerics` fields from `numerics`; params are host numpy arrays in the checkpoint's dtype, linear weights as
    [in, out]. The config is checked (ValueError, one line) before any tensor is read."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"no config.json in {path}; pass the folder save_pretrained wrote")
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), **numerics)
    reader = SafetensorsReader(path)
    root = "model." if "model.embeddings.weight" in reader else "backbone."
    return cfg, _params(reader, cfg, root)


# ----------------------------------------------------------------------------------------------
# The forward pass
# ----------------------------------------------------------------------------------------------

def _w(a, x):
    """A weight in x's dtype."""
    return jnp.asarray(a).astype(x.dtype)


def embed(params: Params, cfg: HybridConfig, tokens):
    """Token embeddings [..., D] in cfg.compute_dtype of token ids [...]."""
    return jnp.take(params["embed"], tokens, axis=0).astype(cfg.jnp_compute_dtype)


def logits_from_hidden(params: Params, cfg: HybridConfig, x):
    """Final RMSNorm and output projection: hidden [..., D] -> logits [..., V] float32."""
    x = rms_norm(x, params["final_norm"], cfg.eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...d,dv->...v", x, _w(head, x), preferred_element_type=jnp.float32)


def attention_qkv(p: Params, cfg: HybridConfig, h):
    """Projections of h [..., D] -> q [..., Q, W], k and v [..., E, W] in h's dtype (no position encoding)."""
    proj = lambda w, heads: jnp.einsum("...d,dk->...k", h, _w(w, h)).reshape(*h.shape[:-1], heads, cfg.head_dim)
    return proj(p["q"], cfg.num_heads), proj(p["k"], cfg.num_kv_heads), proj(p["v"], cfg.num_kv_heads)


def attention_out(p: Params, attn):
    """o_proj of the attention output [..., Q, W] -> [..., D], in its dtype."""
    return jnp.einsum("...k,kd->...d", attn.reshape(*attn.shape[:-2], -1), _w(p["o"], attn))


def attention_mixer(p: Params, cfg: HybridConfig, h_bld, seg_bl):
    """Causal GQA within segments (seg [B, L] int32, 0 = padding), without position encoding: h [B, L, D] ->
    (out [B, L, D], (k, v) [B, L, E, W]). Key block by key block where cfg.attention says so (`blockwise_for`),
    else one [B, L, L] score array."""
    q, k, v = attention_qkv(p, cfg, h_bld)
    l, q_per_kv = h_bld.shape[1], cfg.num_heads // cfg.num_kv_heads
    if cfg.blockwise_for(l):
        out = full_attention_blockwise(q, k, v, seg_bl, q_per_kv, block=cfg.attention_block)
    else:
        out = full_attention(q, k, v, causal_segment_mask(seg_bl), q_per_kv)
    return attention_out(p, out), (k, v)


def mlp_mixer(p: Params, h):
    """down(relu(up(h))^2): h [..., D] -> [..., D], in h's dtype."""
    u = jnp.einsum("...d,df->...f", h, _w(p["up"], h))
    u = u if "up_b" not in p else u + _w(p["up_b"], h)
    out = jnp.einsum("...f,fd->...d", jnp.square(jax.nn.relu(u)), _w(p["down"], h))
    return out if "down_b" not in p else out + _w(p["down_b"], h)


def run_blocks(params: Params, cfg: HybridConfig, tokens_bl, segment_ids_bl, positions_bm=None):
    """The blocks over tokens [B, L] with segment ids [B, L] int (0 = padding; a token sees the earlier tokens of
    its own segment: packed sequences, each from a zero state; 1/0 is a padding mask) -> (hidden [B, L, D] before
    the final norm, per-block caches or None).

    positions [B, M] int (0 <= t <= L): also return, for each block, what a continuation of each row after its
    tokens < t needs (`rlp_jax.model.nemotron_h.branch`): attention (k, v) [B, L, E, W] of every token, Mamba the
    `mamba2.Mamba2State` [B, M, ...] after the tokens < t of t's segment, MLP None. None: caches is None."""
    seg = jnp.asarray(segment_ids_bl).astype(jnp.int32)

    def block_fn(kind, block, x):
        h = rms_norm(x, block["norm"], cfg.eps)
        if kind == MAMBA:
            out, cache = mamba2.mamba2_forward(block["mixer"], cfg.mamba, h, seg, positions_bm=positions_bm)
        elif kind == ATTENTION:
            out, cache = attention_mixer(block["mixer"], cfg, h, seg)
        else:
            out, cache = mlp_mixer(block["mixer"], h), None
        return x + out, cache

    x, caches = constrain_residual(embed(params, cfg, tokens_bl)), []
    for kind, block in zip(cfg.block_types, params["blocks"]):
        x, cache = cfg.checkpointed(functools.partial(block_fn, kind), unrolled=True)(block, x)
        x = constrain_residual(x)
        caches.append(cache)
    return x, (None if positions_bm is None else tuple(caches))


def forward(params: Params, cfg: HybridConfig, tokens_bl, attention_mask_bl=None):
    """Teacher-forced logits [B, L, V] float32 of tokens [B, L]; attention_mask [B, L] (None = all real) as
    transformers takes it (1 = real token, 0 = padding: padded keys are never attended, padded inputs to the
    Mamba mixers are zeroed), or segment ids (0 = padding) of sequences packed into a row. Logits at padded
    positions are meaningless. jit with cfg static."""
    seg = jnp.ones(tokens_bl.shape, jnp.int32) if attention_mask_bl is None else attention_mask_bl
    x, _ = run_blocks(params, cfg, tokens_bl, seg)
    return logits_from_hidden(params, cfg, x)
