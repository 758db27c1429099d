"""Jit-compiled optax training on finite-response problems.

  train_preference   any registered loss (cpo_jax.losses.LOSSES) by name,
                     full batch, weighted mean over the preference rows:
                     L(params) = sum_m w_m loss(logps_m, ref_logps_m) / sum_m w_m
  train_rlhf_pg      policy gradient (REINFORCE leave-one-out) on the
                     KL-regularised objective E_pi[r] - beta KL(pi || pi_ref)
                     with sampled responses and the KL-penalised reward
                     r(x, y) - beta (log pi(y|x) - log pi_ref(y|x))
  fit_reward_model   Bradley–Terry reward model (tabular or feature-based) on
                     the same preference rows, L2-regularised so it is finite
  rlhf_closed_form   log pi* = log_softmax(log pi_ref + r / beta)

All are pure functions of pytrees; the hyper-parameters that may vary in a
sweep (``hparams``: beta, gamma, ...; the problem; the labels; the key) are
traced, so callers ``jax.vmap`` over seeds, R, beta or gamma. The structural
settings (loss name, policy, steps, lr, log_every) are static. Each run returns
``(final logprobs [N, K], history)`` where history maps metric names of
:func:`cpo_jax.finite.metrics.evaluate` plus ``train_loss``, ``train_loss_biased`` (rows of biased prompts) and ``step`` to
arrays [steps // log_every + 1] (the first entry is the initial policy).

Optimiser: Adam with a cosine decay to 1% of ``lr`` (``schedule="cosine"``) or
a constant ``lr`` (``schedule="constant"``). Per-step randomness is
``jax.random.fold_in(key, step)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from cpo_jax import diagnostics as dg
from cpo_jax import losses as L
from cpo_jax import rlhf
from cpo_jax.finite import policies
from cpo_jax.finite.metrics import evaluate
from cpo_jax.finite.problems import PreferenceData, Problem


def _optimizer(lr, steps, schedule):
  if schedule == "cosine":
    return optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
  if schedule == "constant":
    return optax.adam(lr)
  raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}.")


def optimize(objective, params, key, *, steps, lr, log_every, schedule, report):
  """Runs Adam on ``objective(params, key) -> loss``; logs ``report(params)``.

  Returns (final params, history of ``report`` stacked over
  ``steps // log_every + 1`` evaluations, the first at step 0).
  """
  if steps % log_every:
    raise ValueError(f"steps ({steps}) must be a multiple of log_every ({log_every}).")
  opt = _optimizer(lr, steps, schedule)

  def step(carry, i):
    params, opt_state = carry
    grads = jax.grad(objective)(params, jax.random.fold_in(key, i))
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  def chunk(carry, c):
    carry, _ = jax.lax.scan(step, carry, c * log_every + jnp.arange(log_every))
    return carry, report(carry[0])

  first = report(params)
  (params, _), hist = jax.lax.scan(
      chunk, (params, opt.init(params)), jnp.arange(steps // log_every))
  hist = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, hist)
  hist["step"] = jnp.arange(steps // log_every + 1) * log_every
  return params, hist


def preference_loss(loss: str, logprobs_NxK, problem: Problem, data: PreferenceData,
                    hparams: dict, where=None) -> jax.Array:
  """Weighted mean of a registered loss over the preference rows (scalar).

  ``where`` [M] optionally restricts the mean to some rows (for reporting).
  """
  spec = L.get_loss(loss)
  logps = jnp.stack([logprobs_NxK[data.prompt, data.chosen],
                     logprobs_NxK[data.prompt, data.rejected]], axis=-1)
  ref = jnp.stack([problem.ref_logprobs[data.prompt, data.chosen],
                   problem.ref_logprobs[data.prompt, data.rejected]], axis=-1)
  per_row, _ = spec.fn(logps, ref, **hparams)
  w = data.weight if where is None else data.weight * where
  return jnp.sum(w * per_row) / jnp.maximum(jnp.sum(w), 1e-12)


@functools.partial(jax.jit, static_argnames=(
    "loss", "policy", "steps", "lr", "log_every", "schedule"))
def train_preference(problem: Problem, data: PreferenceData, hparams: dict, *,
                     loss: str, policy: str = "tabular", steps: int = 1000,
                     lr: float = 0.05, log_every: int = 50,
                     schedule: str = "cosine"):
  """Trains a policy with the registered loss ``loss`` (e.g. "dpo", "cpo")."""
  def logp(params):
    return policies.logprobs(policy, params, problem)

  def objective(params, key):
    del key
    return preference_loss(loss, logp(params), problem, data, hparams)

  def report(params):
    out = evaluate(logp(params), problem)
    out["train_loss"] = objective(params, None)
    out["train_loss_biased"] = preference_loss(
        loss, logp(params), problem, data, hparams, where=problem.biased[data.prompt])
    return out

  params, hist = optimize(
      objective, policies.init_params(policy, problem), jax.random.key(0),
      steps=steps, lr=lr, log_every=log_every, schedule=schedule, report=report)
  return logp(params), hist


@functools.partial(jax.jit, static_argnames=(
    "policy", "steps", "lr", "log_every", "n_samples", "schedule"))
def train_rlhf_pg(problem: Problem, rewards_NxK, key, *, beta, policy: str = "tabular",
                  steps: int = 1000, lr: float = 0.05, log_every: int = 50,
                  n_samples: int = 4, schedule: str = "cosine"):
  """REINFORCE-leave-one-out on E_pi[r] - beta KL with ``n_samples`` per prompt.

  ``rewards_NxK`` is the reward being optimised (the true reward or a fitted
  reward model); evaluation always uses the true reward. ``train_loss`` in the
  history is the negated exact objective under ``rewards_NxK``.
  """
  n = problem.rewards.shape[0]

  def logp(params):
    return policies.logprobs(policy, params, problem)

  def objective(params, k):
    lp = logp(params)
    ys = jax.random.categorical(k, jax.lax.stop_gradient(lp)[:, None, :],
                                shape=(n, n_samples))
    lp_s = jnp.take_along_axis(lp, ys, axis=1)
    ref_s = jnp.take_along_axis(problem.ref_logprobs, ys, axis=1)
    r_s = jnp.take_along_axis(rewards_NxK, ys, axis=1)
    score = r_s - beta * jax.lax.stop_gradient(lp_s - ref_s)
    return jnp.mean(rlhf.policy_gradient_loss(lp_s, rlhf.rloo_advantages(score)))

  def report(params):
    lp = logp(params)
    out = evaluate(lp, problem, beta)
    per_x = -dg.kl_regularized_objective(lp, problem.ref_logprobs, rewards_NxK, beta=beta)
    out["train_loss"] = jnp.mean(per_x)
    out["train_loss_biased"] = jnp.sum(per_x * problem.biased) / jnp.maximum(
        jnp.sum(problem.biased), 1.0)
    return out

  params, hist = optimize(
      objective, policies.init_params(policy, problem), key, steps=steps, lr=lr,
      log_every=log_every, schedule=schedule, report=report)
  return logp(params), hist


@functools.partial(jax.jit, static_argnames=("model", "steps", "lr"))
def fit_reward_model(problem: Problem, data: PreferenceData, *, model: str = "feature",
                     l2=1e-3, steps: int = 500, lr: float = 0.1):
  """Bradley–Terry reward model on the preference rows -> rewards [N, K].

  Minimises ``sum_m w_m softplus(-(r(y_c) - r(y_r))) / sum_m w_m + l2 |params|^2``
  (cpo_jax.rlhf.bt_reward_loss); ``model`` is "tabular" ([N, K] free scores)
  or "feature" (r = phi . v). Only reward differences within a prompt matter
  for RLHF, so the arbitrary per-prompt offset is harmless.
  """
  def scores(params):
    return params if model == "tabular" else problem.features @ params

  def objective(params, key):
    del key
    r = scores(params)
    pair_r = jnp.stack([r[data.prompt, data.chosen], r[data.prompt, data.rejected]],
                       axis=-1)
    per_row, _ = rlhf.bt_reward_loss(pair_r)
    fit = jnp.sum(data.weight * per_row) / jnp.maximum(jnp.sum(data.weight), 1e-12)
    return fit + l2 * jnp.sum(jnp.square(params)) / params.size

  params0 = policies.init_params(model, problem)
  params, _ = optimize(objective, params0, jax.random.key(0), steps=steps, lr=lr,
                       log_every=steps, schedule="cosine", report=lambda p: {})
  return scores(params)


def rlhf_closed_form(problem: Problem, rewards_NxK=None, *, beta) -> jax.Array:
  """[N, K] log pi* of the KL-regularised RLHF objective (true reward by default)."""
  rewards = problem.rewards if rewards_NxK is None else rewards_NxK
  return dg.rlhf_optimal_logprobs(problem.ref_logprobs, rewards, beta=beta)
