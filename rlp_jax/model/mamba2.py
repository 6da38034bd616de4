"""The Mamba-2 mixer (Nemotron-H's "linear_attention" blocks) as pure functions over arrays.

Matches transformers' `NemotronHMamba2Mixer` on its PyTorch path (no CUDA kernels): in_proj -> causal
depthwise conv + SiLU over (x, B, C) -> selective state-space scan -> gated grouped RMSNorm -> out_proj.

Shapes: B rows, L tokens, D model width, M requested positions per row; for the mixer H heads, P head width,
I = H P inner width, G groups (each group's B and C serve R = H / G consecutive heads), N state size,
K conv kernel width, X = I + 2 G N conv channels (x, B, C), T chunk length, Z = ceil(L / T) chunks.

Supported:
  `mamba2_forward`  the teacher-forced pass over whole sequences with the chunked state-space-duality (SSD)
                    scan; optionally from a given state, and returning the state after tokens < t for requested
                    positions t (from the chunk-start states plus the recurrence inside t's chunk: no per-token
                    states are stored).
  `mamba2_step`     the recurrent one-token update for decoding (conv state + SSM state).
  Segment ids [B, L] (0 = padding): several sequences packed into a row, each read from a zero state. Where
  the id changes the conv reads no earlier input and the SSM state is reset (the token's decay is exp(-inf) =
  0, summed without differences of cumulative sums, so no inf - inf); padded positions' mixer input and conv
  output are zeroed. A transformers attention mask (1 = real) is the one-segment case: right and left padding
  leave real tokens exact, as in transformers.
Dtypes: the in/out projections run in the input's dtype (the model's compute dtype, e.g. bfloat16); the conv,
the scan, the states and the gated norm in float32 whatever the parameters' dtype. Not supported: CUDA kernels'
fused path, activations other than SiLU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Params = dict   # in_proj [D, I+X+H], conv_w [K, X], conv_b [X]?, dt_bias/A_log/D [H], norm [I], out_proj [I, D],
                # in_proj_b [I+X+H]? and out_proj_b [D]? (optional biases: present or absent)
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config:
    """Geometry and numerics of one Mamba-2 mixer (names as Nemotron-H's config.json where they exist)."""

    num_heads: int                      # H (mamba_num_heads)
    head_dim: int                       # P (mamba_head_dim)
    n_groups: int                       # G
    state_size: int                     # N (ssm_state_size)
    conv_kernel: int = 4                # K
    chunk_size: int = 128               # T, the SSD chunk
    eps: float = 1e-5                   # of the gated RMSNorm
    dt_limit: tuple[float, float] = (0.0, math.inf)   # clamp of dt after softplus (time_step_limit)

    def __post_init__(self):
        if self.num_heads % self.n_groups:
            raise ValueError(f"mamba_num_heads {self.num_heads} is not a multiple of n_groups {self.n_groups}; "
                             "fix the config")
        if self.conv_kernel < 2 or self.chunk_size < 1:
            raise ValueError(f"conv_kernel {self.conv_kernel} must be >= 2 and chunk_size {self.chunk_size} >= 1")

    @property
    def inner(self) -> int:             # I
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:          # X
        return self.inner + 2 * self.n_groups * self.state_size


class Mamba2State(NamedTuple):
    """A mixer's recurrent state after some tokens: what decoding continues from."""

    conv: jax.Array   # [..., K-1, X] the last K-1 conv inputs (zeros before the first token)
    ssm: jax.Array    # [..., H, P, N] float32


def init_state(cfg: Mamba2Config, batch: int) -> Mamba2State:
    """The state before any token: zeros [B, K-1, X] and [B, H, P, N]."""
    return Mamba2State(jnp.zeros((batch, cfg.conv_kernel - 1, cfg.conv_dim), jnp.float32),
                       jnp.zeros((batch, cfg.num_heads, cfg.head_dim, cfg.state_size), jnp.float32))


def _f32(a):
    return jnp.asarray(a, jnp.float32)


def _linear(x, w, b=None):
    """x [..., I] @ w [I, O] (+ b) in x's dtype."""
    y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype))
    return y if b is None else y + b.astype(x.dtype)


