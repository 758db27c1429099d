"""Finite-response (bandit) reproduction of arXiv 2605.20834's claims.

Problems with K responses per prompt, a known reward and a reference whose
bias is controlled (:mod:`.problems`); tabular and shared-parameter softmax
policies (:mod:`.policies`); jit-compiled optax training with any registered
loss, policy-gradient RLHF and the closed-form RLHF optimum (:mod:`.train`);
ground-truth metrics (:mod:`.metrics`). One response is one atom, so summed
and length-averaged log-probs coincide: every loss sees the same numbers.
"""

from cpo_jax.finite.metrics import evaluate, pair_deltas
from cpo_jax.finite.policies import init_params, logprobs
from cpo_jax.finite.problems import (
    PreferenceData, Problem, bt_population_labels, bt_sampled_labels,
    deterministic_labels, make_labels, make_problem, pair_values, reward_gap)
from cpo_jax.finite.train import (
    fit_reward_model, optimize, preference_loss, rlhf_closed_form,
    train_preference, train_rlhf_pg)

__all__ = [
    "PreferenceData", "Problem", "bt_population_labels", "bt_sampled_labels",
    "deterministic_labels", "evaluate", "fit_reward_model", "init_params",
    "logprobs", "make_labels", "make_problem", "optimize", "pair_deltas",
    "pair_values", "preference_loss", "reward_gap", "rlhf_closed_form",
    "train_preference", "train_rlhf_pg",
]
