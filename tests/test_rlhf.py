"""RLHF pieces: golden values on hand-computed rollouts, masks, gradients, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cpo_jax import rlhf

LN2 = math.log(2.0)


def test_bt_reward_loss_golden():
  loss, m = rlhf.bt_reward_loss(jnp.array([[1.0, 0.0], [0.0, 2.0]]))
  np.testing.assert_allclose(loss, [0.31326168751822286, 2.1269280110429727], rtol=1e-6)
  np.testing.assert_array_equal(m["accuracy"], [1.0, 0.0])
  np.testing.assert_array_equal(m["reward_gap"], [1.0, -2.0])
  loss, _ = rlhf.bt_reward_loss(jnp.array([[1.0, 0.0], [0.0, 2.0]]),
                                margin=jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(loss, [LN2, 3.048587351573742], rtol=1e-6)


def test_kl_estimators_golden():
  logp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
  np.testing.assert_allclose(rlhf.kl_estimate(logp, ref, estimator="k1"), [LN2], rtol=1e-6)
  np.testing.assert_allclose(rlhf.kl_estimate(logp, ref, estimator="k2"),
                             [0.2402265069591007], rtol=1e-6)
  np.testing.assert_allclose(rlhf.kl_estimate(logp, ref, estimator="k3"),
                             [0.1931471805599453], rtol=1e-6)
  with pytest.raises(ValueError, match="k1"):
    rlhf.kl_estimate(logp, ref, estimator="k4")


def test_kl_estimators_are_unbiased_where_claimed():
  # Exact expectations over a categorical pi: E[k1] = E[k3] = KL(pi || ref).
  pi = jnp.array([0.7, 0.2, 0.1])
  ref = jnp.array([0.2, 0.3, 0.5])
  kl = float(jnp.sum(pi * jnp.log(pi / ref)))
  for est in ("k1", "k3"):
    e = float(jnp.sum(pi * rlhf.kl_estimate(jnp.log(pi), jnp.log(ref), estimator=est)))
    assert e == pytest.approx(kl, rel=1e-5)
  assert np.all(rlhf.kl_estimate(jnp.log(pi), jnp.log(ref), estimator="k3") >= 0)


def test_kl_penalized_rewards_puts_score_on_last_token():
  logp = jnp.log(jnp.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
  ref = jnp.log(jnp.array([[0.25, 0.5, 0.5], [0.5, 0.5, 0.25]]))
  mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  r = rlhf.kl_penalized_rewards(jnp.array([3.0, 5.0]), logp, ref, mask, beta=0.5)
  np.testing.assert_allclose(r, [[-0.5 * LN2, 3.0, 0.0], [0.0, 0.0, 5.0 - 0.5 * LN2]],
                             rtol=1e-6, atol=1e-7)


def test_gae_golden():
  rewards = jnp.array([[0.0, 0.0, 1.0]])
  values = jnp.full((1, 3), 0.5)
  mask = jnp.ones((1, 3))
  adv, ret = rlhf.gae(rewards, values, mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(adv, [[0.5, 0.5, 0.5]])
  np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0]])
  adv, _ = rlhf.gae(rewards, values, mask, gamma=1.0, lam=0.5)
  np.testing.assert_allclose(adv, [[0.125, 0.25, 0.5]])
  # Right padding: the value after the last response token is 0, padding is 0.
  adv, ret = rlhf.gae(jnp.array([[0.0, 1.0, 0.0]]), jnp.array([[0.5, 0.5, 9.0]]),
                      jnp.array([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
  np.testing.assert_allclose(adv, [[0.25, 0.5, 0.0]])
  np.testing.assert_allclose(ret, [[0.75, 1.0, 0.0]])
  # gamma discounts: delta_0 = 0 + 0.9 * 0.5 - 0.5.
  adv, _ = rlhf.gae(jnp.array([[0.0, 1.0]]), jnp.full((1, 2), 0.5), jnp.ones((1, 2)),
                    gamma=0.9, lam=1.0)
  np.testing.assert_allclose(adv, [[-0.05 + 0.9 * 0.5, 0.5]], rtol=1e-6)


def test_ppo_policy_loss_golden():
  old = jnp.log(jnp.array([[0.2, 0.2, 0.2, 0.2]]))
  new = jnp.log(jnp.array([[0.3, 0.3, 0.1, 0.1]]))  # ratios 1.5, 1.5, 0.5, 0.5
  adv = jnp.array([[1.0, -1.0, 1.0, -1.0]])
  loss, m = rlhf.ppo_policy_loss(new, old, adv, jnp.ones((1, 4)), clip_eps=0.2)
  np.testing.assert_allclose(loss, [[-1.2, 1.5, -0.5, 0.8]], rtol=1e-6)
  np.testing.assert_array_equal(m["clipped"], [[1.0, 0.0, 0.0, 1.0]])
  np.testing.assert_allclose(m["ratio"], [[1.5, 1.5, 0.5, 0.5]], rtol=1e-6)
  loss, _ = rlhf.ppo_policy_loss(new, old, adv, jnp.array([[1, 0, 1, 0]]), clip_eps=0.2)
  np.testing.assert_allclose(loss, [[-1.2, 0.0, -0.5, 0.0]], rtol=1e-6)


def test_ppo_gradient_is_zero_on_clipped_tokens():
  old = jnp.log(jnp.array([[0.2, 0.2]]))
  new = jnp.log(jnp.array([[0.3, 0.1]]))
  adv = jnp.array([[1.0, 1.0]])  # token 0 clipped (ratio 1.5 > 1.2), token 1 not
  g = jax.grad(lambda x: jnp.sum(rlhf.ppo_policy_loss(x, old, adv, jnp.ones((1, 2)))[0]))(new)
  np.testing.assert_allclose(g, [[0.0, -0.5]], rtol=1e-6)


def test_value_loss_golden():
  loss = rlhf.value_loss(jnp.array([[2.0, 0.5]]), jnp.array([[1.0, 1.0]]),
                         jnp.array([[0.0, 2.0]]), jnp.ones((1, 2)), clip_eps=0.2)
  np.testing.assert_allclose(loss, [[2.0, 1.125]], rtol=1e-6)


def test_rloo_and_reinforce_advantages():
  np.testing.assert_allclose(rlhf.rloo_advantages(jnp.array([[1.0, 2.0, 3.0]])),
                             [[-1.5, 0.0, 1.5]])
  np.testing.assert_allclose(rlhf.reinforce_advantages(jnp.array([[1.0, 2.0, 3.0]])),
                             [[-1.0, 0.0, 1.0]])
  np.testing.assert_allclose(
      rlhf.reinforce_advantages(jnp.array([[1.0, 2.0]]), baseline=0.5), [[0.5, 1.5]])
  with pytest.raises(ValueError, match="K >= 2"):
    rlhf.rloo_advantages(jnp.array([[1.0], [2.0]]))


def test_policy_gradient_loss_stops_gradient_through_advantages():
  lp, adv = jnp.array([-1.0, -2.0]), jnp.array([2.0, -1.0])
  g_lp, g_adv = jax.grad(lambda a, b: jnp.sum(rlhf.policy_gradient_loss(a, b)),
                         argnums=(0, 1))(lp, adv)
  np.testing.assert_allclose(g_lp, [-2.0, 1.0])
  np.testing.assert_array_equal(g_adv, [0.0, 0.0])


def test_whiten_masked_statistics():
  x = jnp.array([[1.0, 3.0, 100.0]])
  out = rlhf.whiten(x, jnp.array([[1.0, 1.0, 0.0]]))
  np.testing.assert_allclose(out, [[-1.0, 1.0, 0.0]], rtol=1e-6)


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(1)
  old = jnp.asarray(np.log(rng.uniform(0.1, 0.9, (2, 3))))
  adv = jnp.asarray(rng.normal(size=(2, 3)))
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  with jax.enable_x64(True):
    new = jnp.asarray(old, jnp.float64) + 0.05
    check_grads(lambda x: jnp.sum(rlhf.ppo_policy_loss(x, old, adv, mask)[0]),
                (new,), order=1, modes=["rev"], eps=1e-6)
    check_grads(lambda x: jnp.sum(rlhf.kl_estimate(x, old, estimator="k3")),
                (new,), order=1, modes=["rev"], eps=1e-6)
    check_grads(lambda r: jnp.sum(rlhf.bt_reward_loss(r)[0]),
                (jnp.asarray(adv[:, :2], jnp.float64),), order=1, modes=["rev"], eps=1e-6)


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_gae_jit(self):
    rng = np.random.default_rng(2)
    r, v = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    mask = (np.arange(6)[None, :] < np.array([[6], [3], [1], [4]])).astype(np.float32)
    adv, ret = self.variant(lambda a, b, c: rlhf.gae(a, b, c, gamma=0.99, lam=0.9))(r, v, mask)
    adv0, ret0 = rlhf.gae(r, v, mask, gamma=0.99, lam=0.9)
    np.testing.assert_allclose(adv, adv0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, ret0, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_shape_errors():
  with pytest.raises(ValueError, match="shapes must match"):
    rlhf.gae(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"\[B, 2\]"):
    rlhf.bt_reward_loss(jnp.zeros((3,)))
  with pytest.raises(ValueError, match="beta must be > 0"):
    rlhf.kl_penalized_rewards(jnp.zeros(1), jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                              jnp.ones((1, 2)), beta=0.0)
