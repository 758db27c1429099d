"""Public entry points: impl dispatch, interpret mode, sharding inference."""

from __future__ import annotations

import os

import jax
from jax.sharding import NamedSharding

from cpo_jax.kernels import chunked, core
from cpo_jax.kernels.core import Layout
from cpo_jax.kernels.reference import (
    TokenLogprobs,
    normalize_mask,
    package,
    token_logprobs_from_hidden_reference,
    token_logprobs_reference,
)

IMPLS = ("auto", "pallas", "chunked", "reference")
# "auto" uses plain XLA (the reference) up to this many logits N·V: below it
# launch/loop overheads dominate and its float32 [N, V] temporaries are small.
# On CPU the reference measured faster than the chunked loop
# (experiments/bench_logprobs.py), so it is kept up to 256 MiB of float32.
SMALL_NV = {"cpu": 1 << 26}
SMALL_NV_DEFAULT = 1 << 22
INTERPRET_ENV = "CPO_JAX_PALLAS_INTERPRET"

# (block_n, block_v) defaults per (kind, driver); callers may override.
_BLOCKS = {
    ("logits", "grid"): (256, 2048),
    ("logits", "triton"): (4, 2048),
    ("hidden", "grid"): (256, 512),
}


def resolve_interpret(interpret: bool | None, backend: str) -> bool:
    """Explicit argument, else $CPO_JAX_PALLAS_INTERPRET (0/1), else CPU-only."""
    if interpret is not None:
        return bool(interpret)
    env = os.environ.get(INTERPRET_ENV, "")
    if env:
        return env.lower() not in ("0", "false", "no")
    return backend == "cpu"


def resolve_impl(impl: str, kind: str, backend: str, n: int, v: int) -> str:
    """"auto": XLA reference when N·V is small; else Pallas where it lowers
    natively (logits: GPU/TPU; hidden: TPU), else the chunked plain-JAX path."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if n * v <= SMALL_NV.get(backend, SMALL_NV_DEFAULT):
        return "reference"
    native = ("gpu", "tpu") if kind == "logits" else ("tpu",)
    return "pallas" if backend in native else "chunked"


def _named(a):
    """(mesh, spec) of a multi-device NamedSharding on `a`, else None."""
    if isinstance(a, jax.core.Tracer):
        sharding = getattr(jax.typeof(a), "sharding", None)  # explicit axes only
    else:
        sharding = getattr(a, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty or sharding.mesh.size == 1:
        return None
    spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
    return sharding.mesh, spec


def infer_layout(ops: tuple) -> Layout | None:
    """Layout from the NamedSharding of logits (or of h and w); None if unsharded."""
    first = _named(ops[0])
    if len(ops) == 1:
        if first is None:
            return None
        mesh, spec = first
        token_spec, vocab_axis = spec[:-1], spec[-1]
    else:
        w = _named(ops[1])
        if first is None and w is None:
            return None
        mesh = (first or w)[0]
        token_spec = first[1][:-1] if first else (None,) * (ops[0].ndim - 1)
        vocab_axis = w[1][1] if w else None
    if vocab_axis is None and all(s is None for s in token_spec):
        return None
    return Layout(mesh, tuple(token_spec), vocab_axis)


def _plan(kind, impl, backend, n, v, block_n, block_v, interpret, pallas_driver, return_entropy):
    interp = resolve_interpret(interpret, backend)
    driver = pallas_driver or ("triton" if backend == "gpu" and not interp and kind == "logits" else "grid")
    if impl == "pallas" and kind == "hidden" and backend == "gpu" and not interp:
        raise ValueError("impl='pallas' for the hidden path needs TPU or interpret mode; use 'chunked' on GPU")
    if impl == "chunked":
        bn, bv = 0, block_v or chunked.default_chunk(n, v)
    else:
        bn, bv = _BLOCKS[(kind, driver)]
        bn, bv = block_n or bn, block_v or bv
    return core.Plan(kind, impl, driver, bn, bv, interp, backend, return_entropy)


def token_logprobs(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    impl: str = "auto",
    return_entropy: bool = False,
    interpret: bool | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    layout: Layout | None = None,
    pallas_driver: str | None = None,
) -> TokenLogprobs:
    """log p(targets) from logits [..., V] without a float32 [..., V] log-softmax.

    logp = x[y] - logsumexp(x);  H = -sum_v p_v log p_v.

    Args:
      logits: [..., V], any float dtype (bf16 is read as bf16).
      targets: int [...] in [0, V) where counted.
      mask: [...] bool (or nonzero = counted); None = all tokens. Masked
        tokens give 0 (value and gradient).
      impl: "auto" | "pallas" | "chunked" | "reference" (package docstring).
      return_entropy: also return H per token (and differentiate through it).
      interpret: Pallas interpret mode; None = $CPO_JAX_PALLAS_INTERPRET,
        else only on CPU.
      block_n, block_v: Pallas row / vocab tile (chunked: vocab chunk);
        None = per-backend defaults.
      layout: where the inputs live on a mesh; None = read their shardings.
      pallas_driver: "grid" (TPU, interpret) | "triton" (GPU); None = by backend.

    Returns:
      TokenLogprobs(logprobs, entropy, seq_logprobs, token_count).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} must be targets {targets.shape} + (V,)")
    mask_b = normalize_mask(targets, mask)
    backend = jax.default_backend()
    n, v = targets.size, logits.shape[-1]
    impl = resolve_impl(impl, "logits", backend, n, v)
    if impl == "reference":
        return token_logprobs_reference(logits, targets, mask_b, return_entropy=return_entropy)
    plan = _plan("logits", impl, backend, n, v, block_n, block_v, interpret, pallas_driver, return_entropy)
    layout = layout if layout is not None else infer_layout((logits,))
    logp, ent = core.streaming_logprobs(plan, layout, (logits,), targets, mask_b)
    return package(logp, ent if return_entropy else None, mask_b)


def token_logprobs_from_hidden(
    h: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    impl: str = "auto",
    return_entropy: bool = False,
    interpret: bool | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    layout: Layout | None = None,
) -> TokenLogprobs:
    """Fused unembedding + log-probs: logits = h [..., D] @ w [D, V], never formed.

    Gradients flow to h and w (recomputed chunk by chunk from saved row statistics).
    Same conventions and result as `token_logprobs(h @ w, targets, mask)`.
    """
    if h.shape[:-1] != targets.shape or w.ndim != 2 or w.shape[0] != h.shape[-1]:
        raise ValueError(f"need h [..., D], w [D, V], targets [...]: {h.shape}, {w.shape}, {targets.shape}")
    mask_b = normalize_mask(targets, mask)
    backend = jax.default_backend()
    n, v = targets.size, w.shape[1]
    impl = resolve_impl(impl, "hidden", backend, n, v)
    if impl == "reference":
        return token_logprobs_from_hidden_reference(h, w, targets, mask_b, return_entropy=return_entropy)
    plan = _plan("hidden", impl, backend, n, v, block_n, block_v, interpret, None, return_entropy)
    layout = layout if layout is not None else infer_layout((h, w))
    logp, ent = core.streaming_logprobs(plan, layout, (h, w), targets, mask_b)
    return package(logp, ent if return_entropy else None, mask_b)
