"""The streaming op: custom VJP around shard-local statistics and gradients.

    forward (per shard):  Stats <- impl stats (logits or h @ w tiles)
                          [vocab-sharded: combine with pmax/psum]
                          logp, m, log s, H <- finalize; masked tokens -> 0
    backward (per shard): recompute tiles from the saved m, log s (and H);
                          logits: dlogits local, no collective;
                          hidden: dh psum over the vocab axis,
                                  dw psum over the token axes.

Residuals are the inputs plus m[N], log s[N] (lse = m + log s) and H[N]:
no [N, V] array is saved.
A Pallas call is never partitioned by XLA, so when a `Layout` is given the
whole forward and the whole backward each run inside one `jax.shard_map`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cpo_jax.kernels import chunked, hidden_pallas, logits_pallas, tiles


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static choices of one call (hashable: a custom_vjp nondiff argument).

    kind: "logits" | "hidden"; impl: "pallas" | "chunked"; driver: "grid"
    (Mosaic TPU / interpret) | "triton" (GPU); backend: jax backend name.
    """

    kind: str
    impl: str
    driver: str
    block_n: int
    block_v: int
    interpret: bool
    backend: str
    with_entropy: bool


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the op's inputs live on a mesh.

    token_spec: one PartitionSpec entry per leading (token) dimension of
    the targets; vocab_axis: mesh axis (or None) sharding V (the last dim of
    logits, or of w [D, V]). h is [..., D] with D replicated.
    """

    mesh: Any
    token_spec: tuple
    vocab_axis: Any = None

    @property
    def token_axes(self) -> tuple:
        names = []
        for entry in self.token_spec:
            if entry is not None:
                names.extend(entry if isinstance(entry, tuple) else (entry,))
        return tuple(names)


def _stats(plan: Plan, ops, tgt_N) -> tiles.Stats:
    kw = dict(with_entropy=plan.with_entropy)
    if plan.kind == "logits":
        (x,) = ops
        if plan.impl == "chunked":
            return chunked.logits_stats(x, tgt_N, block_v=plan.block_v, **kw)
        kw.update(block_n=plan.block_n, block_v=plan.block_v, interpret=plan.interpret)
        if plan.driver == "triton":
            return logits_pallas.triton_stats(x, tgt_N, **kw)
        return logits_pallas.grid_stats(x, tgt_N, backend=plan.backend, **kw)
    h, w = ops
    if plan.impl == "chunked":
        return chunked.hidden_stats(h, w, tgt_N, block_v=plan.block_v, **kw)
    return hidden_pallas.hidden_stats(
        h, w, tgt_N, block_n=plan.block_n, block_v=plan.block_v,
        interpret=plan.interpret, backend=plan.backend, **kw,
    )


def _grads(plan: Plan, ops, tgt_N, m_N, log_s_N, g_N, ent_N, g_ent_N):
    args = (tgt_N, m_N, log_s_N, g_N, ent_N, g_ent_N)
    blocks = dict(block_n=plan.block_n, block_v=plan.block_v, interpret=plan.interpret)
    if plan.kind == "logits":
        (x,) = ops
        if plan.impl == "chunked":
            return (chunked.logits_grad(x, *args, block_v=plan.block_v),)
        if plan.driver == "triton":
            return (logits_pallas.triton_grad(x, *args, **blocks),)
        return (logits_pallas.grid_grad(x, *args, backend=plan.backend, **blocks),)
    h, w = ops
    if plan.impl == "chunked":
        return chunked.hidden_grad(h, w, *args, block_v=plan.block_v)
    return hidden_pallas.hidden_grad(h, w, *args, backend=plan.backend, **blocks)


def _flat(plan: Plan, ops):
    """Leading dims of logits / h flattened to N."""
    return (ops[0].reshape(-1, ops[0].shape[-1]),) + tuple(ops[1:])


def _local_targets(plan: Plan, ops, tgt, vocab_axis):
    tgt_N = tgt.reshape(-1).astype(jnp.int32)
    if vocab_axis is None:
        return tgt_N
    v_local = ops[-1].shape[-1]
    return tgt_N - jax.lax.axis_index(vocab_axis) * v_local


def _fwd_local(plan: Plan, vocab_axis, ops, tgt, mask):
    st = _stats(plan, _flat(plan, ops), _local_targets(plan, ops, tgt, vocab_axis))
    if vocab_axis is not None:
        st = tiles.combine_across(st, vocab_axis, plan.with_entropy)
    logp, m, log_s, ent = tiles.finalize(st)
    keep = mask.reshape(-1)
    logp, ent = jnp.where(keep, logp, 0.0), jnp.where(keep, ent, 0.0)
    return tuple(a.reshape(tgt.shape) for a in (logp, ent, m, log_s))


def _bwd_local(plan: Plan, layout: Layout | None, ops, tgt, mask, m_, log_s, ent, g, g_ent):
    vocab_axis = layout.vocab_axis if layout else None
    m = mask.reshape(-1)
    g_N = jnp.where(m, g.reshape(-1), 0.0)
    g_ent_N = jnp.where(m, g_ent.reshape(-1), 0.0) if plan.with_entropy else None
    tgt_N = _local_targets(plan, ops, tgt, vocab_axis)
    rows = (m_.reshape(-1), log_s.reshape(-1), g_N, ent.reshape(-1), g_ent_N)
    grads = _grads(plan, _flat(plan, ops), tgt_N, *rows)
    if plan.kind == "logits":
        return (grads[0].reshape(ops[0].shape),)
    dh, dw = grads
    if vocab_axis is not None:
        dh = jax.lax.psum(dh, vocab_axis)
    if layout is not None and layout.token_axes:
        dw = jax.lax.psum(dw, layout.token_axes)
    return dh.astype(ops[0].dtype).reshape(ops[0].shape), dw.astype(ops[1].dtype)


def _op_specs(plan: Plan, layout: Layout):
    lead = tuple(layout.token_spec)
    if plan.kind == "logits":
        return (P(*lead, layout.vocab_axis),)
    return (P(*lead, None), P(None, layout.vocab_axis))


def _sharded(fn, layout: Layout | None, in_specs, out_specs):
    if layout is None:
        return fn
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _forward(plan: Plan, layout: Layout | None, ops, tgt, mask):
    vocab_axis = layout.vocab_axis if layout else None
    local = lambda ops, tgt, mask: _fwd_local(plan, vocab_axis, ops, tgt, mask)  # noqa: E731
    if layout is None:
        return local(ops, tgt, mask)
    lead = P(*layout.token_spec)
    return _sharded(local, layout, (_op_specs(plan, layout), lead, lead), (lead,) * 4)(ops, tgt, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def streaming_logprobs(plan: Plan, layout: Layout | None, ops: tuple, tgt, mask):
    """(logp, entropy) per token, shapes of `tgt`; masked tokens give 0.

    ops is (logits[..., V],) or (h[..., D], w[D, V]); tgt int [...];
    mask bool [...]. Entropy is meaningful only if plan.with_entropy.
    """
    logp, ent, _, _ = _forward(plan, layout, ops, tgt, mask)
    return logp, ent


def _vjp_fwd(plan, layout, ops, tgt, mask):
    logp, ent, m, log_s = _forward(plan, layout, ops, tgt, mask)
    return (logp, ent), (ops, tgt, mask, m, log_s, ent)


def _vjp_bwd(plan, layout, res, cts):
    ops, tgt, mask, m, log_s, ent = res
    g, g_ent = cts
    local = functools.partial(_bwd_local, plan, layout)
    if layout is not None:
        lead = P(*layout.token_spec)
        specs = _op_specs(plan, layout)
        local = _sharded(local, layout, (specs,) + (lead,) * 7, specs)
    return local(ops, tgt, mask, m, log_s, ent, g, g_ent), None, None


streaming_logprobs.defvjp(_vjp_fwd, _vjp_bwd)
