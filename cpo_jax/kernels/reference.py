"""Plain-JAX references for the tokenwise log-prob kernel (tests, small sizes).

These materialise the float32 [N, V] log-softmax on purpose: they are the
ground truth the streaming kernels are compared against, and the "naive XLA"
baseline of the benchmark.

    logp_n = x_{n, y_n} - logsumexp_v x_{n, v}
    H_n    = -sum_v p_{n, v} log p_{n, v},   p = softmax(x_n)

Masked tokens give 0 (value and gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenLogprobs(NamedTuple):
    """Result of every `token_logprobs*` function.

    Attributes:
      logprobs: [...] float32, log p(target) per token; 0 where masked.
      entropy: [...] float32 entropy of the predictive distribution per token
        (0 where masked), or None unless `return_entropy=True`.
      seq_logprobs: [...[:-1]] float32, `logprobs` summed over the last
        (token) axis of `targets`; a scalar for 1-D targets.
      token_count: [...[:-1]] float32, number of unmasked tokens per sequence.
    """

    logprobs: jax.Array
    entropy: jax.Array | None
    seq_logprobs: jax.Array
    token_count: jax.Array


def normalize_mask(targets: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Boolean mask of `targets.shape` (None means every token counts)."""
    if mask is None:
        return jnp.ones(targets.shape, dtype=bool)
    if mask.shape != targets.shape:
        raise ValueError(f"mask shape {mask.shape} != targets shape {targets.shape}")
    return mask if mask.dtype == jnp.bool_ else mask != 0


def package(logp: jax.Array, ent: jax.Array | None, mask_bool: jax.Array) -> TokenLogprobs:
    """Per-sequence sums/counts over the last axis; inputs already masked."""
    return TokenLogprobs(
        logprobs=logp,
        entropy=ent,
        seq_logprobs=jnp.sum(logp, axis=-1),
        token_count=jnp.sum(mask_bool.astype(jnp.float32), axis=-1),
    )


def token_logprobs_reference(
    logits_NV: jax.Array,
    targets_N: jax.Array,
    mask_N: jax.Array | None = None,
    *,
    return_entropy: bool = False,
) -> TokenLogprobs:
    """Reference: float32 log_softmax + take_along_axis. Shapes [..., V], [...]."""
    if logits_NV.shape[:-1] != targets_N.shape:
        raise ValueError(f"logits {logits_NV.shape} vs targets {targets_N.shape}")
    mask_b = normalize_mask(targets_N, mask_N)
    logsm = jax.nn.log_softmax(logits_NV.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logsm, targets_N[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp = jnp.where(mask_b, picked, 0.0)
    ent = None
    if return_entropy:
        # p * logp with p == 0 (logp == -inf) contributes 0, not NaN.
        plogp = jnp.where(logsm > -jnp.inf, jnp.exp(logsm) * logsm, 0.0)
        ent = jnp.where(mask_b, -jnp.sum(plogp, axis=-1), 0.0)
    return package(logp, ent, mask_b)


def token_logprobs_from_hidden_reference(
    h_ND: jax.Array,
    w_DV: jax.Array,
    targets_N: jax.Array,
    mask_N: jax.Array | None = None,
    *,
    return_entropy: bool = False,
) -> TokenLogprobs:
    """Reference for the fused path: logits = h @ w (float32 accumulation)."""
    logits = jnp.einsum("...d,dv->...v", h_ND, w_DV, preferred_element_type=jnp.float32)
    return token_logprobs_reference(logits, targets_N, mask_N, return_entropy=return_entropy)