def _project(params: Params, cfg: Mamba2Config, x):
    """in_proj of x [..., D] (in x's dtype) -> gate [..., I], conv input xbc [..., X], raw dt [..., H], float32."""
    proj = _f32(_linear(x, params["in_proj"], params.get("in_proj_b")))
    i, c = cfg.inner, cfg.conv_dim
    return proj[..., :i], proj[..., i:i + c], proj[..., i + c:]


def _extended_segments(seg_bl, k: int):
    """Segment ids of the conv's extended input [B, K-1+L]: the K-1 earlier inputs count as the first token's."""
    return jnp.concatenate([jnp.repeat(seg_bl[:, :1], k - 1, axis=1), seg_bl], axis=1)


def _readable(seg_in, seg_out):
    """Whether the conv at a token of segment seg_out reads an input of segment seg_in: its own, and padding (0),
    whose input is zeroed but whose in_proj bias transformers' conv still reads (left padding). Padding only ever
    follows a packed row's last document, so no document reads another's."""
    return (seg_in == seg_out) | (seg_in == 0)


def causal_conv(xbc_blx, conv_w_kx, conv_b_x, prev_bkx, seg_bl=None):
    """SiLU of the depthwise causal conv of xbc [B, L, X] preceded by the K-1 earlier inputs prev [B, K-1, X]
    -> [B, L, X]: out[t] = sum_k w[k] in[t - (K-1) + k] (+ bias), with segment ids [B, L] (None: one segment)
    only over inputs of t's own segment and padding (`_readable`)."""
    k, l = conv_w_kx.shape[0], xbc_blx.shape[1]
    ext = jnp.concatenate([_f32(prev_bkx), xbc_blx], axis=1)           # [B, L+K-1, X]
    w = _f32(conv_w_kx)
    if seg_bl is not None:
        seg_ext = _extended_segments(seg_bl, k)
        ext_of = lambda j: jnp.where(_readable(seg_ext[:, j:j + l], seg_bl)[..., None], ext[:, j:j + l], 0.0)
    else:
        ext_of = lambda j: ext[:, j:j + l]
    out = sum(ext_of(j) * w[j] for j in range(k))
    return jax.nn.silu(out if conv_b_x is None else out + _f32(conv_b_x))


def _ssm_inputs(params: Params, cfg: Mamba2Config, xbc, dt_raw):
    """Conv output [..., X] -> x [..., H, P], B and C [..., G, N]; dt [..., H] = clamp(softplus(dt + dt_bias))."""
    i, gn, lead = cfg.inner, cfg.n_groups * cfg.state_size, xbc.shape[:-1]
    x = xbc[..., :i].reshape(*lead, cfg.num_heads, cfg.head_dim)
    b = xbc[..., i:i + gn].reshape(*lead, cfg.n_groups, cfg.state_size)
    c = xbc[..., i + gn:].reshape(*lead, cfg.n_groups, cfg.state_size)
    dt = jnp.clip(jax.nn.softplus(dt_raw + _f32(params["dt_bias"])), *cfg.dt_limit)
    return x, b, c, dt


