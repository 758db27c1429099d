"""Finite-response problems, policies and training: small settings, golden facts.

Tolerances are stated per test. All training runs share N = 64 prompts,
2000 steps and log_every 100 so jit compilations are reused across tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cpo_jax import diagnostics as dg
from cpo_jax import finite as F
from cpo_jax.finite import methods as M

N, STEPS, LOG = 64, 2000, 100
BETA = 1.0


@pytest.fixture(scope="module")
def problem():
  return F.make_problem(jax.random.key(0), n_prompts=N, bias_frac=0.3, beta=BETA)


def _train(problem, data, loss, policy="tabular", **hp):
  return F.train_preference(problem, data, M.default_hparams(loss, BETA, **hp), loss=loss,
                            policy=policy, steps=STEPS, lr=0.05, log_every=LOG)


def _delta_star(problem, beta=BETA):
  return dg.delta_star(F.pair_deltas(problem.ref_logprobs, problem), F.reward_gap(problem),
                       beta=beta)


@settings(max_examples=6, deadline=None)
@given(r=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]), beta=st.sampled_from([0.1, 1.0, 5.0]),
       k=st.sampled_from([2, 4]), seed=st.integers(0, 3))
def test_bias_fraction_is_exact(r, beta, k, seed):
  """Violating pairs are exactly the pairs of the floor(R N) biased prompts."""
  pb = F.make_problem(jax.random.key(seed), n_prompts=40, n_responses=k, bias_frac=r,
                      beta=beta, pairs="all")
  dref = F.pair_deltas(pb.ref_logprobs, pb)
  viol = dg.violates_assumption(dref, F.reward_gap(pb), beta=beta)
  np.testing.assert_array_equal(np.asarray(viol), np.asarray(pb.biased[pb.prompt] > 0))
  assert int(jnp.sum(pb.biased)) == int(np.floor(r * 40 + 1e-6))
  assert bool(jnp.all(F.reward_gap(pb) >= 0))
  np.testing.assert_allclose(jnp.sum(jnp.exp(pb.ref_logprobs), -1), 1.0, rtol=1e-5)


def test_labels(problem):
  p = jax.nn.sigmoid(F.reward_gap(problem))
  pop = F.bt_population_labels(problem)
  np.testing.assert_allclose(pop.weight, jnp.concatenate([p, 1 - p]), rtol=1e-6)
  one = F.bt_sampled_labels(jax.random.key(1), problem, n_labels=1)
  assert set(np.unique(np.asarray(one.weight)).tolist()) <= {0.0, 1.0}
  many = F.bt_sampled_labels(jax.random.key(1), problem, n_labels=4000)
  np.testing.assert_allclose(many.weight[:N], p, atol=0.05)   # binomial, 4000 draws
  det = F.deterministic_labels(problem)
  np.testing.assert_array_equal(det.chosen, problem.better)
  with pytest.raises(ValueError):
    F.make_labels("nope", problem)


def test_dpo_bt_population_converges_to_rlhf_optimum(problem):
  """DPO on BT population labels -> delta_ref + dr/beta; tolerance 1e-2 (abs)."""
  lp, hist = _train(problem, F.bt_population_labels(problem), "dpo")
  delta = F.pair_deltas(lp, problem)
  np.testing.assert_allclose(delta, _delta_star(problem), atol=1e-2)
  np.testing.assert_allclose(lp, F.rlhf_closed_form(problem, beta=BETA), atol=1e-2)
  # Every violating pair converges into U: the DPO minimum prefers y_l there.
  assert float(hist["frac_in_U_viol"][-1]) == 1.0
  assert float(hist["frac_in_U"][-1]) == pytest.approx(float(hist["frac_violating"][-1]))
  assert float(hist["accuracy_rel_viol"][-1]) == 1.0       # TRL-style accuracy: 100%
  assert float(hist["train_loss"][-1]) < float(hist["train_loss"][0])


def test_dpo_k3_all_pairs_recovers_full_rlhf_distribution():
  """With K = 3 and all pairs, the DPO population minimiser is pi* (atol 1e-2)."""
  pb = F.make_problem(jax.random.key(3), n_prompts=N, n_responses=3, bias_frac=0.3,
                      beta=BETA, pairs="all")
  lp, _ = _train(pb, F.bt_population_labels(pb), "dpo")
  np.testing.assert_allclose(lp, F.rlhf_closed_form(pb, beta=BETA), atol=1e-2)


def test_feature_policy_dpo_converges_to_delta_star(problem):
  """Shared parameters, realisable reward: same optimum (atol 5e-2)."""
  lp, _ = _train(problem, F.bt_population_labels(problem), "dpo", policy="feature")
  np.testing.assert_allclose(F.pair_deltas(lp, problem), _delta_star(problem), atol=5e-2)


def test_dpo_vmapped_over_beta():
  """vmap over beta: each beta reaches its own delta* (atol 2e-2)."""
  betas = jnp.asarray([0.5, 1.0, 2.0])

  def one(b):
    pb = F.make_problem(jax.random.key(4), n_prompts=N, bias_frac=0.3, beta=b)
    lp, _ = F.train_preference(pb, F.bt_population_labels(pb), {"beta": b}, loss="dpo",
                               steps=STEPS, lr=0.05, log_every=LOG)
    return F.pair_deltas(lp, pb) - _delta_star(pb, b)

  np.testing.assert_allclose(jax.vmap(one)(betas), 0.0, atol=2e-2)


@pytest.mark.parametrize("loss,gamma", [("cpo", 0.5), ("cpo_smooth", 0.5)])
def test_cpo_with_sufficient_gamma_leaves_no_pair_in_U(problem, loss, gamma):
  lp, hist = _train(problem, F.bt_population_labels(problem), loss, gamma=gamma)
  assert float(hist["frac_violating"][-1]) >= 0.2
  assert float(hist["frac_in_U"][-1]) <= 0.02
  assert float(hist["accuracy_abs_viol"][-1]) >= 0.98


def test_cpo_gamma_threshold(problem):
  """Eq. 17 CPO: tiny gamma behaves like DPO (violating pairs stay in U), large fixes all."""
  data = F.bt_population_labels(problem)
  run = lambda g: _train(problem, data, "cpo", gamma=g)[1]["accuracy_abs_viol"][-1]
  fixed = jax.vmap(run)(jnp.asarray([1e-3, 3.0]))
  assert float(fixed[0]) == 0.0 and float(fixed[1]) == 1.0


def test_one_sided_dpo_has_no_finite_minimiser(problem):
  """Deterministic labels: delta keeps growing and loss keeps falling (constant lr)."""
  data = F.deterministic_labels(problem)
  _, hist = F.train_preference(problem, data, {"beta": BETA}, loss="dpo", steps=STEPS,
                               lr=0.05, log_every=LOG, schedule="constant")
  loss = np.asarray(hist["train_loss"])
  assert np.all(np.diff(loss) < 0)
  assert float(hist["frac_in_U"][-1]) < float(jnp.mean(problem.biased))


def test_rlhf_pg_and_reward_model(problem):
  """PG with the true reward -> pi* (median |err| < 0.05); BT RM recovers dr (atol 1e-2)."""
  lp, hist = F.train_rlhf_pg(problem, problem.rewards, jax.random.key(2), beta=BETA,
                             steps=STEPS, lr=0.05, log_every=LOG)
  err = jnp.abs(F.pair_deltas(lp, problem) - _delta_star(problem))
  assert float(jnp.median(err)) < 0.05
  assert float(hist["objective"][-1]) > float(hist["objective"][0])
  r_hat = F.fit_reward_model(problem, F.bt_population_labels(problem), model="tabular",
                             l2=0.0, steps=STEPS, lr=0.1)
  gap = F.pair_deltas(r_hat, problem)             # r_hat(y_w) - r_hat(y_l)
  np.testing.assert_allclose(gap, F.reward_gap(problem), atol=1e-2)


def test_unknown_method_and_policy(problem):
  data = F.deterministic_labels(problem)
  with pytest.raises(ValueError):
    M.run_method("contrastive_cpo", problem, data, jax.random.key(0), beta=1.0)
  with pytest.raises(ValueError):
    F.init_params("mlp", problem)
