"""Preference losses: golden values, limits, gradients, jit, properties, errors."""

import functools
import math

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cpo_jax import losses

# delta = [1, -1, 0], delta_ref = [0, 1, 0]; with beta = 1, z = [1, -2, 0].
LOGPS = jnp.array([[-1.0, -2.0], [-2.0, -1.0], [-3.0, -3.0]])
REF = jnp.array([[-1.0, -1.0], [-1.0, -2.0], [-2.0, -2.0]])
SP = {  # softplus(x) = log(1 + e^x), by hand.
    -2: 0.12692801104297263, -1: 0.31326168751822286, -0.5: 0.4740769841801067,
    0: 0.6931471805599453, 0.5: 0.9740769841801067, 1: 1.3132616875182228,
    1.25: 1.501929081345373, 1.5: 1.7014132779827524, 2: 2.1269280110429727,
}

GOLDEN = {
    ("dpo", ()): [SP[-1], SP[2], SP[0]],
    ("dpo", (("label_smoothing", 0.25),)):
        [0.75 * SP[-1] + 0.25 * SP[1], 0.75 * SP[2] + 0.25 * SP[-2], SP[0]],
    ("dpo", (("label_smoothing", 0.25), ("smoothing", "robust"))):
        [SP[-1] - 0.5, SP[2] + 1.0, SP[0]],
    ("ipo", ()): [0.25, 6.25, 0.25],
    ("hinge", ()): [0.0, 3.0, 1.0],
    ("simpo", (("gamma", 0.5),)): [SP[-0.5], SP[1.5], SP[0.5]],
    ("cpo_smooth", (("gamma", 0.5), ("tau", 2.0), ("alpha", 1.0))):
        [0.5361285627716215, 2.2661256934664866, 1.0744168200381248],
    ("cpo_easy", (("gamma", 0.5),)): [SP[-2], SP[1.25], SP[-0.5]],
    ("cpo_clip", ()): [SP[-1], SP[2], SP[0]],
}


@pytest.mark.parametrize("name,hparams", list(GOLDEN))
def test_golden_values(name, hparams):
  loss, metrics = losses.get_loss(name).fn(LOGPS, REF, beta=1.0, **dict(hparams))
  np.testing.assert_allclose(loss, GOLDEN[name, hparams], rtol=1e-6, atol=1e-6)
  assert loss.dtype == jnp.float32 and loss.shape == (3,)
  np.testing.assert_array_equal(metrics["delta"], [1.0, -1.0, 0.0])


def test_cpo_eq17_margin_golden():
  # pi_ref = (0.5, 0.25): Omega = gamma (2 + 4) = 1 for gamma = 1/6; z = 0.
  ref = jnp.log(jnp.array([[0.5, 0.25]]))
  loss, metrics = losses.cpo(ref, ref, beta=1.0, gamma=1.0 / 6.0)
  np.testing.assert_allclose(loss, [SP[1]], rtol=1e-6)
  np.testing.assert_allclose(metrics["loss_margin"], [1.0], rtol=1e-6)
  np.testing.assert_allclose(
      losses.cpo_log_margin(ref, gamma=1.0 / 6.0), [0.0], atol=1e-6)


