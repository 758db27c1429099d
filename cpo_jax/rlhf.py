"""RLHF pieces: reward-model loss, KL estimators, PPO, GAE, RLOO/REINFORCE.

Pure functions of arrays. Token-level arrays are [B, T] with a ``mask`` [B, T]
(1 on generated/response tokens); masked positions contribute nothing.
Per-example losses and metrics are returned so the caller chooses the
reduction (token mean, sequence mean, ...), as with the preference losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpo_jax.checks import as_f32, as_pairs, check_positive, check_same_shape

Array = jax.Array


def _masked_mean(x, mask, axis=None) -> Array:
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def bt_reward_loss(rewards, *, margin=0.0):
  """Bradley–Terry reward-model loss ``softplus(-(r_w - r_l - margin))``.

  Args:
    rewards: [B, 2] scalar rewards of (chosen, rejected).
    margin: scalar or [B] required reward gap (Llama 2 style preference
      strength); 0 is the plain Bradley–Terry negative log-likelihood.

  Returns:
    (loss [B], metrics) with per-pair accuracy ``[r_w > r_l]`` and gap.
  """
  rewards = as_pairs("rewards", rewards)
  gap = rewards[:, 0] - rewards[:, 1]
  margin = jnp.broadcast_to(as_f32(margin), gap.shape)
  metrics = {
      "accuracy": (gap > 0).astype(jnp.float32),
      "reward_gap": gap,
      "reward_chosen": rewards[:, 0],
      "reward_rejected": rewards[:, 1],
  }
  return jax.nn.softplus(margin - gap), metrics


def kl_estimate(logps, ref_logps, *, estimator: str = "k1") -> Array:
  """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

  With ``log_ratio = log pi - log pi_ref`` (Schulman, "Approximating KL"):
    k1 = log_ratio                          unbiased, high variance, can be < 0
    k2 = log_ratio^2 / 2                    biased, low variance, >= 0
    k3 = exp(-log_ratio) - 1 + log_ratio    unbiased, >= 0
  """
  logps, ref_logps = as_f32(logps), as_f32(ref_logps)
  check_same_shape(logps=logps, ref_logps=ref_logps)
  log_ratio = logps - ref_logps
  if estimator == "k1":
    return log_ratio
  if estimator == "k2":
    return 0.5 * jnp.square(log_ratio)
  if estimator == "k3":
    return jnp.expm1(-log_ratio) + log_ratio
  raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}.")


def kl_penalized_rewards(scores, logps, ref_logps, mask, *, beta,
                         estimator: str = "k1") -> Array:
  """Per-token rewards ``-beta * kl_t``, plus the sequence score on the last token.

  Args:
    scores: [B] sequence-level reward (reward model or ground truth).
    logps, ref_logps, mask: [B, T] sampled-token log-probs and response mask.

  Returns:
    [B, T] rewards for GAE/REINFORCE (0 where mask is 0).
  """
  check_positive("beta", beta)
  mask = as_f32(mask)
  kl = kl_estimate(logps, ref_logps, estimator=estimator)
  check_same_shape(kl=kl, mask=mask)
  length = jnp.sum(mask, axis=-1).astype(jnp.int32)
  last = jax.nn.one_hot(jnp.maximum(length - 1, 0), mask.shape[-1]) * mask
  return (-beta * kl + as_f32(scores)[:, None] * last) * mask


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
  """Generalised advantage estimation over right-padded token sequences.

  ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``,
  with V = 0 after the last response token (the episode ends there).

  Args:
    rewards, values, mask: [B, T].

  Returns:
    (advantages [B, T], returns [B, T]) with ``returns = advantages + values``;
    both 0 where mask is 0.
  """
  rewards, values, mask = as_f32(rewards), as_f32(values), as_f32(mask)
  check_same_shape(rewards=rewards, values=values, mask=mask)
  rewards, values = rewards * mask, values * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], 1)
  deltas = rewards + gamma * next_values - values

  def step(carry, x):
    delta_t, mask_t = x
    adv = (delta_t + gamma * lam * carry) * mask_t
    return adv, adv

  _, adv_TxB = jax.lax.scan(
      step, jnp.zeros_like(rewards[:, 0]), (deltas.T, mask.T), reverse=True)
  advantages = adv_TxB.T
  return advantages, (advantages + values) * mask


def whiten(x, mask, *, shift_mean: bool = True) -> Array:
  """Normalises x to unit variance (and zero mean) over the masked entries."""
  x, mask = as_f32(x), as_f32(mask)
  mean = _masked_mean(x, mask)
  var = _masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  return (out if shift_mean else out + mean) * mask


def ppo_policy_loss(logps, old_logps, advantages, mask, *, clip_eps: float = 0.2):
  """PPO clipped surrogate (Schulman et al. 2017, Eq. 7), per token.

  ``loss_t = max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps))`` with
  ``rho_t = exp(logp_t - old_logp_t)``.

  Returns:
    (loss [B, T] (0 where masked), metrics dict of [B, T] arrays:
    ``clipped`` (1 where the clipped branch is active), ``ratio``, and
    ``approx_kl`` = k3 estimate of KL(old || new)).
  """
  check_positive("clip_eps", clip_eps)
  logps, old_logps, advantages, mask = map(as_f32, (logps, old_logps, advantages, mask))
  check_same_shape(logps=logps, old_logps=old_logps, advantages=advantages,
                    mask=mask)
  log_ratio = logps - old_logps
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = jnp.maximum(unclipped, clipped) * mask
  metrics = {
      "clipped": (clipped > unclipped).astype(jnp.float32) * mask,
      "ratio": ratio * mask,
      "approx_kl": (jnp.expm1(log_ratio) - log_ratio) * mask,
  }
  return loss, metrics


def value_loss(values, old_values, returns, mask, *, clip_eps: float = 0.2):
  """PPO clipped value loss ``0.5 max((V - R)^2, (V_clip - R)^2)`` per token.

  ``V_clip = old_V + clip(V - old_V, -eps, eps)``. Returns [B, T].
  """
  check_positive("clip_eps", clip_eps)
  values, old_values, returns, mask = map(as_f32, (values, old_values, returns, mask))
  check_same_shape(values=values, old_values=old_values, returns=returns,
                    mask=mask)
  v_clip = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  loss = 0.5 * jnp.maximum(jnp.square(values - returns),
                           jnp.square(v_clip - returns))
  return loss * mask


def rloo_advantages(rewards) -> Array:
  """REINFORCE leave-one-out (Ahmadian et al. 2024) advantages.

  Args:
    rewards: [B, K] sequence rewards of K >= 2 samples per prompt.

  Returns:
    [B, K] ``r_i - mean_{j != i} r_j``.
  """
  rewards = as_f32(rewards)
  if rewards.ndim != 2 or rewards.shape[1] < 2:
    raise ValueError(f"rewards must be [B, K] with K >= 2, got {rewards.shape}.")
  k = rewards.shape[1]
  total = jnp.sum(rewards, axis=1, keepdims=True)
  return rewards - (total - rewards) / (k - 1)


def reinforce_advantages(rewards, baseline=None) -> Array:
  """REINFORCE advantages ``r - b``: b = per-prompt mean over samples if None.

  Args:
    rewards: [B, K] (K samples per prompt) sequence rewards.
    baseline: optional [B, K] or [B, 1] or scalar baseline.
  """
  rewards = as_f32(rewards)
  if baseline is None:
    baseline = jnp.mean(rewards, axis=-1, keepdims=True)
  return rewards - as_f32(baseline)


def policy_gradient_loss(seq_logps, advantages) -> Array:
  """Score-function loss ``-stop_gradient(A) * log pi(y|x)`` per sample."""
  seq_logps, advantages = as_f32(seq_logps), as_f32(advantages)
  check_same_shape(seq_logps=seq_logps, advantages=advantages)
  return -jax.lax.stop_gradient(advantages) * seq_logps


__all__ = [
    "bt_reward_loss", "kl_estimate", "kl_penalized_rewards", "gae", "whiten",
    "ppo_policy_loss", "value_loss", "rloo_advantages", "reinforce_advantages",
    "policy_gradient_loss",
]
