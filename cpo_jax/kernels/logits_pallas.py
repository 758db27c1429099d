"""Pallas drivers for the logits path: statistics (forward) and dlogits (backward).

Both drivers trace the same tile math (`tiles.update_stats`, `tiles.grad_tile`);
they differ only in how a [bn, bv] tile reaches it:

* "grid" (Mosaic TPU and interpret mode): grid (N/bn, V/bv) with the vocab
  axis innermost and "arbitrary"; the four [bn, 1] statistic outputs keep
  the same block index along it, so they stay resident and accumulate.
  Out-of-bounds tile contents are unspecified and masked by column index.
* "triton" (GPU): grid (N/bn,), a `fori_loop` over vocab tiles with masked
  loads (`other=-inf`), since Triton programs cannot revisit outputs.
  Backward is grid (N/bn, V/bv) with masked loads and stores.

Inputs are read in their own dtype (bf16 stays bf16 in HBM); tiles are
upcast to float32 in registers. Only per-row float32 statistics leave the
forward kernel; the backward recomputes p from the saved max and log-sum.

Shapes: x_NV [N, V]; per-row arrays are [N, 1] for "grid" and [N] for
"triton".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cpo_jax.kernels import tiles


# Scoped VMEM for the TPU kernels: the hidden path at D=4096 with default
# tiles double-buffers ~20 MiB (h, w and a float32 dh/dw accumulator block),
# above the 16/32 MiB scoped defaults; 48 MiB fits every TPU generation.
TPU_VMEM_LIMIT = 48 * 2**20


def _tpu_params(semantics):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=TPU_VMEM_LIMIT)


def _triton_params(num_warps: int):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


def _grid_params(backend: str, semantics):
    return _tpu_params(semantics) if backend == "tpu" else None


# ----------------------------------------------------------------------------- grid


def _grid_stats_kernel(x_ref, tgt_ref, m_ref, s_ref, t_ref, u_ref, *, block_v, n_cols, with_entropy):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        st0 = tiles.init_stats(m_ref.shape)
        m_ref[...], s_ref[...], t_ref[...], u_ref[...] = st0

    x = x_ref[...].astype(jnp.float32)
    cols = j * block_v + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    st = tiles.Stats(m_ref[...], s_ref[...], t_ref[...], u_ref[...])
    st = tiles.update_stats(st, x, cols, tgt_ref[...], n_cols, with_entropy)
    m_ref[...], s_ref[...], t_ref[...], u_ref[...] = st


def grid_stats(x_NV, tgt_N, *, block_n, block_v, with_entropy, interpret, backend) -> tiles.Stats:
    """Per-row statistics [N] of x_NV [N, V] via a (N/bn, V/bv) grid."""
    n, v = x_NV.shape
    bn, bv = min(block_n, n), min(block_v, v)
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    out = pl.pallas_call(
        functools.partial(_grid_stats_kernel, block_v=bv, n_cols=v, with_entropy=with_entropy),
        grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
        in_specs=[pl.BlockSpec((bn, bv), lambda i, j: (i, j)), row],
        out_specs=[row] * 4,
        out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 4,
        interpret=interpret,
        compiler_params=_grid_params(backend, ("parallel", "arbitrary")),
    )(x_NV, tgt_N.astype(jnp.int32)[:, None])
    return tiles.Stats(*(a[:, 0] for a in out))


def _grid_grad_kernel(x_ref, tgt_ref, m_ref, ls_ref, g_ref, *rest, block_v, n_cols):
    *ent_refs, dx_ref = rest
    j = pl.program_id(1)
    x = x_ref[...].astype(jnp.float32)
    cols = j * block_v + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    ent, g_ent = (ent_refs[0][...], ent_refs[1][...]) if ent_refs else (None, None)
    dx = tiles.grad_tile(x, cols, tgt_ref[...], n_cols, m_ref[...], ls_ref[...], g_ref[...], ent, g_ent)
    dx_ref[...] = dx.astype(dx_ref.dtype)


def grid_grad(x_NV, tgt_N, m_N, log_s_N, g_N, ent_N, g_ent_N, *, block_n, block_v, interpret, backend):
    """dlogits [N, V] (dtype of x_NV); `ent_N`/`g_ent_N` may be None."""
    n, v = x_NV.shape
    bn, bv = min(block_n, n), min(block_v, v)
    tile = pl.BlockSpec((bn, bv), lambda i, j: (i, j))
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    rows = [tgt_N.astype(jnp.int32), m_N, log_s_N, g_N]
    if g_ent_N is not None:
        rows += [ent_N, g_ent_N]
    return pl.pallas_call(
        functools.partial(_grid_grad_kernel, block_v=bv, n_cols=v),
        grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
        in_specs=[tile] + [row] * len(rows),
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct((n, v), x_NV.dtype),
        interpret=interpret,
        compiler_params=_grid_params(backend, ("parallel", "parallel")),
    )(x_NV, *(r[:, None] for r in rows))


# --------------------------------------------------------------------------- triton


def _triton_stats_kernel(x_ref, tgt_ref, m_ref, s_ref, t_ref, u_ref, *, bn, bv, n_rows, n_cols, with_entropy):
    from jax.experimental.pallas import triton as pltriton

    r0 = pl.program_id(0) * bn
    row_ok = (r0 + jnp.arange(bn, dtype=jnp.int32)) < n_rows
    tgt = pltriton.load(tgt_ref.at[pl.ds(r0, bn)], mask=row_ok, other=0)[:, None]

    def body(j, st):
        cols = j * bv + jnp.arange(bv, dtype=jnp.int32)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = pltriton.load(x_ref.at[pl.ds(r0, bn), pl.ds(j * bv, bv)], mask=ok, other=-jnp.inf)
        return tiles.update_stats(st, x.astype(jnp.float32), cols[None, :], tgt, n_cols, with_entropy)

    st = jax.lax.fori_loop(0, pl.cdiv(n_cols, bv), body, tiles.init_stats((bn, 1)))
    for ref, val in zip((m_ref, s_ref, t_ref, u_ref), st):
        pltriton.store(ref.at[pl.ds(r0, bn)], val[:, 0], mask=row_ok)


def triton_stats(x_NV, tgt_N, *, block_n, block_v, with_entropy, interpret, num_warps=4) -> tiles.Stats:
    """Per-row statistics [N] of x_NV [N, V]; block sizes must be powers of 2."""
    n, v = x_NV.shape
    bn, bv = min(block_n, pl.next_power_of_2(n)), min(block_v, pl.next_power_of_2(v))
    kernel = functools.partial(
        _triton_stats_kernel, bn=bn, bv=bv, n_rows=n, n_cols=v, with_entropy=with_entropy
    )
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn),),
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * 4,
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(num_warps),
    )(x_NV, tgt_N.astype(jnp.int32))
    return tiles.Stats(*out)


def _triton_grad_kernel(x_ref, tgt_ref, m_ref, ls_ref, g_ref, *rest, bn, bv, n_rows, n_cols):
    from jax.experimental.pallas import triton as pltriton

    *ent_refs, dx_ref = rest
    r0, c0 = pl.program_id(0) * bn, pl.program_id(1) * bv
    row_ok = (r0 + jnp.arange(bn, dtype=jnp.int32)) < n_rows
    cols = c0 + jnp.arange(bv, dtype=jnp.int32)
    ok = row_ok[:, None] & (cols < n_cols)[None, :]

    def row(ref):
        return pltriton.load(ref.at[pl.ds(r0, bn)], mask=row_ok, other=0)[:, None]

    tile = (pl.ds(r0, bn), pl.ds(c0, bv))
    x = pltriton.load(x_ref.at[tile], mask=ok, other=-jnp.inf).astype(jnp.float32)
    ent, g_ent = (row(ent_refs[0]), row(ent_refs[1])) if ent_refs else (None, None)
    dx = tiles.grad_tile(x, cols[None, :], row(tgt_ref), n_cols, row(m_ref), row(ls_ref), row(g_ref), ent, g_ent)
    pltriton.store(dx_ref.at[tile], dx.astype(dx_ref.dtype), mask=ok)


def triton_grad(x_NV, tgt_N, m_N, log_s_N, g_N, ent_N, g_ent_N, *, block_n, block_v, interpret, num_warps=4):
    """dlogits [N, V] (dtype of x_NV); `ent_N`/`g_ent_N` may be None."""
    n, v = x_NV.shape
    bn, bv = min(block_n, pl.next_power_of_2(n)), min(block_v, pl.next_power_of_2(v))
    rows = [tgt_N.astype(jnp.int32), m_N, log_s_N, g_N]
    if g_ent_N is not None:
        rows += [ent_N, g_ent_N]
    return pl.pallas_call(
        functools.partial(_triton_grad_kernel, bn=bn, bv=bv, n_rows=n, n_cols=v),
        grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
        out_shape=jax.ShapeDtypeStruct((n, v), x_NV.dtype),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(num_warps),
    )(x_NV, *rows)
