"""Accelerator attention kernels for full attention (causal within packed segments), behind
`model.attention="kernel"`. The pure-JAX paths (`layers.full_attention`, dense, and
`layers.full_attention_blockwise`) are the tested reference.

- TPU: Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), a causal mask and
  the segment ids: exactly our packing rule, flash-style in the forward and the backward. One MQA kernel
  per key/value head (its A query heads share the keys), vmapped over rows and key/value heads, under
  `shard_map` over the current mesh (rows on data x fsdp, key/value heads on tensor) because a Mosaic
  kernel is not partitioned by GSPMD. Sequences must be a multiple of 128 tokens.
- GPU: cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`. Packed
  segments reach cuDNN as a [B, 1, L, L] mask (jax.nn exposes no segment ids for cuDNN), which jax turns
  into a bias in the compute dtype, with a bias gradient of that size in the backward: about 4 L^2 bytes
  a row (bf16) but no [B, heads, L, L] scores; float16 / bfloat16 only.
- Elsewhere (CPU): `jax.nn.dot_product_attention(implementation="xla")` with the same mask: the same
  call, XLA's dense attention.

Not covered, where the pure-JAX blockwise path runs instead: branch attention (each branch reads its
document's prefix up to its own position t, a per-row limit that splash's static masks cannot express),
a shared prompt context (the kernels do not return a differentiable log-sum-exp to merge it with), and
single-token decoding. Padding queries (segment 0) attend to padding keys here, where the reference
masks them out: their outputs differ and are never read.

Shapes (docs/method.md): B rows, L tokens, Q query heads, E key/value heads, A = Q / E, W head width.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

SPLASH_BLOCKS = (512, 256, 128)   # splash's query/key block: the largest that divides L


def platform() -> str:
    """The platform the computation is being built for: the active mesh's devices' (an abstract mesh of
    compile-only TPU or GPU devices on a CPU host included), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.devices()[0].platform


def supported(length: int, compute_dtype, on: str | None = None) -> str | None:
    """Why the kernel cannot run full attention over `length` tokens here (None: it can)."""
    on = on or platform()
    if on == "tpu" and length % SPLASH_BLOCKS[-1]:
        return f"splash attention needs a multiple of {SPLASH_BLOCKS[-1]} tokens, not {length}"
    if on == "tpu" and jax.sharding.get_abstract_mesh().empty and jax.device_count() > 1:
        return ("splash attention runs under a mesh (jax.sharding.use_abstract_mesh, as the train step sets): "
                f"without one, XLA cannot partition it over {jax.device_count()} devices")
    if on == "gpu" and jnp.dtype(compute_dtype) not in (jnp.bfloat16, jnp.float16):
        return "cuDNN attention needs model.compute_dtype=bfloat16 or float16"
    return None


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    logging.getLogger(__name__).warning(message)


def _segment_mask(seg_bl):
    """[B, 1, L, L] bool: key <= query within the same segment (padding attends to padding)."""
    l = seg_bl.shape[1]
    causal = jnp.tril(jnp.ones((l, l), bool))
    return (causal[None] & (seg_bl[:, :, None] == seg_bl[:, None, :]))[:, None]


def full_attention(q_blqw, k_blew, v_blew, seg_bl, q_per_kv: int, *, on: str | None = None,
                   interpret: bool = False):
    """Causal attention within segments: q [B, L, Q, W], k/v [B, L, E, W], seg [B, L] int32 (0 = padding)
    -> [B, L, Q, W]. `on`: "tpu" (splash), "gpu" (cuDNN) or anything else (XLA); default: this backend.
    `interpret` runs the splash kernel in Pallas's interpreter (any backend; for tests)."""
    on = on or platform()
    seg = seg_bl.astype(jnp.int32)
    if on == "tpu":
        return _splash(q_blqw, k_blew, v_blew, seg, q_per_kv, interpret)
    impl = "cudnn" if on == "gpu" else "xla"
    return jax.nn.dot_product_attention(q_blqw, k_blew, v_blew, mask=_segment_mask(seg),
                                        implementation=impl).astype(q_blqw.dtype)


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    with jax.ensure_compile_time_eval():   # the mask's block tables are constants, never a trace's values
        return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q_blqw, k_blew, v_blew, seg_bl, q_per_kv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )

    b, l, h, w = q_blqw.shape
    kernel = _splash_kernel(l, q_per_kv, interpret)

    def local(q, k, v, seg):   # one device's rows and key/value heads
        bl, _, hl, _ = q.shape
        q = (q / math.sqrt(w)).reshape(bl, l, hl // q_per_kv, q_per_kv, w)
        one = lambda q_alw, k_lw, v_lw, s_l: kernel(q_alw, k_lw, v_lw, segment_ids=sk.SegmentIds(q=s_l, kv=s_l))
        per_head = jax.vmap(one, in_axes=(0, 0, 0, None))                      # over key/value heads
        out = jax.vmap(per_head)(q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg)
        return out.transpose(0, 3, 1, 2, 4).reshape(bl, l, hl, w)          # [B, E, A, L, W] -> [B, L, Q, W]

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or np.prod(list(mesh.shape.values())) == 1:
        return local(q_blqw, k_blew, v_blew, seg_bl)
    from rlp_jax import sharding

    rows = sharding.logical_to_spec(("batch",), (b,), mesh)[0]
    heads = sharding.logical_to_spec(("kv_heads",), (k_blew.shape[2],), mesh)[0]
    qkv, s = P(rows, None, heads, None), P(rows, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, s), out_specs=qkv, check_vma=False)(
        q_blqw, k_blew, v_blew, seg_bl)
