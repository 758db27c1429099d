"""Finite-response preference problems with a known reward and a biased reference.

A problem has N prompts, each with K >= 2 responses (a "response" is one atom,
so summed and length-averaged log-probs coincide here). Arrays carry their
shapes in their names where it helps: ``*_NxK``, ``*_NxKxD``, ``*_P``.

  true reward      r(x, y) = phi(x, y) . w*                    (realisable by
                   the feature policy; std ~ ``reward_scale``)
  reference        log pi_ref(y|x) = log_softmax_y(a_x r(x, y))
  biased prompts   a fraction R of prompts has a_x = -(1 + m_x) / beta with
                   m_x ~ U(0.25, 1.5), so on every pair of that prompt
                   delta_ref = a_x dr <= -1.25 dr / beta < -dr / beta:
                   Assumption 3.1 of arXiv 2605.20834 fails (delta* < 0).
  other prompts    a_x ~ U(-0.5, 1) / beta: delta_ref >= -0.5 dr / beta, so the
                   assumption holds (some references still prefer y_l mildly).

Pairs are stored canonically, ``better`` has the higher true reward (dr >= 0).
Preference data (:class:`PreferenceData`) turn pairs into ordered rows
(chosen, rejected) with weights: deterministic labels (always the better one),
Bradley–Terry-sampled labels (``n_labels`` draws per pair of
``P(better wins) = sigmoid(dr)``, so both orderings occur), or their
population limit (weights sigmoid(dr) and 1 - sigmoid(dr)).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Problem(NamedTuple):
  """A finite-response problem (a pytree: stack problems and vmap over them)."""

  rewards: Array        # [N, K] true reward r(x, y)
  ref_logprobs: Array   # [N, K] normalised log pi_ref(y|x)
  features: Array       # [N, K, D] phi(x, y) for the shared-parameter policy
  prompt: Array         # [P] int32 prompt of each canonical pair
  better: Array         # [P] int32 response with the higher true reward
  worse: Array          # [P] int32 the other response
  biased: Array         # [N] float32 1 on prompts built to violate Assumption 3.1
  beta: Array           # [] the KL coefficient the bias was built for


class PreferenceData(NamedTuple):
  """Ordered preference rows with weights (counts or probabilities)."""

  prompt: Array    # [M] int32
  chosen: Array    # [M] int32
  rejected: Array  # [M] int32
  weight: Array    # [M] float32 (0 rows are allowed and ignored)


@functools.partial(jax.jit, static_argnames=(
    "n_prompts", "n_responses", "n_features", "reward_scale", "pairs"))
def make_problem(key, *, n_prompts: int, n_responses: int = 2, n_features: int = 8,
                 bias_frac=0.3, beta=1.0, reward_scale: float = 1.0,
                 pairs: str = "one") -> Problem:
  """Builds a problem; ``bias_frac`` (R) and ``beta`` may be traced (vmap them).

  Args:
    key: PRNG key.
    n_prompts, n_responses, n_features: N, K, D.
    bias_frac: R, the fraction of prompts (rounded down) whose reference
      prefers the worse response by more than dr / beta on every pair.
    beta: KL coefficient the bias is defined for.
    reward_scale: standard deviation of r(x, y).
    pairs: "one" = one random pair of distinct responses per prompt (P = N),
      "all" = all K (K - 1) / 2 pairs per prompt.
  """
  n, k, d = n_prompts, n_responses, n_features
  if k < 2:
    raise ValueError(f"n_responses must be >= 2, got {k}.")
  k_phi, k_w, k_perm, k_m, k_a, k_pair = jax.random.split(key, 6)
  features = jax.random.normal(k_phi, (n, k, d))
  w_star = jax.random.normal(k_w, (d,)) * reward_scale / jnp.sqrt(d)
  rewards = features @ w_star
  rank = jnp.argsort(jax.random.permutation(k_perm, n))
  biased = (rank < jnp.floor(bias_frac * n + 1e-6)).astype(jnp.float32)
  slope_biased = -(1.0 + jax.random.uniform(k_m, (n,), minval=0.25, maxval=1.5))
  slope_other = jax.random.uniform(k_a, (n,), minval=-0.5, maxval=1.0)
  slope = jnp.where(biased > 0, slope_biased, slope_other) / beta
  ref_logprobs = jax.nn.log_softmax(slope[:, None] * rewards, axis=-1)
  if pairs == "one":
    idx = jax.vmap(lambda kk: jax.random.choice(kk, k, (2,), replace=False))(
        jax.random.split(k_pair, n))
    prompt, first, second = jnp.arange(n), idx[:, 0], idx[:, 1]
  elif pairs == "all":
    a, b = jnp.triu_indices(k, 1)
    prompt = jnp.repeat(jnp.arange(n), a.shape[0])
    first, second = jnp.tile(a, n), jnp.tile(b, n)
  else:
    raise ValueError(f"pairs must be 'one' or 'all', got {pairs!r}.")
  r1, r2 = rewards[prompt, first], rewards[prompt, second]
  better = jnp.where(r1 >= r2, first, second).astype(jnp.int32)
  worse = jnp.where(r1 >= r2, second, first).astype(jnp.int32)
  return Problem(rewards, ref_logprobs, features, prompt.astype(jnp.int32),
                 better, worse, biased, jnp.asarray(beta, jnp.float32))


def pair_values(values_NxK, problem: Problem) -> Array:
  """[P, 2] values at (better, worse) of each canonical pair."""
  return jnp.stack([values_NxK[problem.prompt, problem.better],
                    values_NxK[problem.prompt, problem.worse]], axis=-1)


def reward_gap(problem: Problem) -> Array:
  """dr = r(y_better) - r(y_worse) >= 0 per canonical pair [P]."""
  r = pair_values(problem.rewards, problem)
  return r[:, 0] - r[:, 1]


def deterministic_labels(problem: Problem) -> PreferenceData:
  """One row per pair, the better response always chosen (weight 1)."""
  ones = jnp.ones(problem.prompt.shape, jnp.float32)
  return PreferenceData(problem.prompt, problem.better, problem.worse, ones)


def _both_orderings(problem: Problem, w_forward) -> PreferenceData:
  return PreferenceData(
      jnp.concatenate([problem.prompt, problem.prompt]),
      jnp.concatenate([problem.better, problem.worse]),
      jnp.concatenate([problem.worse, problem.better]),
      jnp.concatenate([w_forward, 1.0 - w_forward]).astype(jnp.float32))


def bt_population_labels(problem: Problem) -> PreferenceData:
  """n_labels -> inf limit of BT sampling: weights sigmoid(dr), sigmoid(-dr)."""
  return _both_orderings(problem, jax.nn.sigmoid(reward_gap(problem)))


def bt_sampled_labels(key, problem: Problem, *, n_labels: int = 1) -> PreferenceData:
  """``n_labels`` Bradley–Terry draws per pair, as per-ordering fractions.

  Row weights are the empirical frequencies of (better > worse) and
  (worse > better) (each pair's weights sum to 1; with n_labels = 1 one of
  them is 0, like a real dataset with one label per pair).
  """
  p = jax.nn.sigmoid(reward_gap(problem))
  wins = jax.random.bernoulli(key, p[:, None], (p.shape[0], n_labels))
  return _both_orderings(problem, jnp.mean(wins.astype(jnp.float32), axis=1))


def make_labels(kind: str, problem: Problem, key=None, *, n_labels: int = 1):
  """Dispatches on ``kind`` in {"deterministic", "bt_population", "bt_sampled"}."""
  if kind == "deterministic":
    return deterministic_labels(problem)
  if kind == "bt_population":
    return bt_population_labels(problem)
  if kind == "bt_sampled":
    return bt_sampled_labels(key, problem, n_labels=n_labels)
  raise ValueError(f"unknown label kind {kind!r}.")
