"""Portable plain-JAX streaming implementations (the "chunked" impl).

Logits path: a `fori_loop` over vocabulary chunks x[:, c:c+bv] folded with
`tiles.update_stats`; the backward writes dlogits chunk by chunk. Only
[N, bv] float32 temporaries exist (XLA on CPU does not fuse the whole-row
reductions, so a one-shot version would materialise [N, V] float32).

Hidden path: a `fori_loop` over vocabulary chunks of the unembedding,
w_DV[:, c:c+bv], so only [N, bv] logits exist at a time:

    forward:  x_c = h @ w_c                         (float32 accumulation)
              stats <- update_stats(stats, x_c)
    backward: x_c = h @ w_c (recompute);  g_c = grad_tile(x_c)
              dh += g_c @ w_c^T;   dw[:, c:c+bv] = h^T @ g_c

FLOPs: 2·N·D·V forward, 6·N·D·V backward. The last chunk is clamped to
end at V (dynamic_slice semantics); columns it shares with the previous
chunk are excluded from the statistics and from dh (but rewritten with
identical values in dw), so V need not be a multiple of the chunk size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpo_jax.kernels import tiles


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _slice(a, start, size):
    """a[:, start:start+size] behind an optimization barrier, so XLA cannot
    hoist a whole-array dtype convert out of the loop. On CPU, which has no
    native bf16 slicing (its float normalisation upcasts the whole array to
    float32 before the loop), narrow floats are sliced as same-width ints."""
    narrow = a.dtype.itemsize < 4 and jnp.issubdtype(a.dtype, jnp.floating)
    if not (narrow and jax.default_backend() == "cpu"):
        return jax.lax.optimization_barrier(jax.lax.dynamic_slice_in_dim(a, start, size, axis=1))
    bits = jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{8 * a.dtype.itemsize}"))
    chunk = jax.lax.optimization_barrier(jax.lax.dynamic_slice_in_dim(bits, start, size, axis=1))
    return jax.lax.bitcast_convert_type(chunk, a.dtype)


def _start_cols(j, v, bv):
    """Chunk j's start (clamped so the chunk ends by v) and its [1, bv] columns."""
    start = jnp.minimum(j * bv, v - bv)
    return start, start + jax.lax.broadcasted_iota(jnp.int32, (1, bv), 1)


def _grad_rows(tgt_N, m_N, log_s_N, g_N, ent_N, g_ent_N) -> dict:
    """Per-row backward inputs of `tiles.grad_tile`, as [N, 1] columns."""
    rows = dict(targets=tgt_N[:, None], m=m_N[:, None], log_s=log_s_N[:, None], g_logp=g_N[:, None])
    if g_ent_N is not None:
        rows.update(ent=ent_N[:, None], g_ent=g_ent_N[:, None])
    return rows


def _stats_loop(tile_at, n, v, bv, tgt_N, with_entropy) -> tiles.Stats:
    """Fold the chunks tile_at(start) -> [N, bv] float32 into Stats [N]."""

    def body(j, st):
        start, cols = _start_cols(j, v, bv)
        # Columns already seen in the previous chunk become padding (index v).
        cols = jnp.where(cols >= j * bv, cols, v)
        return tiles.update_stats(st, tile_at(start), cols, tgt_N[:, None], v, with_entropy)

    st = jax.lax.fori_loop(0, -(-v // bv), body, tiles.init_stats((n, 1)))
    return tiles.Stats(*(a[:, 0] for a in st))


def default_chunk(n: int, v: int, budget_elems: int = 1 << 22) -> int:
    """Vocab chunk: a power of two with n·chunk <= budget (16 MiB of float32), in [128, v]."""
    c = 128
    while c * 2 * n <= budget_elems and c * 2 <= v:
        c *= 2
    return min(c, v)


def logits_stats(x_NV, tgt_N, *, block_v, with_entropy) -> tiles.Stats:
    """Per-row statistics [N] of x_NV [N, V], one [N, bv] chunk at a time."""
    n, v = x_NV.shape
    bv = min(block_v, v)
    tile_at = lambda start: _slice(x_NV, start, bv).astype(jnp.float32)  # noqa: E731
    return _stats_loop(tile_at, n, v, bv, tgt_N, with_entropy)


def logits_grad(x_NV, tgt_N, m_N, log_s_N, g_N, ent_N, g_ent_N, *, block_v):
    """dlogits [N, V] in x_NV.dtype, written chunk by chunk."""
    v = x_NV.shape[1]
    bv = min(block_v, v)
    rows = _grad_rows(tgt_N, m_N, log_s_N, g_N, ent_N, g_ent_N)

    def body(j, dx):
        start, cols = _start_cols(j, v, bv)
        dx_c = tiles.grad_tile(_slice(x_NV, start, bv).astype(jnp.float32), cols, n_cols=v, **rows)
        return jax.lax.dynamic_update_slice_in_dim(dx, dx_c.astype(dx.dtype), start, axis=1)

    return jax.lax.fori_loop(0, -(-v // bv), body, jnp.zeros_like(x_NV))


def _matmul(a, b):
    """a @ b with float32 accumulation (and float32-exact for float32 inputs)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=_precision(a.dtype))


def hidden_stats(h_ND, w_DV, tgt_N, *, block_v, with_entropy) -> tiles.Stats:
    """Per-row statistics [N] of h_ND @ w_DV without forming [N, V]."""
    n, v = h_ND.shape[0], w_DV.shape[1]
    bv = min(block_v, v)
    tile_at = lambda start: _matmul(h_ND, _slice(w_DV, start, bv))  # noqa: E731
    return _stats_loop(tile_at, n, v, bv, tgt_N, with_entropy)


def hidden_grad(h_ND, w_DV, tgt_N, m_N, log_s_N, g_N, ent_N, g_ent_N, *, block_v):
    """(dh [N, D] float32, dw [D, V] in w's dtype), recomputing logits per chunk."""
    v = w_DV.shape[1]
    bv = min(block_v, v)
    rows = _grad_rows(tgt_N, m_N, log_s_N, g_N, ent_N, g_ent_N)

    def body(j, carry):
        dh, dw = carry
        start, cols = _start_cols(j, v, bv)
        w_c = _slice(w_DV, start, bv)
        g_c = tiles.grad_tile(_matmul(h_ND, w_c), cols, n_cols=v, **rows)
        # dh: columns shared with the previous (unclamped) chunk were counted there.
        g_dh = jnp.where(cols >= j * bv, g_c, 0.0).astype(h_ND.dtype)
        dh = dh + _matmul(g_dh, w_c.T)
        dw_c = _matmul(h_ND.T, g_c.astype(h_ND.dtype))
        return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), start, axis=1)

    # Each dw column is written, not accumulated, so it is kept in w's dtype.
    init = (jnp.zeros(h_ND.shape, jnp.float32), jnp.zeros(w_DV.shape, w_DV.dtype))
    return jax.lax.fori_loop(0, -(-v // bv), body, init)
