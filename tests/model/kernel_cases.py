"""Shared cases of the kernel tests (tests/model/test_kernels.py and its worker): attention inputs with packed
documents and padding, and the dense reference."""

import jax.numpy as jnp
import numpy as np

from rlp_jax.model import layers

B, L, E, A, W = 2, 128, 2, 2, 8   # splash's smallest block is 128 tokens


def attention_case(seed=0):
    r = np.random.default_rng(seed)
    seg = np.ones((B, L), np.int32)
    seg[0, 50:] = 2           # row 0: two packed documents
    seg[0, 90:] = 3
    seg[1, 100:] = 0          # row 1: padding after 100
    n = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
    return n(B, L, E * A, W), n(B, L, E, W), n(B, L, E, W), jnp.asarray(seg), n(B, L, E * A, W)


def dense_attention(q, k, v, seg):
    mask = jnp.tril(jnp.ones((L, L), bool))[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    return layers.full_attention(q, k, v, mask, A)
