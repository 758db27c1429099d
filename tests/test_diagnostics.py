"""Diagnostics: U, accuracies, audit, certificate and the closed-form optimum."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax import diagnostics as diag
from cpo_jax import losses

DELTA = jnp.array([-0.5, 0.5, -2.0, -0.5])
DELTA_REF = jnp.array([-1.0, -1.0, -1.0, 0.0])


def test_undesirable_space_and_accuracies_golden():
  np.testing.assert_array_equal(diag.in_undesirable_space(DELTA, DELTA_REF),
                                [True, False, False, False])
  assert float(diag.frac_in_U(DELTA, DELTA_REF)) == 0.25
  assert float(diag.relative_accuracy(DELTA, DELTA_REF)) == 0.5
  assert float(diag.absolute_accuracy(DELTA)) == 0.25
  assert float(diag.frac_ref_prefers_rejected(DELTA_REF)) == 0.75
  where = jnp.array([1.0, 0.0, 0.0, 1.0])
  assert float(diag.frac_in_U(DELTA, DELTA_REF, where)) == 0.5
  assert float(diag.absolute_accuracy(DELTA, jnp.zeros(4))) == 0.0  # empty selection
  np.testing.assert_array_equal(diag.pair_delta(jnp.array([[-1.0, -3.0]])), [2.0])


def test_assumption_3_1_violation_on_constructed_cases():
  # -dr/beta = [-10, -0.5, 0, -1]; the last pair sits exactly on the boundary.
  delta_ref = jnp.array([-1.0, -1.0, 0.5, -1.0])
  dr = jnp.array([1.0, 0.05, 0.0, 0.1])
  np.testing.assert_array_equal(diag.violates_assumption(delta_ref, dr, beta=0.1),
                                [False, True, False, True])
  assert float(diag.frac_violating(delta_ref, dr, beta=0.1)) == 0.5
  # Large beta: only the reference's own preference matters.
  assert float(diag.frac_violating(delta_ref, dr, beta=1e6)) == 0.75
  # Violation <=> delta* <= 0.
  np.testing.assert_array_equal(diag.delta_star(delta_ref, dr, beta=0.1) <= 0,
                                diag.violates_assumption(delta_ref, dr, beta=0.1))


def test_reference_audit():
  delta_ref = jnp.array([-1.0, -1.0, 0.5, -1.0, 30.0])
  dr = jnp.array([1.0, 0.05, 0.0, 0.1, 1.0])
  out = diag.reference_audit(delta_ref, betas=jnp.array([0.1, 1e6]), dr=dr)
  np.testing.assert_allclose(out["frac_violating"], [0.4, 0.6])
  assert float(out["frac_ref_prefers_rejected"]) == pytest.approx(0.6)
  assert float(jnp.sum(out["delta_ref_hist"])) == 5.0  # 30 is clipped into the last bin
  assert float(out["delta_ref_hist"][-1]) == 1.0
  audit_jit = jax.jit(lambda d, r: diag.reference_audit(d, betas=jnp.array([0.1, 1e6]), dr=r))
  chex.assert_trees_all_close(audit_jit(delta_ref, dr), out)
  assert "frac_violating" not in diag.reference_audit(delta_ref, betas=[0.1])


@pytest.mark.parametrize("name,kwargs", [
    ("dpo", dict(beta=0.3)),
    ("cpo", dict(beta=0.3, gamma=0.01)),
    ("cpo_smooth", dict(beta=2.5, gamma=0.5, tau=2.0, alpha=0.25)),
    ("cpo_easy", dict(beta=2.5, gamma=0.05)),
    ("cpo_clip", dict(beta=0.3)),
])
def test_certificate_inverts_margin_losses(name, kwargs):
  rng = np.random.default_rng(0)
  logps = jnp.asarray(-rng.exponential(2.0, (32, 2)), jnp.float32)
  ref = jnp.asarray(-rng.exponential(2.0, (32, 2)), jnp.float32)
  loss, m = losses.get_loss(name).fn(logps, ref, **kwargs)
  bound = diag.certified_delta(loss, m["delta_ref"], beta=kwargs["beta"],
                               margin=m["loss_margin"])
  # The per-pair margin loss is strictly monotone, so the bound is tight.
  ok = np.asarray(loss) > 1e-5  # below that, float32 cannot resolve e^l - 1
  np.testing.assert_allclose(np.asarray(bound)[ok], np.asarray(m["delta"])[ok],
                             atol=2e-3, rtol=1e-3)
  # A smaller loss certifies more.
  tighter = diag.certified_delta(loss * 0.5, m["delta_ref"], beta=kwargs["beta"],
                                 margin=m["loss_margin"])
  assert np.all(np.asarray(tighter) >= np.asarray(bound))


def test_certificate_golden():
  # l = log 2 -> log(e^l - 1) = 0 -> bound = delta_ref + m / beta.
  bound = diag.certified_delta(jnp.array([np.log(2.0), 0.0]), jnp.array([1.0, 1.0]),
                               beta=0.5, margin=jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(bound[0], 3.0, rtol=1e-6)
  assert np.isposinf(bound[1])


def test_closed_form_optimum_satisfies_delta_star_identity():
  key_ref, key_r = jax.random.split(jax.random.key(0))
  ref = jax.nn.log_softmax(3.0 * jax.random.normal(key_ref, (50, 6)), axis=-1)
  r = jax.random.normal(key_r, (50, 6))
  for beta in (0.05, 0.5, 5.0):
    opt = diag.rlhf_optimal_logprobs(ref, r, beta=beta)
    np.testing.assert_allclose(jnp.sum(jnp.exp(opt), -1), 1.0, rtol=1e-5)
    for i, j in [(0, 1), (2, 5), (4, 3)]:
      np.testing.assert_allclose(
          opt[:, i] - opt[:, j],
          diag.delta_star(ref[:, i] - ref[:, j], r[:, i] - r[:, j], beta=beta),
          rtol=1e-4, atol=1e-4)


def test_closed_form_optimum_maximises_the_kl_regularised_objective():
  key = jax.random.key(1)
  ref = jax.nn.log_softmax(jax.random.normal(key, (20, 4)), axis=-1)
  r = jax.random.normal(jax.random.fold_in(key, 1), (20, 4))
  opt = diag.rlhf_optimal_logprobs(ref, r, beta=0.7)
  best = diag.kl_regularized_objective(opt, ref, r, beta=0.7)
  # The optimum's value is beta log Z.
  np.testing.assert_allclose(best, 0.7 * jax.nn.logsumexp(ref + r / 0.7, axis=-1),
                             rtol=1e-5, atol=1e-5)
  for k in range(5):
    other = jax.nn.log_softmax(
        opt + 0.3 * jax.random.normal(jax.random.fold_in(key, 10 + k), opt.shape), axis=-1)
    assert np.all(np.asarray(diag.kl_regularized_objective(other, ref, r, beta=0.7))
                  <= np.asarray(best) + 1e-5)
  # A deterministic policy (log 0 = -inf entries) still has a finite objective.
  greedy = jnp.where(jax.nn.one_hot(jnp.argmax(r, -1), 4) > 0, 0.0, -jnp.inf)
  assert np.all(np.isfinite(diag.kl_regularized_objective(greedy, ref, r, beta=0.7)))


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_fractions_jit(self):
    f = self.variant(lambda d, dr, w: (diag.frac_in_U(d, dr, w), diag.relative_accuracy(d, dr, w),
                                       diag.absolute_accuracy(d, w),
                                       diag.frac_violating(dr, d, beta=0.1, where=w)))
    out = f(DELTA, DELTA_REF, jnp.ones(4))
    np.testing.assert_allclose(out[:3], [0.25, 0.5, 0.25])


def test_sharded_inputs():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  d = jnp.tile(DELTA, 4)
  dr = jnp.tile(DELTA_REF, 4)
  out = jax.jit(diag.frac_in_U)(jax.device_put(d, spec), jax.device_put(dr, spec))
  assert float(out) == 0.25


def test_errors():
  with pytest.raises(ValueError, match="shapes must match"):
    diag.frac_in_U(jnp.zeros(3), jnp.zeros(4))
  with pytest.raises(ValueError, match="beta must be > 0"):
    diag.frac_violating(jnp.zeros(3), jnp.zeros(3), beta=-1.0)
  with pytest.raises(ValueError, match="shapes must match"):
    diag.rlhf_optimal_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 4)), beta=1.0)