def gated_rms_norm(y, gate, weight, groups: int, eps: float):
    """RMSNorm of y * silu(gate) [..., I] within each of `groups` equal slices of the last axis, times weight."""
    h = y * jax.nn.silu(gate)
    hg = h.reshape(*h.shape[:-1], groups, h.shape[-1] // groups)
    hg = hg * jax.lax.rsqrt(jnp.mean(hg * hg, axis=-1, keepdims=True) + eps)
    return _f32(weight) * hg.reshape(h.shape)


def _output(params: Params, cfg: Mamba2Config, y_hp, x_hp, gate, dtype):
    """Scan output y [..., H, P] + D skip of x, gated norm with the gate [..., I], out_proj in dtype -> [..., D]."""
    y = y_hp + _f32(params["D"])[:, None] * x_hp
    y = gated_rms_norm(y.reshape(*y.shape[:-2], cfg.inner), gate, params["norm"], cfg.n_groups, cfg.eps)
    return _linear(y.astype(dtype), params["out_proj"], params.get("out_proj_b"))


# ----------------------------------------------------------------------------------------------
# The chunked scan (state space duality)
# ----------------------------------------------------------------------------------------------

def _chunked(arr, t: int):
    """[B, L, ...] -> [B, Z, T, ...], the tail chunk padded with zeros (no input, no decay)."""
    b, l = arr.shape[:2]
    z = -(-l // t)
    arr = jnp.pad(arr, [(0, 0), (0, z * t - l)] + [(0, 0)] * (arr.ndim - 2))
    return arr.reshape(b, z, t, *arr.shape[2:])


def _segsum(a):
    """[..., T] -> [..., T, T]: entry (l, s) = a[s+1] + ... + a[l] for s <= l (a masked cumsum, no
    differences of large sums), -inf above the diagonal."""
    t = a.shape[-1]
    below = jnp.tril(jnp.ones((t, t), bool), -1)                         # l > s
    sums = jnp.cumsum(jnp.where(below, a[..., :, None], 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), sums, -jnp.inf)


class _Chunks(NamedTuple):
    """The scan's per-chunk pieces, kept for reading states at positions."""

    a: jax.Array        # [B, Z, G, R, T] dt A (log decay of each token)
    xdt: jax.Array      # [B, Z, T, G, R, P] dt x
    b: jax.Array        # [B, Z, T, G, N]
    starts: jax.Array   # [B, Z, G, R, P, N] the state entering each chunk


def ssd_scan(cfg: Mamba2Config, x_blhp, dt_blh, a_h, b_blgn, c_blgn, ssm0_bhpn, resets_bl=None):
    """y_t = C_t . S_t with S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, chunk by chunk: within a chunk as
    masked attention-like products, across chunks by a scan over the Z chunk-start states.

    x [B, L, H, P], dt [B, L, H], A [H] (negative), B/C [B, L, G, N], the starting state [B, H, P, N], resets
    [B, L] bool (True: S_{t-1} is dropped, the first token of a packed sequence; None: none) -> y [B, L, H, P]
    (without the D skip), the final state [B, H, P, N] and the chunk pieces (`_Chunks`)."""
    bsz, l, h, p = x_blhp.shape
    g, t = cfg.n_groups, cfg.chunk_size
    r = h // g
    log_decay = dt_blh * a_h                                                          # [B, L, H]
    if resets_bl is not None:
        log_decay = jnp.where(resets_bl[..., None], -jnp.inf, log_decay)
    xdt = _chunked((x_blhp * dt_blh[..., None]).reshape(bsz, l, g, r, p), t)        # [B, Z, T, G, R, P]
    a = _chunked(log_decay.reshape(bsz, l, g, r), t).transpose(0, 1, 3, 4, 2)        # [B, Z, G, R, T]
    bc, cc = _chunked(b_blgn, t), _chunked(c_blgn, t)                                # [B, Z, T, G, N]
    cum = jnp.cumsum(a, axis=-1)      # sums from the chunk start only (-inf after a reset): never differenced
    # 1. within each chunk: y[l] = sum_{s <= l} (C_l . B_s) exp(a[s+1] + ... + a[l]) dt_s x_s
    scores = jnp.einsum("bzlgn,bzsgn->bzgls", cc, bc, precision=_HI)
    decay = jnp.exp(_segsum(a))                                                       # [B, Z, G, R, T, T]
    mix = scores[:, :, :, None] * decay
    y_diag = jnp.einsum("bzgrls,bzsgrp->bzlgrp", mix, xdt, precision=_HI)
    # 2. each chunk's own contribution to the state at its end: exp(a[s+1] + ... + a[T-1])
    to_end = decay[..., -1, :]                                                        # [B, Z, G, R, T]
    own = jnp.einsum("bzsgn,bzgrs,bzsgrp->bzgrpn", bc, to_end, xdt, precision=_HI)
    # 3. the chunk-start states, chunk after chunk
    def carry(state, inputs):
        total, add = inputs
        return state * total[..., None, None] + add, state
    s0 = _f32(ssm0_bhpn).reshape(bsz, g, r, p, cfg.state_size)
    final, starts = jax.lax.scan(carry, s0, (jnp.exp(cum[..., -1]).swapaxes(0, 1), own.swapaxes(0, 1)))
    starts = starts.swapaxes(0, 1)                                                    # [B, Z, G, R, P, N]
    # 4. the start state's part of each output: C_l . S_start exp(a[0] + ... + a[l])
    y_off = jnp.einsum("bzlgn,bzgrpn,bzgrl->bzlgrp", cc, starts, jnp.exp(cum), precision=_HI)
    y = (y_diag + y_off).reshape(bsz, -1, h, p)[:, :l]
    return y, final.reshape(bsz, h, p, cfg.state_size), _Chunks(a, xdt, bc, starts)


def _take_rows(arr, idx_bm):
    """arr [B, Z, ...], idx [B, M] -> [B, M, ...]."""
    return jax.vmap(lambda row, i: row[i])(arr, idx_bm)


def _ssm_states_at(cfg: Mamba2Config, chunks: _Chunks, t_bm):
    """The SSM state after tokens < t for each t [B, M] (0 <= t <= L) -> [B, M, H, P, N]: the start state of the
    chunk holding token t-1, carried over that chunk's first j = t - z T tokens."""
    t = cfg.chunk_size
    z = jnp.maximum(t_bm - 1, 0) // t
    j = t_bm - z * t                                                        # tokens of chunk z seen, 0..T
    a, xdt, b, start = (_take_rows(arr, z) for arr in chunks)               # [B, M, ...]
    seen = (jnp.arange(t) < j[..., None])[:, :, None, None]                 # [B, M, 1, 1, T]
    log_start = jnp.sum(jnp.where(seen, a, 0.0), axis=-1)                  # a[0] + ... + a[j-1]: [B, M, G, R]
    # exp(a[s+1] + ... + a[j-1]) for s < j: row j-1 of the chunk's segment sums (no differences: resets' -inf)
    last = jnp.maximum(j - 1, 0)[:, :, None, None, None, None]              # [B, M, 1, 1, 1, 1]
    row = jnp.take_along_axis(_segsum(a), last, axis=-2)[..., 0, :]          # [B, M, G, R, T]
    weights = jnp.exp(jnp.where(seen, row, -jnp.inf))
    state = (jnp.exp(log_start)[..., None, None] * start
             + jnp.einsum("bmgrs,bmsgrp,bmsgn->bmgrpn", weights, xdt, b, precision=_HI))
    return state.reshape(*t_bm.shape, cfg.num_heads, cfg.head_dim, cfg.state_size)


# ----------------------------------------------------------------------------------------------
# The mixer: whole sequences and one token
# ----------------------------------------------------------------------------------------------

def branch_segments(seg_bl, t_bm):
    """The segment a continuation at t [B, M] (0 <= t <= L) joins, [B, M]: t's own (a branch replaces token t),
    or the last token's before it where t is padding or L (continuing the sequence: generation)."""
    l = seg_bl.shape[1]
    take = lambda i: jnp.take_along_axis(seg_bl, jnp.clip(i, 0, l - 1), axis=1)
    at = take(t_bm)
    return jnp.where((t_bm < l) & (at != 0), at, take(t_bm - 1))


def mamba2_forward(params: Params, cfg: Mamba2Config, x_bld, mask_bl=None, *, state: Mamba2State | None = None,
                   positions_bm=None):
    """The mixer over whole sequences x [B, L, D] -> (y [B, L, D] in x's dtype, states or None).

    mask [B, L] int (None = one sequence, all real): segment ids, 0 = padding (a transformers attention mask is
    the one-segment case); each segment is read from a zero state, padded positions' input and conv output are
    zeroed. state: a `Mamba2State` [B, ...] the sequences continue from (None = from scratch; with a mask, it
    belongs to the first token's segment). positions [B, M] int (0 <= t <= L): also return the `Mamba2State`
    [B, M, ...] after the tokens < t of t's segment (`branch_segments`), the state a continuation branched at t
    starts from (t = L: the final state); else None."""
    bsz, l, _ = x_bld.shape
    seg = None if mask_bl is None else jnp.asarray(mask_bl).astype(jnp.int32)
    real = None if seg is None else (seg != 0)[..., None]
    if real is not None:
        x_bld = jnp.where(real, x_bld, 0)
    state = init_state(cfg, bsz) if state is None else state
    gate, xbc, dt_raw = _project(params, cfg, x_bld)
    conv = causal_conv(xbc, params["conv_w"], params.get("conv_b"), state.conv, seg)
    if real is not None:
        conv = jnp.where(real, conv, 0.0)
    x, b, c, dt = _ssm_inputs(params, cfg, conv, dt_raw)
    a_h = -jnp.exp(_f32(params["A_log"]))
    resets = None if seg is None else jnp.pad(seg[:, 1:] != seg[:, :-1], ((0, 0), (1, 0)))
    y, _, chunks = ssd_scan(cfg, x, dt, a_h, b, c, state.ssm, resets)
    out = _output(params, cfg, y, x, gate, x_bld.dtype)
    if positions_bm is None:
        return out, None
    positions_bm = jnp.asarray(positions_bm, jnp.int32)
    ext = jnp.concatenate([_f32(state.conv), xbc], axis=1)                     # [B, K-1+L, X]
    window = positions_bm[..., None] + jnp.arange(cfg.conv_kernel - 1)        # ext rows t .. t+K-2
    gather = jax.vmap(lambda row, idx: row[idx])
    conv_at = gather(ext, window)                                             # [B, M, K-1, X]
    ssm_at = _ssm_states_at(cfg, chunks, positions_bm)                        # [B, M, H, P, N]
    if seg is not None:   # only t's own segment: inputs of another, and a state a reset has not cleared
        seg_t = branch_segments(seg, positions_bm)                            # [B, M]
        own = _readable(gather(_extended_segments(seg, cfg.conv_kernel), window), seg_t[..., None])
        conv_at = jnp.where(own[..., None], conv_at, 0.0)
        last = jnp.take_along_axis(seg, jnp.clip(positions_bm - 1, 0, l - 1), axis=1)
        ssm_at = jnp.where(((positions_bm > 0) & (last == seg_t))[..., None, None, None], ssm_at, 0.0)
    return out, Mamba2State(conv_at, ssm_at)


def mamba2_step(params: Params, cfg: Mamba2Config, x_bd, state: Mamba2State):
    """One decoding token per row: x [B, D], state [B, ...] -> (y [B, D] in x's dtype, the state after it)."""
    gate, xbc, dt_raw = _project(params, cfg, x_bd)
    conv = causal_conv(xbc[:, None], params["conv_w"], params.get("conv_b"), state.conv)[:, 0]
    x, b, c, dt = _ssm_inputs(params, cfg, conv, dt_raw)                      # x [B, H, P], b/c [B, G, N]
    r = cfg.num_heads // cfg.n_groups
    b_h, c_h = jnp.repeat(b, r, axis=1), jnp.repeat(c, r, axis=1)             # [B, H, N]
    decay = jnp.exp(dt * -jnp.exp(_f32(params["A_log"])))                     # [B, H]
    ssm = (_f32(state.ssm) * decay[..., None, None]
           + (dt[..., None] * x)[..., None] * b_h[:, :, None, :])              # [B, H, P, N]
    y = jnp.einsum("bhpn,bhn->bhp", ssm, c_h, precision=_HI)
    new_conv = jnp.concatenate([_f32(state.conv), xbc[:, None]], axis=1)[:, 1:]
    return _output(params, cfg, y, x, gate, x_bd.dtype), Mamba2State(new_conv, ssm)