def test_metrics_golden():
  _, m = losses.dpo(LOGPS, REF, beta=0.5)
  np.testing.assert_array_equal(m["delta_ref"], [0.0, 1.0, 0.0])
  np.testing.assert_allclose(m["rewards_chosen"], [0.0, -0.5, -0.5])
  np.testing.assert_allclose(m["rewards_rejected"], [-0.5, 0.5, -0.5])
  np.testing.assert_allclose(m["margin"], [0.5, -1.0, 0.0])
  np.testing.assert_array_equal(m["accuracy_relative"], [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(m["accuracy_absolute"], [1.0, 0.0, 0.0])
  # Row 0 of the next batch is in U: delta_ref = -2 < delta = -1 < 0.
  _, m = losses.dpo(jnp.array([[-2.0, -1.0], [-1.0, -2.0]]),
                    jnp.array([[-3.0, -1.0], [-3.0, -1.0]]), beta=1.0)
  np.testing.assert_array_equal(m["in_U"], [1.0, 0.0])
  np.testing.assert_array_equal(m["accuracy_relative"], [1.0, 1.0])
  np.testing.assert_array_equal(m["accuracy_absolute"], [0.0, 1.0])


def test_simpo_without_reference_has_no_reference_metrics():
  loss, m = losses.simpo(LOGPS, beta=2.0, gamma=0.0)
  np.testing.assert_allclose(loss, [SP[-2], SP[2], SP[0]], rtol=1e-6)
  assert "in_U" not in m and "delta_ref" not in m
  np.testing.assert_allclose(m["margin"], [2.0, -2.0, 0.0])


def test_sequence_logps_sum_and_mean():
  tok = jnp.array([[-1.0, -2.0, -jnp.inf], [-4.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(losses.sequence_logps(tok, mask, reduction="sum"), [-3, -4])
  np.testing.assert_allclose(losses.sequence_logps(tok, mask, reduction="mean"), [-1.5, -4])
  empty = losses.sequence_logps(tok, jnp.zeros_like(mask), reduction="mean")
  np.testing.assert_array_equal(empty, [0.0, 0.0])
  with pytest.raises(ValueError, match="reduction"):
    losses.sequence_logps(tok, mask, reduction="max")


# ----------------------------------------------------------------------------
# Limits.

RNG = np.random.default_rng(0)
RAND_LOGPS = jnp.asarray(-RNG.exponential(3.0, (64, 2)), jnp.float32)
RAND_REF = jnp.asarray(-RNG.exponential(3.0, (64, 2)), jnp.float32)


def test_cpo_with_gamma_zero_is_dpo():
  a, _ = losses.cpo(RAND_LOGPS, RAND_REF, beta=0.3, gamma=0.0)
  b, _ = losses.dpo(RAND_LOGPS, RAND_REF, beta=0.3)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_cpo_smooth_large_tau_limit():
  beta, gamma = 0.7, 0.5
  loss, m = losses.cpo_smooth(RAND_LOGPS, RAND_REF, beta=beta, gamma=gamma,
                              tau=1e4, alpha=1.0)
  target = jnp.maximum(m["delta_ref"], gamma)
  np.testing.assert_allclose(
      loss, jax.nn.softplus(-beta * (m["delta"] - target)), rtol=1e-4, atol=1e-4)
  # gamma = 0: the limit is exactly the official `clip` variant.
  smooth0, _ = losses.cpo_smooth(RAND_LOGPS, RAND_REF, beta=beta, gamma=0.0,
                                 tau=1e4, alpha=1.0)
  clip, _ = losses.cpo_clip(RAND_LOGPS, RAND_REF, beta=beta)
  np.testing.assert_allclose(smooth0, clip, rtol=1e-4, atol=1e-4)


def test_cpo_clip_is_dpo_when_reference_prefers_chosen():
  ref = jnp.sort(RAND_REF, axis=1)[:, ::-1]  # delta_ref >= 0
  a, _ = losses.cpo_clip(RAND_LOGPS, ref, beta=0.4)
  b, _ = losses.dpo(RAND_LOGPS, ref, beta=0.4)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # ... and differs where delta_ref < 0.
  flipped = ref[:, ::-1]
  a, m = losses.cpo_clip(RAND_LOGPS, flipped, beta=0.4)
  b, _ = losses.dpo(RAND_LOGPS, flipped, beta=0.4)
  assert np.all(np.asarray(a)[np.asarray(m["delta_ref"]) < -0.1]
                > np.asarray(b)[np.asarray(m["delta_ref"]) < -0.1])


@pytest.mark.parametrize("beta", [1e2, 1e3, 1e4])
def test_prop_5_1_dpo_over_beta_is_margin_ranking(beta):
  loss, m = losses.dpo(RAND_LOGPS, RAND_REF, beta=beta)
  hinge = jnp.maximum(0.0, m["delta_ref"] - m["delta"])
  # softplus(x) - relu(x) is in (0, log 2], so the gap is <= log(2) / beta.
  gap = np.asarray(loss / beta - hinge)
  assert np.all(gap >= -1e-6 * np.abs(hinge).max())
  assert np.all(gap <= math.log(2) / beta * (1 + 1e-3) + 1e-6)


# ----------------------------------------------------------------------------
# Gradients, jit, sharding.

LOSS_KWARGS = {
    "dpo": dict(beta=0.5, label_smoothing=0.1),
    "ipo": dict(beta=0.5),
    "hinge": dict(beta=0.5),
    "simpo": dict(beta=2.0, gamma=0.3),
    "cpo": dict(beta=0.5, gamma=0.05),
    "cpo_smooth": dict(beta=2.5, gamma=0.5, tau=2.0, alpha=0.25),
    "cpo_easy": dict(beta=2.5, gamma=0.05),
    "cpo_clip": dict(beta=0.5),
}


def test_every_registered_loss_has_test_kwargs():
  assert set(LOSS_KWARGS) == set(losses.LOSSES)


@pytest.mark.parametrize("name", sorted(LOSS_KWARGS))
def test_gradients_match_finite_differences(name):
  fn = losses.get_loss(name).fn
  logps, ref = RAND_LOGPS[:8] * 0.3, RAND_REF[:8] * 0.3
  f = lambda x: jnp.sum(fn(x, ref, **LOSS_KWARGS[name])[0])
  with jax.enable_x64(True):
    check_grads(f, (jnp.asarray(logps, jnp.float64),), order=1, modes=["rev"],
                atol=1e-6, rtol=1e-6, eps=1e-5)


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree(self):
    for name, kwargs in LOSS_KWARGS.items():
      fn = self.variant(functools.partial(losses.get_loss(name).fn, **kwargs))
      loss, metrics = fn(RAND_LOGPS, RAND_REF)
      ref_loss, ref_metrics = losses.get_loss(name).fn(RAND_LOGPS, RAND_REF, **kwargs)
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-7, err_msg=name)
      chex.assert_trees_all_close(metrics, ref_metrics, rtol=1e-5, atol=1e-7)


def test_sharded_batch_matches_single_device():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  logps, ref = jax.device_put(RAND_LOGPS, spec), jax.device_put(RAND_REF, spec)
  for name, kwargs in LOSS_KWARGS.items():
    fn = jax.jit(functools.partial(losses.get_loss(name).fn, **kwargs))
    loss, _ = fn(logps, ref)
    assert len(loss.sharding.device_set) == 8
    np.testing.assert_allclose(
        loss, losses.get_loss(name).fn(RAND_LOGPS, RAND_REF, **kwargs)[0],
        rtol=1e-5, atol=1e-7, err_msg=name)


# ----------------------------------------------------------------------------
# Properties on extreme inputs.

_pairs = hnp.arrays(np.float32, (8, 2), elements=st.floats(
    -1e4, 0.0, width=32, allow_nan=False, allow_infinity=False))


@functools.cache
def _jitted(name, **overrides):
  """The loss and its gradient in the chosen logps, compiled once per dtype."""
  kwargs = {**LOSS_KWARGS[name], **overrides}
  fn = functools.partial(losses.get_loss(name).fn, **kwargs)
  grad = jax.grad(lambda x, ref: jnp.sum(fn(x, ref)[0]))
  return jax.jit(fn), jax.jit(grad)


@pytest.mark.parametrize("name", sorted(LOSS_KWARGS))
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(logps=_pairs, ref=_pairs, bf16=st.booleans())
def test_finite_on_extreme_inputs(name, logps, ref, bf16):
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  fn, grad_fn = _jitted(name)
  logps, ref = jnp.asarray(logps, dtype), jnp.asarray(ref, dtype)
  loss, metrics = fn(logps, ref)
  grad = grad_fn(logps, ref)
  assert loss.dtype == jnp.float32
  for x in [loss, grad, *metrics.values()]:
    assert np.all(np.isfinite(np.asarray(x, np.float32))), name


# IPO (a square) and label-smoothed DPO have finite minimisers: not monotone.
MONOTONE = sorted(set(LOSS_KWARGS) - {"ipo"})


@pytest.mark.parametrize("name", MONOTONE)
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(logps=_pairs, ref=_pairs,
                  step=st.floats(1e-2, 10.0, allow_nan=False))
def test_loss_is_nonincreasing_in_delta(name, logps, ref, step):
  fn, _ = _jitted(name, label_smoothing=0.0) if name == "dpo" else _jitted(name)
  base, _ = fn(logps, ref)
  up, _ = fn(logps + np.array([step, 0.0], np.float32), ref)
  down, _ = fn(logps - np.array([0.0, step], np.float32), ref)
  tol = 1e-6 * (1 + np.abs(np.asarray(base)))
  assert np.all(np.asarray(up) <= np.asarray(base) + tol)
  assert np.all(np.asarray(down) <= np.asarray(base) + tol)


def test_cpo_margin_saturates_instead_of_overflowing():
  ref = jnp.full((2, 2), -500.0)
  loss, m = losses.cpo(jnp.zeros((2, 2)), ref, beta=1.0, gamma=0.5)
  assert np.all(np.isfinite(loss)) and np.all(m["margin_saturated"] == 1.0)


# ----------------------------------------------------------------------------
# Errors.


def test_bad_input_errors():
  with pytest.raises(ValueError, match=r"\[B, 2\]"):
    losses.dpo(jnp.zeros((4,)), jnp.zeros((4,)), beta=0.1)
  with pytest.raises(ValueError, match="must match"):
    losses.dpo(jnp.zeros((4, 2)), jnp.zeros((3, 2)), beta=0.1)
  for beta in (0.0, -1.0):
    with pytest.raises(ValueError, match="beta must be > 0"):
      losses.cpo_smooth(LOGPS, REF, beta=beta, gamma=0.5, tau=2.0, alpha=1.0)
  for eps in (-0.1, 0.5, 0.7):
    with pytest.raises(ValueError, match="label_smoothing"):
      losses.dpo(LOGPS, REF, beta=0.1, label_smoothing=eps)
  with pytest.raises(ValueError, match="tau"):
    losses.cpo_smooth(LOGPS, REF, beta=1.0, gamma=0.5, tau=0.0, alpha=1.0)
  with pytest.raises(TypeError):
    losses.dpo(LOGPS, REF, 0.1)  # hyper-parameters are keyword-only


def test_unknown_loss_lists_names_and_disambiguates_cpo():
  with pytest.raises(KeyError) as info:
    losses.get_loss("contrastive_cpo")
  msg = str(info.value)
  for name in losses.LOSSES:
    assert name in msg
  assert "Constrained" in msg and "Contrastive" in msg
