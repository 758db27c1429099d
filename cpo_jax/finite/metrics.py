"""Ground-truth evaluation of a finite-response policy.

Every metric is measured on the canonical pairs (y_w = the response with the
higher true reward), whatever labels the policy was trained on:

  delta            log pi(y_w|x) - log pi(y_l|x)             (summed = averaged:
                                                              one atom per response)
  frac_in_U        mean[delta_ref < delta < 0]                (Def. 3.3)
  accuracy_abs     mean[delta > 0]
  accuracy_rel     mean[delta > delta_ref]                    (what TRL logs)
  expected_reward  mean_x sum_y pi(y|x) r(x, y)
  kl               mean_x KL(pi(.|x) || pi_ref(.|x))
  objective        mean_x E_pi[r] - beta KL                   (RLHF objective)

``*_viol`` restricts to pairs violating Assumption 3.1 (delta_ref <= -dr/beta),
``*_ok`` to the others; ``*_biased`` restricts prompt averages to biased prompts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpo_jax import diagnostics as dg
from cpo_jax.finite.problems import Problem, pair_values, reward_gap


def pair_deltas(logprobs_NxK, problem: Problem) -> jax.Array:
  """[P] policy margin on the canonical pairs."""
  return dg.pair_delta(pair_values(logprobs_NxK, problem))


def evaluate(logprobs_NxK, problem: Problem, beta=None) -> dict:
  """Scalar ground-truth metrics (float32), see the module docstring."""
  beta = problem.beta if beta is None else beta
  delta = pair_deltas(logprobs_NxK, problem)
  delta_ref = pair_deltas(problem.ref_logprobs, problem)
  dr = reward_gap(problem)
  viol = dg.violates_assumption(delta_ref, dr, beta=beta).astype(jnp.float32)
  ok = 1.0 - viol
  p = jnp.exp(logprobs_NxK)
  reward_x = jnp.sum(p * problem.rewards, axis=-1)
  kl_x = jnp.sum(p * (logprobs_NxK - problem.ref_logprobs), axis=-1)
  w_b = problem.biased
  return {
      "frac_in_U": dg.frac_in_U(delta, delta_ref),
      "frac_in_U_viol": dg.frac_in_U(delta, delta_ref, where=viol),
      "frac_in_U_ok": dg.frac_in_U(delta, delta_ref, where=ok),
      "accuracy_abs": dg.absolute_accuracy(delta),
      "accuracy_abs_viol": dg.absolute_accuracy(delta, where=viol),
      "accuracy_abs_ok": dg.absolute_accuracy(delta, where=ok),
      "accuracy_rel": dg.relative_accuracy(delta, delta_ref),
      "accuracy_rel_viol": dg.relative_accuracy(delta, delta_ref, where=viol),
      "frac_violating": jnp.mean(viol),
      "expected_reward": jnp.mean(reward_x),
      "expected_reward_biased": jnp.sum(reward_x * w_b) / jnp.maximum(jnp.sum(w_b), 1.0),
      "kl": jnp.mean(kl_x),
      "objective": jnp.mean(reward_x - beta * kl_x),
  }
