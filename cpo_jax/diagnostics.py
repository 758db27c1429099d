"""Diagnostics of arXiv 2605.20834: deltas, the undesirable space U, accuracies,
the reference audit, the loss-to-delta certificate and closed-form optima.

All functions are pure, vectorised and jit-able (no host syncs). Fractions
take an optional ``where`` mask [B] (1 = count the pair) and return float32
scalars; an empty selection gives 0.

Notation (DESIGN.md section 1): ``delta = log pi(y_w) - log pi(y_l)``,
``delta_ref`` likewise for pi_ref, ``dr = r*(y_w) - r*(y_l)``.
Whether log-probs are summed or length-averaged is the caller's choice; pass
the same kind for delta and delta_ref.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpo_jax.checks import as_f32, as_pairs, check_positive, check_same_shape

Array = jax.Array


def pair_delta(logps) -> Array:
  """delta = logps[:, 0] - logps[:, 1] for [B, 2] (chosen, rejected) log-probs."""
  logps = as_pairs("logps", logps)
  return logps[:, 0] - logps[:, 1]


def _fraction(indicator, where) -> Array:
  indicator = indicator.astype(jnp.float32)
  if where is None:
    return jnp.mean(indicator) if indicator.size else jnp.float32(0)
  where = as_f32(where)
  check_same_shape(indicator=indicator, where=where)
  return jnp.sum(indicator * where) / jnp.maximum(jnp.sum(where), 1.0)


def in_undesirable_space(delta, delta_ref) -> Array:
  """Def. 3.3: ``delta_ref < delta < 0`` (lower DPO loss than pi_ref, yet prefers y_l)."""
  delta, delta_ref = as_f32(delta), as_f32(delta_ref)
  check_same_shape(delta=delta, delta_ref=delta_ref)
  return (delta_ref < delta) & (delta < 0)


def frac_in_U(delta, delta_ref, where=None) -> Array:
  """Fraction of pairs in the undesirable space U."""
  return _fraction(in_undesirable_space(delta, delta_ref), where)


def relative_accuracy(delta, delta_ref, where=None) -> Array:
  """``mean[delta > delta_ref]``: what TRL logs as reward accuracy."""
  delta, delta_ref = as_f32(delta), as_f32(delta_ref)
  check_same_shape(delta=delta, delta_ref=delta_ref)
  return _fraction(delta > delta_ref, where)


def absolute_accuracy(delta, where=None) -> Array:
  """``mean[delta > 0]``: does the policy actually prefer y_w?"""
  return _fraction(as_f32(delta) > 0, where)


def delta_star(delta_ref, dr, *, beta) -> Array:
  """The KL-regularised RLHF optimum's margin: ``delta_ref + dr / beta``."""
  check_positive("beta", beta)
  delta_ref, dr = as_f32(delta_ref), as_f32(dr)
  check_same_shape(delta_ref=delta_ref, dr=dr)
  return delta_ref + dr / beta


def violates_assumption(delta_ref, dr, *, beta) -> Array:
  """Assumption 3.1 fails on a pair iff ``delta_ref <= -dr / beta`` (delta* <= 0)."""
  check_positive("beta", beta)
  delta_ref, dr = as_f32(delta_ref), as_f32(dr)
  check_same_shape(delta_ref=delta_ref, dr=dr)
  return delta_ref <= -dr / beta


def frac_violating(delta_ref, dr, *, beta, where=None) -> Array:
  """Fraction of pairs violating Assumption 3.1 at this beta."""
  return _fraction(violates_assumption(delta_ref, dr, beta=beta), where)


def frac_ref_prefers_rejected(delta_ref, where=None) -> Array:
  """``mean[delta_ref < 0]``: pairs on which U is non-empty."""
  return _fraction(as_f32(delta_ref) < 0, where)


def reference_audit(delta_ref, *, betas, dr=None, bins=None, where=None) -> dict:
  """Audits a reference model on preference pairs before training.

  Args:
    delta_ref: [B] reference margins.
    betas: [S] KL coefficients to audit (array or sequence).
    dr: optional [B] reward gaps (ground truth or a reward model's scores).
    bins: optional [H+1] histogram edges for delta_ref (default: 41 edges
      spanning [-10, 10]; values outside are clipped into the end bins).
    where: optional [B] mask.

  Returns:
    dict with ``frac_ref_prefers_rejected`` (scalar), ``delta_ref_hist``
    [H], ``bins`` [H+1], and if dr is given ``betas`` [S] and
    ``frac_violating`` [S].
  """
  delta_ref = as_f32(delta_ref)
  bins = jnp.arange(-20.0, 21.0) * 0.5 if bins is None else as_f32(bins)
  weights = None if where is None else as_f32(where)
  clipped = jnp.clip(delta_ref, bins[0], bins[-1])
  hist, _ = jnp.histogram(clipped, bins=bins, weights=weights)
  out = {
      "frac_ref_prefers_rejected": frac_ref_prefers_rejected(delta_ref, where),
      "delta_ref_hist": hist,
      "bins": bins,
  }
  if dr is not None:
    betas = as_f32(betas)
    out["betas"] = betas
    out["frac_violating"] = jax.vmap(
        lambda b: _fraction(delta_ref <= -as_f32(dr) / b, where))(betas)
  return out


def certified_delta(loss, delta_ref, *, beta, margin=0.0) -> Array:
  """Loss-to-delta certificate for ``softplus(-(beta (delta - delta_ref) - m))``.

  A per-pair loss ``l`` certifies ``delta >= delta_ref + (m - log(e^l - 1)) / beta``.
  ``log(e^l - 1)`` is evaluated as ``l + log(-expm1(-l))``, stable for all l > 0;
  l = 0 certifies +inf. Pairs whose bound is > 0 provably prefer y_w.
  """
  check_positive("beta", beta)
  loss, delta_ref = as_f32(loss), as_f32(delta_ref)
  check_same_shape(loss=loss, delta_ref=delta_ref)
  log_expm1 = loss + jnp.log(-jnp.expm1(-loss))
  return delta_ref + (as_f32(margin) - log_expm1) / beta


def rlhf_optimal_logprobs(ref_logprobs, rewards, *, beta) -> Array:
  """Closed-form optimum of ``E_pi[r] - beta KL(pi || pi_ref)`` on finite sets.

  ``log pi*(y|x) = log pi_ref(y|x) + r(x, y)/beta - log Z(x)``.

  Args:
    ref_logprobs: [..., K] reference log-probs over K responses per prompt
      (normalised or not: the result is normalised over K).
    rewards: [..., K] true rewards.
  """
  check_positive("beta", beta)
  ref_logprobs, rewards = as_f32(ref_logprobs), as_f32(rewards)
  check_same_shape(ref_logprobs=ref_logprobs, rewards=rewards)
  return jax.nn.log_softmax(ref_logprobs + rewards / beta, axis=-1)


def kl_regularized_objective(logprobs, ref_logprobs, rewards, *, beta) -> Array:
  """``E_pi[r] - beta KL(pi || pi_ref)`` per prompt for [..., K] log-probs."""
  check_positive("beta", beta)
  logprobs, ref_logprobs, rewards = map(as_f32, (logprobs, ref_logprobs, rewards))
  check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, rewards=rewards)
  p = jnp.exp(logprobs)
  kl = jnp.sum(jnp.where(p > 0, p * (logprobs - ref_logprobs), 0.0), axis=-1)
  return jnp.sum(p * rewards, axis=-1) - beta * kl
