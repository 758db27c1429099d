"""Preference losses: pure functions of per-sequence log-probs, one registry.

Every loss takes

  logps:     [B, 2] policy log-probs, ``[:, 0]`` chosen (y_w), ``[:, 1]`` rejected (y_l)
  ref_logps: [B, 2] frozen-reference log-probs, same layout (``None`` only for
             reference-free losses)

plus keyword-only hyper-parameters, and returns ``(loss_B, metrics)`` where
``loss_B`` is the per-pair loss [B] in float32 and ``metrics`` a dict of
per-pair float32 arrays [B] (see :func:`pair_metrics`). Reduce as you like.

Summed vs length-averaged log-probs is the caller's explicit choice: use
:func:`sequence_logps` with ``reduction="sum"`` or ``"mean"``. Each registry
entry records the reduction its source uses (:attr:`LossSpec.logp_reduction`).

With ``delta = logps[:,0] - logps[:,1]``, ``delta_ref`` likewise and
``z = beta * (delta - delta_ref)`` (notation of arXiv 2605.20834 / DESIGN.md):

  dpo         softplus(-z)                          (+ cDPO / robust smoothing)
  ipo         (delta - delta_ref - 1/(2 beta))^2
  hinge       relu(1 - z)                           (SLiC)
  simpo       softplus(-(beta delta - gamma))       (reference-free)
  cpo         softplus(-(z - Omega)),  Omega = gamma (1/pi_ref(y_w) + 1/pi_ref(y_l))
  cpo_smooth  softplus(-(z - beta/alpha m)),  m = softplus(tau (gamma - delta_ref)) / tau
  cpo_easy    softplus(-(z - m)),  m = gamma (1/lp_ref(y_w) + 1/lp_ref(y_l))
  cpo_clip    softplus(-beta (delta - max(delta_ref, 0)))

"CPO" here is *Constrained* Preference Optimization (2605.20834), not TRL's
*Contrastive* Preference Optimization (2401.08417).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from cpo_jax.checks import as_f32, as_pairs, check_positive, check_same_shape

Array = jax.Array
Metrics = dict[str, Array]

# Largest log-margin whose exp is finite in float32 with room for the sum with z.
_MAX_LOG_MARGIN = 86.0


# ----------------------------------------------------------------------------
# Input handling.


def _pair_inputs(logps, ref_logps) -> tuple[Array, Array]:
  logps = as_pairs("logps", logps)
  ref_logps = as_pairs("ref_logps", ref_logps)
  if logps.shape != ref_logps.shape:
    raise ValueError(
        f"logps {logps.shape} and ref_logps {ref_logps.shape} must match.")
  return logps, ref_logps


def sequence_logps(token_logps, mask, *, reduction: str) -> Array:
  """Per-sequence log-prob from per-token log-probs over the response mask.

  Args:
    token_logps: [..., T] log p(token) (0 or anything where ``mask`` is 0).
    mask: [..., T] 1 on response tokens, 0 elsewhere.
    reduction: "sum" (log pi(y|x), the paper's derivation, classic DPO) or
      "mean" (length-averaged, SimPO and the official CPO code).

  Returns:
    [...] float32; a row with no response tokens gives 0.
  """
  token_logps, mask = as_f32(token_logps), as_f32(mask)
  check_same_shape(token_logps=token_logps, mask=mask)
  total = jnp.sum(jnp.where(mask > 0, token_logps, 0.0) * mask, axis=-1)
  if reduction == "sum":
    return total
  if reduction == "mean":
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")


# ----------------------------------------------------------------------------
# Metrics shared by every preference loss (DESIGN.md section 4).


def pair_metrics(logps, ref_logps, *, beta) -> Metrics:
  """Per-pair metrics: TRL-style rewards and the paper's diagnostics.

  ``accuracy_relative = [delta > delta_ref]`` is what TRL logs as accuracy;
  ``accuracy_absolute = [delta > 0]`` asks whether the policy prefers y_w;
  ``in_U = [delta_ref < delta < 0]`` is membership of the undesirable space
  (Def. 3.3). With ``ref_logps=None`` only reference-free entries appear.
  """
  delta = logps[:, 0] - logps[:, 1]
  out = {"delta": delta, "accuracy_absolute": (delta > 0).astype(jnp.float32)}
  if ref_logps is None:
    out["rewards_chosen"] = beta * logps[:, 0]
    out["rewards_rejected"] = beta * logps[:, 1]
  else:
    delta_ref = ref_logps[:, 0] - ref_logps[:, 1]
    out["delta_ref"] = delta_ref
    out["rewards_chosen"] = beta * (logps[:, 0] - ref_logps[:, 0])
    out["rewards_rejected"] = beta * (logps[:, 1] - ref_logps[:, 1])
    out["accuracy_relative"] = (delta > delta_ref).astype(jnp.float32)
    out["in_U"] = ((delta < 0) & (delta > delta_ref)).astype(jnp.float32)
  out["margin"] = out["rewards_chosen"] - out["rewards_rejected"]
  return out


def _margin_loss(logps, ref_logps, *, beta, margin) -> tuple[Array, Metrics]:
  """softplus(-(beta (delta - delta_ref) - margin)) with the shared metrics."""
  z = beta * ((logps[:, 0] - logps[:, 1]) - (ref_logps[:, 0] - ref_logps[:, 1]))
  metrics = pair_metrics(logps, ref_logps, beta=beta)
  metrics["loss_margin"] = jnp.broadcast_to(margin, z.shape)
  return jax.nn.softplus(margin - z), metrics


# ----------------------------------------------------------------------------
# The losses.


def dpo(logps, ref_logps, *, beta, label_smoothing=0.0, smoothing="cdpo"):
  """DPO (Rafailov et al. 2023, Eq. 7): ``softplus(-z)``.

  Label smoothing ``eps`` in [0, 0.5) models flipped labels:
    cdpo:   ``(1-eps) softplus(-z) + eps softplus(z)``   (conservative DPO)
    robust: ``((1-eps) softplus(-z) - eps softplus(z)) / (1 - 2 eps)``
            (Chowdhury et al. 2024, unbiased under label noise).
  """
  check_positive("beta", beta)
  if isinstance(label_smoothing, numbers.Real) and not 0 <= label_smoothing < 0.5:
    raise ValueError(
        f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}.")
  if smoothing not in ("cdpo", "robust"):
    raise ValueError(f"smoothing must be 'cdpo' or 'robust', got {smoothing!r}.")
  logps, ref_logps = _pair_inputs(logps, ref_logps)
  loss, metrics = _margin_loss(logps, ref_logps, beta=beta, margin=0.0)
  z = beta * (metrics["delta"] - metrics["delta_ref"])
  eps = label_smoothing
  flipped = jax.nn.softplus(z)
  if smoothing == "cdpo":
    loss = (1 - eps) * loss + eps * flipped
  else:
    loss = ((1 - eps) * loss - eps * flipped) / (1 - 2 * eps)
  return loss, metrics


def ipo(logps, ref_logps, *, beta):
  """IPO (Azar et al. 2023, Eq. 17): ``(delta - delta_ref - 1/(2 beta))^2``.

  TRL feeds length-averaged log-probs; pass ``sequence_logps(..., "mean")``
  for that behaviour.
  """
  check_positive("beta", beta)
  logps, ref_logps = _pair_inputs(logps, ref_logps)
  metrics = pair_metrics(logps, ref_logps, beta=beta)
  loss = (metrics["delta"] - metrics["delta_ref"] - 1.0 / (2.0 * beta)) ** 2
  return loss, metrics


def hinge(logps, ref_logps, *, beta):
  """SLiC-HF hinge (Zhao et al. 2023): ``relu(1 - z)``."""
  check_positive("beta", beta)
  logps, ref_logps = _pair_inputs(logps, ref_logps)
  metrics = pair_metrics(logps, ref_logps, beta=beta)
  loss = jax.nn.relu(1.0 - beta * (metrics["delta"] - metrics["delta_ref"]))
  return loss, metrics


def simpo(logps, ref_logps=None, *, beta, gamma):
  """SimPO (Meng et al. 2024, Eq. 6): ``softplus(-(beta delta - gamma))``.

  Reference-free; meant for length-averaged log-probs. ``ref_logps`` is used
  only for the diagnostics (delta_ref, in_U, relative accuracy) if given.
  """
  check_positive("beta", beta)
  logps = as_pairs("logps", logps)
  if ref_logps is not None:
    logps, ref_logps = _pair_inputs(logps, ref_logps)
  metrics = pair_metrics(logps, ref_logps, beta=beta)
  metrics["rewards_chosen"] = beta * logps[:, 0]
  metrics["rewards_rejected"] = beta * logps[:, 1]
  metrics["margin"] = beta * metrics["delta"]
  return jax.nn.softplus(gamma - beta * metrics["delta"]), metrics


def cpo_log_margin(ref_logps, *, gamma) -> Array:
  """log Omega = log gamma + logaddexp(-lp_ref(y_w), -lp_ref(y_l)) (Eq. 17)."""
  ref_logps = as_pairs("ref_logps", ref_logps)
  return jnp.log(gamma) + jnp.logaddexp(-ref_logps[:, 0], -ref_logps[:, 1])


def cpo(logps, ref_logps, *, beta, gamma):
  """Constrained PO, paper Eq. 17: ``softplus(-(z - Omega))``.

  ``Omega = gamma (1/pi_ref(y_w|x) + 1/pi_ref(y_l|x))`` is formed in log space
  (:func:`cpo_log_margin`). It is meaningful for bandits and short responses;
  for long sequences 1/pi_ref is astronomically large, so Omega saturates at
  ``exp(86)`` (metric ``margin_saturated``) instead of overflowing: the loss
  stays finite and its gradient in delta is then ``-beta``. gamma = 0 is DPO.
  """
  check_positive("beta", beta)
  if isinstance(gamma, numbers.Real) and gamma < 0:
    raise ValueError(f"gamma must be >= 0, got {gamma!r}.")
  logps, ref_logps = _pair_inputs(logps, ref_logps)
  log_omega = cpo_log_margin(ref_logps, gamma=gamma)
  omega = jnp.exp(jnp.minimum(log_omega, _MAX_LOG_MARGIN))
  loss, metrics = _margin_loss(logps, ref_logps, beta=beta, margin=omega)
  metrics["margin_saturated"] = (log_omega > _MAX_LOG_MARGIN).astype(jnp.float32)
  return loss, metrics


def cpo_smooth(logps, ref_logps, *, beta, gamma, tau, alpha):
  """Official-code ``cpo`` variant: a smooth target margin.

  ``m = softplus(tau (gamma - delta_ref)) / tau`` and the loss is
  ``softplus(-(z - (beta/alpha) m))``. As tau -> inf with alpha = 1 the
  implied target for delta is ``max(delta_ref, gamma)``. The official code
  feeds length-averaged log-probs (config defaults gamma 0.5, tau 2, alpha 1).
  """
  for name, value in (("beta", beta), ("tau", tau), ("alpha", alpha)):
    check_positive(name, value)
  logps, ref_logps = _pair_inputs(logps, ref_logps)
  delta_ref = ref_logps[:, 0] - ref_logps[:, 1]
  m = jax.nn.softplus(tau * (gamma - delta_ref)) / tau
  return _margin_loss(logps, ref_logps, beta=beta, margin=(beta / alpha) * m)


def cpo_easy(logps, ref_logps, *, beta, gamma):
  """Official-code ``easy`` variant: ``softplus(-(z - m))``.

  ``m = gamma (1/lp_ref(y_w) + 1/lp_ref(y_l))`` with length-averaged reference
  log-probs lp_ref < 0, so m <= 0 for gamma >= 0 (it loosens the DPO target).
  lp_ref is clamped to <= -1e-6 so a certain response cannot divide by zero.
  """
  check_positive("beta", beta)
  logps, ref_logps = _pair_inputs(logps, ref_logps)
  lp = jnp.minimum(ref_logps, -1e-6)
  m = gamma * (1.0 / lp[:, 0] + 1.0 / lp[:, 1])
  return _margin_loss(logps, ref_logps, beta=beta, margin=m)


def cpo_clip(logps, ref_logps, *, beta):
  """Official-code ``clip`` variant (its config default).

  ``softplus(-beta (delta - max(delta_ref, 0)))``: DPO whose target margin is
  clipped at 0, so a reference that prefers y_l no longer lowers the bar.
  Equals DPO when delta_ref >= 0.
  """
  check_positive("beta", beta)
  logps, ref_logps = _pair_inputs(logps, ref_logps)
  delta_ref = ref_logps[:, 0] - ref_logps[:, 1]
  return _margin_loss(
      logps, ref_logps, beta=beta, margin=beta * jax.nn.relu(-delta_ref))


# ----------------------------------------------------------------------------
# Registry.


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """A registered preference loss.

  Attributes:
    fn: ``fn(logps, ref_logps, **hparams) -> (loss_B, metrics)``.
    logp_reduction: the log-prob reduction of the loss's source ("sum" or
      "mean"); a default that callers may override explicitly.
    uses_reference: whether the loss value depends on ref_logps.
    source: where the formula comes from.
  """

  fn: Callable[..., tuple[Array, Metrics]]
  logp_reduction: str
  uses_reference: bool
  source: str


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo, "sum", True, "Rafailov et al. 2023 (+cDPO/robust)"),
    "ipo": LossSpec(ipo, "sum", True, "Azar et al. 2023"),
    "hinge": LossSpec(hinge, "sum", True, "SLiC-HF, Zhao et al. 2023"),
    "simpo": LossSpec(simpo, "mean", False, "Meng et al. 2024"),
    "cpo": LossSpec(cpo, "sum", True, "Constrained PO, 2605.20834 Eq. 17"),
    "cpo_smooth": LossSpec(
        cpo_smooth, "mean", True, "Constrained PO, official code `cpo`"),
    "cpo_easy": LossSpec(
        cpo_easy, "mean", True, "Constrained PO, official code `easy`"),
    "cpo_clip": LossSpec(
        cpo_clip, "mean", True, "Constrained PO, official code `clip`"),
}


def get_loss(name: str) -> LossSpec:
  """Looks up a loss by name; unknown names list the valid ones."""
  try:
    return LOSSES[name]
  except KeyError:
    raise KeyError(
        f"Unknown loss {name!r}. Valid names: {', '.join(sorted(LOSSES))}. "
        "Note: 'cpo*' here is Constrained Preference Optimization "
        "(arXiv 2605.20834), not TRL's Contrastive Preference Optimization "
        "(arXiv 2401.08417).") from None
