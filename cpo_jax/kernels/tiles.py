"""The per-tile math shared by every streaming implementation.

One vocabulary tile x[bn, bv] (float32, already upcast) updates running
statistics per row with an online log-sum-exp (Milakov & Gimelshein 2018):

    m' = max(m, max_v x_v)                          running max
    s' = s e^{m-m'} + sum_v e^{x_v-m'}              sum of exponentials
    t' = t + sum_v [v == y] x_v                     target logit (no gather)
    u' = e^{m-m'} (u + s (m-m')) + sum_v e^{x_v-m'} (x_v-m')

so that at the end

    log p(y) = (t - m) - log s,      H = log s - u / s.

`u` is kept relative to the running max, so H has no cancellation at
logits of +-1e4. Columns `cols >= n_cols` (the ragged last tile, whose
contents are unspecified) are masked to -inf before anything else.

The backward tile is, with log p_v = (x_v - m) - log s (m and log s are
saved separately: x - m is exact at logits of 1e4, x - lse is not) and g,
g_H the cotangents,

    dx_v = g ([v == y] - p_v) - g_H p_v (log p_v + H).

These functions are pure jnp on 2-D arrays and are traced inside Pallas
kernel bodies (TPU, Triton, interpret) and inside the plain-JAX chunked
loops alike; the drivers only differ in how they load tiles.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Finite "minus infinity" for the running max: keeps (m - m') finite.
M_INIT = -1e30


class Stats(NamedTuple):
    """Running statistics, each [bn, 1] float32 (or [N] after squeezing)."""

    m: jax.Array
    s: jax.Array
    t: jax.Array
    u: jax.Array


def init_stats(shape: tuple[int, ...]) -> Stats:
    """Empty statistics: m = M_INIT, s = t = u = 0."""
    zeros = jnp.zeros(shape, jnp.float32)
    return Stats(jnp.full(shape, M_INIT, jnp.float32), zeros, zeros, zeros)


def update_stats(
    stats: Stats,
    x_f32: jax.Array,
    cols: jax.Array,
    targets: jax.Array,
    n_cols: int,
    with_entropy: bool,
) -> Stats:
    """Fold one tile into the statistics.

    Args:
      stats: running Stats, each [bn, 1].
      x_f32: [bn, bv] float32 logits tile.
      cols: [1, bv] or [bn, bv] int32 global column index of each tile column.
      targets: [bn, 1] int32 target index (in the same column numbering).
      n_cols: number of valid columns; cols >= n_cols are padding.
      with_entropy: also update `u` (else it is carried unchanged).
    """
    valid = cols < n_cols
    x = jnp.where(valid, x_f32, -jnp.inf)
    m_new = jnp.maximum(stats.m, jnp.max(x, axis=1, keepdims=True))
    alpha = jnp.exp(stats.m - m_new)
    e = jnp.exp(x - m_new)
    s_new = alpha * stats.s + jnp.sum(e, axis=1, keepdims=True)
    # `& valid`: a vocab shard's target may index past its own columns.
    t_new = stats.t + jnp.sum(jnp.where((cols == targets) & valid, x, 0.0), axis=1, keepdims=True)
    u_new = stats.u
    if with_entropy:
        ex = jnp.where(e > 0.0, e * (x - m_new), 0.0)
        u_new = alpha * (stats.u + stats.s * (stats.m - m_new)) + jnp.sum(ex, axis=1, keepdims=True)
    return Stats(m_new, s_new, t_new, u_new)


def finalize(stats: Stats) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(logp, m, log_s, entropy) from complete statistics (any matching shapes)."""
    log_s = jnp.log(stats.s)
    ent = log_s - stats.u / stats.s
    return (stats.t - stats.m) - log_s, stats.m, log_s, ent


def grad_tile(
    x_f32: jax.Array,
    cols: jax.Array,
    targets: jax.Array,
    n_cols: int,
    m: jax.Array,
    log_s: jax.Array,
    g_logp: jax.Array,
    ent: jax.Array | None = None,
    g_ent: jax.Array | None = None,
) -> jax.Array:
    """d(loss)/dx for one tile, float32 [bn, bv]; exactly 0 on padding columns.

    Args:
      x_f32, cols, targets, n_cols: as in `update_stats`.
      m, log_s: [bn, 1] saved running max and log of the exp-sum.
      g_logp: [bn, 1] cotangent of log p(y) (0 on masked tokens).
      ent, g_ent: [bn, 1] saved entropy and its cotangent, or None.
    """
    valid = cols < n_cols
    logp_v = jnp.where(valid, (x_f32 - m) - log_s, -jnp.inf)
    p = jnp.exp(logp_v)
    dx = g_logp * (jnp.where(cols == targets, 1.0, 0.0) - p)
    if g_ent is not None:
        dx = dx - g_ent * jnp.where(p > 0.0, p * (logp_v + ent), 0.0)
    return jnp.where(valid, dx, 0.0)


def combine_across(stats: Stats, axis_name, with_entropy: bool) -> Stats:
    """Merge partial statistics of vocabulary shards (inside shard_map).

    m = pmax(m_k); s = psum(s_k e^{m_k-m}); t = psum(t_k);
    u = psum(e^{m_k-m} (u_k + s_k (m_k-m))).
    """
    m = jax.lax.pmax(stats.m, axis_name)
    alpha = jnp.exp(stats.m - m)
    s = jax.lax.psum(alpha * stats.s, axis_name)
    t = jax.lax.psum(stats.t, axis_name)
    u = stats.u
    if with_entropy:
        u = jax.lax.psum(alpha * (stats.u + stats.s * (stats.m - m)), axis_name)
    return Stats(m, s, t, u)
