"""Softmax policies over K responses, initialised at the reference.

  tabular:  log pi_theta(y|x) = log_softmax_y(log pi_ref(y|x) + theta[x, y])
            (one free logit per (prompt, response): no sharing between prompts)
  feature:  log pi_w(y|x)     = log_softmax_y(log pi_ref(y|x) + phi(x, y) . w)
            (D shared parameters: what is learnt on one prompt moves others,
            as in a language model; the RLHF optimum pi_ref exp(r / beta) / Z
            is in the family because r = phi . w*)

Both start at pi_ref (theta = 0, w = 0). Policies are (init, logprobs) pairs
of pure functions selected by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpo_jax.finite.problems import Problem

POLICIES = ("tabular", "feature")


def init_params(kind: str, problem: Problem) -> jax.Array:
  """Zero parameters (the policy equals pi_ref): [N, K] or [D]."""
  if kind == "tabular":
    return jnp.zeros(problem.rewards.shape, jnp.float32)
  if kind == "feature":
    return jnp.zeros(problem.features.shape[-1:], jnp.float32)
  raise ValueError(f"policy must be one of {POLICIES}, got {kind!r}.")


def logprobs(kind: str, params, problem: Problem) -> jax.Array:
  """[N, K] normalised log pi(y|x)."""
  if kind == "tabular":
    scores = params
  elif kind == "feature":
    scores = problem.features @ params
  else:
    raise ValueError(f"policy must be one of {POLICIES}, got {kind!r}.")
  return jax.nn.log_softmax(problem.ref_logprobs + scores, axis=-1)
