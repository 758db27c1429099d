"""The methods compared in the figures, by name, with their hyper-parameters.

Preference losses come from the registry (cpo_jax.losses.LOSSES); two RLHF
methods are added:

  rlhf_pg     REINFORCE-leave-one-out on E_pi[r*] - beta KL with the true reward
  rlhf_pg_rm  the same with a Bradley–Terry reward model fitted on the same
              preference rows the preference losses see

Default margins: gamma = 0.5 for simpo, cpo, cpo_smooth, cpo_easy (the
official CPO config default), tau = 2, alpha = 1 (official defaults). The
closed-form optimum is not trained: see train.rlhf_closed_form.
"""

from __future__ import annotations

import jax

from cpo_jax.finite import train
from cpo_jax.finite.problems import PreferenceData, Problem

PREFERENCE_METHODS = ("dpo", "ipo", "simpo", "cpo", "cpo_smooth", "cpo_clip",
                      "cpo_easy")
RLHF_METHODS = ("rlhf_pg", "rlhf_pg_rm")
METHODS = PREFERENCE_METHODS + RLHF_METHODS


def default_hparams(method: str, beta, gamma=0.5) -> dict:
  """Keyword hyper-parameters of a registered loss at this beta (and gamma)."""
  table = {
      "dpo": dict(beta=beta),
      "ipo": dict(beta=beta),
      "hinge": dict(beta=beta),
      "simpo": dict(beta=beta, gamma=gamma),
      "cpo": dict(beta=beta, gamma=gamma),
      "cpo_smooth": dict(beta=beta, gamma=gamma, tau=2.0, alpha=1.0),
      "cpo_clip": dict(beta=beta),
      "cpo_easy": dict(beta=beta, gamma=gamma),
  }
  return table[method]


def run_method(method: str, problem: Problem, data: PreferenceData, key, *, beta,
               policy: str = "tabular", steps: int = 1000, lr: float = 0.05,
               log_every: int = 50, gamma=0.5, n_samples: int = 4,
               rm_model: str | None = None, schedule: str = "cosine"):
  """Trains ``method`` on ``data``; returns (logprobs [N, K], history).

  Traced arguments (vmap over them): problem, data, key, beta, gamma. The
  reward model of ``rlhf_pg_rm`` has the policy's parametrisation unless
  ``rm_model`` says otherwise.
  """
  if method in PREFERENCE_METHODS:
    return train.train_preference(
        problem, data, default_hparams(method, beta, gamma), loss=method,
        policy=policy, steps=steps, lr=lr, log_every=log_every, schedule=schedule)
  if method in RLHF_METHODS:
    if method == "rlhf_pg":
      rewards = problem.rewards
    else:
      rewards = train.fit_reward_model(problem, data, model=rm_model or policy)
    return train.train_rlhf_pg(
        problem, rewards, key, beta=beta, policy=policy, steps=steps, lr=lr,
        log_every=log_every, n_samples=n_samples, schedule=schedule)
  raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}.")


def run_batched(method: str, problems: Problem, data: PreferenceData, keys, **kw):
  """``run_method`` vmapped over a leading axis of problems, data and keys."""
  return jax.vmap(lambda p, d, k: run_method(method, p, d, k, **kw))(
      problems, data, keys)
