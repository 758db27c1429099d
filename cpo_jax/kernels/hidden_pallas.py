"""Pallas kernels for the fused hidden-state path (Mosaic TPU, interpret mode).

Never forms logits [N, V]: each grid step multiplies an h block [bn, D] by
a w block [D, bv] into a float32 [bn, bv] tile and feeds `tiles`:

    stats:  grid (N/bn, V/bv), vocab "arbitrary": x = h_i @ w_j, update_stats
    dh:     grid (N/bn, V/bv), vocab "arbitrary": dh_i += grad_tile(x) @ w_j^T
    dw:     grid (V/bv, N/bn), token "arbitrary": dw_j += h_i^T @ grad_tile(x)

FLOPs 2·N·D·V forward and 10·N·D·V backward (the two backward kernels each
recompute x). Ragged edges: out-of-bounds block contents are unspecified,
so padding columns of w and padding rows of h are zeroed before they enter
a contraction. The default GPU lowering (Mosaic GPU) has no matmul
lowering for this form; GPUs use `chunked.hidden_*` instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cpo_jax.kernels import tiles
from cpo_jax.kernels.logits_pallas import _grid_params

_NT = (((1,), (1,)), ((), ()))  # a[m, k] · b[n, k] -> [m, n]
_TN = (((0,), (0,)), ((), ()))  # a[k, m] · b[k, n] -> [m, n]


def _tile(h_ref, w_ref, col0, n_cols):
    """(x [bn, bv] f32, cols [1, bv], w with padding columns zeroed)."""
    w = w_ref[...]
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, w.shape[1]), 1)
    w = jnp.where(cols < n_cols, w, jnp.zeros_like(w))
    x = jnp.dot(h_ref[...], w, preferred_element_type=jnp.float32)
    return x, cols, w


def _stats_kernel(h_ref, w_ref, tgt_ref, m_ref, s_ref, t_ref, u_ref, *, bv, n_cols, with_entropy):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...], s_ref[...], t_ref[...], u_ref[...] = tiles.init_stats(m_ref.shape)

    x, cols, _ = _tile(h_ref, w_ref, j * bv, n_cols)
    st = tiles.Stats(m_ref[...], s_ref[...], t_ref[...], u_ref[...])
    st = tiles.update_stats(st, x, cols, tgt_ref[...], n_cols, with_entropy)
    m_ref[...], s_ref[...], t_ref[...], u_ref[...] = st


def _sizes(h_ND, w_DV, block_n, block_v):
    n, v = h_ND.shape[0], w_DV.shape[1]
    return n, v, min(block_n, n), min(block_v, v)


def hidden_stats(h_ND, w_DV, tgt_N, *, block_n, block_v, with_entropy, interpret, backend) -> tiles.Stats:
    """Per-row statistics [N] of h_ND @ w_DV."""
    n, v, bn, bv = _sizes(h_ND, w_DV, block_n, block_v)
    d = h_ND.shape[1]
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    out = pl.pallas_call(
        functools.partial(_stats_kernel, bv=bv, n_cols=v, with_entropy=with_entropy),
        grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
        in_specs=[
            pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
            pl.BlockSpec((d, bv), lambda i, j: (0, j)),
            row,
        ],
        out_specs=[row] * 4,
        out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 4,
        interpret=interpret,
        compiler_params=_grid_params(backend, ("parallel", "arbitrary")),
    )(h_ND, w_DV, tgt_N.astype(jnp.int32)[:, None])
    return tiles.Stats(*(a[:, 0] for a in out))


def _row_grads(x, cols, n_cols, tgt_ref, m_ref, ls_ref, g_ref, ent_refs):
    ent, g_ent = (ent_refs[0][...], ent_refs[1][...]) if ent_refs else (None, None)
    return tiles.grad_tile(x, cols, tgt_ref[...], n_cols, m_ref[...], ls_ref[...], g_ref[...], ent, g_ent)


def _dh_kernel(h_ref, w_ref, tgt_ref, m_ref, ls_ref, g_ref, *rest, bv, n_cols):
    *ent_refs, dh_ref = rest
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        dh_ref[...] = jnp.zeros(dh_ref.shape, dh_ref.dtype)

    x, cols, w = _tile(h_ref, w_ref, j * bv, n_cols)
    g = _row_grads(x, cols, n_cols, tgt_ref, m_ref, ls_ref, g_ref, ent_refs).astype(w.dtype)
    dh_ref[...] += jax.lax.dot_general(g, w, _NT, preferred_element_type=jnp.float32)


def _dw_kernel(h_ref, w_ref, tgt_ref, m_ref, ls_ref, g_ref, *rest, bn, bv, n_rows, n_cols):
    *ent_refs, dw_ref = rest
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        dw_ref[...] = jnp.zeros(dw_ref.shape, dw_ref.dtype)

    x, cols, _ = _tile(h_ref, w_ref, j * bv, n_cols)
    g = _row_grads(x, cols, n_cols, tgt_ref, m_ref, ls_ref, g_ref, ent_refs)
    h = h_ref[...]
    rows_ok = (i * bn + jax.lax.broadcasted_iota(jnp.int32, (h.shape[0], 1), 0)) < n_rows
    h = jnp.where(rows_ok, h, jnp.zeros_like(h))
    g = jnp.where(rows_ok, g, 0.0).astype(h.dtype)
    dw_ref[...] += jax.lax.dot_general(h, g, _TN, preferred_element_type=jnp.float32)


def hidden_grad(h_ND, w_DV, tgt_N, m_N, log_s_N, g_N, ent_N, g_ent_N, *, block_n, block_v, interpret, backend):
    """(dh [N, D] float32, dw [D, V] in w's dtype); ent_N/g_ent_N may be None."""
    n, v, bn, bv = _sizes(h_ND, w_DV, block_n, block_v)
    d = h_ND.shape[1]
    rows = [tgt_N.astype(jnp.int32), m_N, log_s_N, g_N]
    if g_ent_N is not None:
        rows += [ent_N, g_ent_N]
    rows = [r[:, None] for r in rows]
    nn, nv = pl.cdiv(n, bn), pl.cdiv(v, bv)

    dh = pl.pallas_call(
        functools.partial(_dh_kernel, bv=bv, n_cols=v),
        grid=(nn, nv),
        in_specs=[
            pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
            pl.BlockSpec((d, bv), lambda i, j: (0, j)),
        ]
        + [pl.BlockSpec((bn, 1), lambda i, j: (i, 0))] * len(rows),
        out_specs=pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n, d), jnp.float32),
        interpret=interpret,
        compiler_params=_grid_params(backend, ("parallel", "arbitrary")),
    )(h_ND, w_DV, *rows)

    dw = pl.pallas_call(
        functools.partial(_dw_kernel, bn=bn, bv=bv, n_rows=n, n_cols=v),
        grid=(nv, nn),
        in_specs=[
            pl.BlockSpec((bn, d), lambda j, i: (i, 0)),
            pl.BlockSpec((d, bv), lambda j, i: (0, j)),
        ]
        + [pl.BlockSpec((bn, 1), lambda j, i: (i, 0))] * len(rows),
        out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
        out_shape=jax.ShapeDtypeStruct((d, v), jnp.float32),
        interpret=interpret,
        compiler_params=_grid_params(backend, ("parallel", "arbitrary")),
    )(h_ND, w_DV, *rows)
    return dh, dw.astype(w_DV.dtype)
