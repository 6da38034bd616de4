"""Token log-probs of sequences under the model, in float32: log p(x_j | x_<j) for every position.

Shapes: B rows, L tokens, D width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlp_jax.model import family


def shifted_token_logprobs(logits_blv, tokens_bl):
    """log p(x_j | x_<j) for every j of each row, [B, L] float32 (column 0, which has no context, is 0)."""
    logp = jax.nn.log_softmax(logits_blv[:, :-1].astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, tokens_bl[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(lp, ((0, 0), (1, 0)))


TOKEN_CHUNK = 256   # positions projected to the vocabulary at a time by `shifted_token_logprobs_chunked`


def shifted_token_logprobs_chunked(params, cfg, hidden_bld, tokens_bl, *, chunk: int = TOKEN_CHUNK):
    """`shifted_token_logprobs` from final hidden states [B, L, D], projecting `chunk` positions at a time
    (under `jax.checkpoint`), so the vocab-wide activations alive at once are [B, chunk, V]. [B, L] float32."""
    b, length, d = hidden_bld.shape
    c = max(1, min(chunk, length))
    pad = -length % c
    nc = (length + pad) // c
    x_c = jnp.pad(hidden_bld, ((0, 0), (0, pad), (0, 0))).reshape(b, nc, c, d).transpose(1, 0, 2, 3)
    nxt = jnp.pad(tokens_bl[:, 1:], ((0, 0), (0, pad + 1)))                       # x_{j+1} at column j
    nxt_c = nxt.reshape(b, nc, c).transpose(1, 0, 2)

    @jax.checkpoint
    def one(xc, tc):
        logp = jax.nn.log_softmax(family.logits_from_hidden(params, cfg, xc), axis=-1)   # [B, c, V]
        return jnp.take_along_axis(logp, tc[..., None], axis=-1)[..., 0]

    lp = jax.lax.map(lambda a: one(*a), (x_c, nxt_c)).transpose(1, 0, 2).reshape(b, nc * c)[:, : length - 1]
    return jnp.pad(lp, ((0, 0), (1, 0)))
