"""Every registered loss and the paper's diagnostics on built-in synthetic pairs.

  python -m experiments.losses_table [--pairs 4096] [--seed 0]

Draws a reference with a controllable bias (a fraction of pairs where it
prefers the rejected response), a reward gap per pair, and three policies:
the reference itself, the RLHF optimum (delta* = delta_ref + dr/beta), and a
policy in the undesirable space U (halfway between delta_ref and 0 where
delta_ref < 0). For each loss it prints the mean loss and the diagnostics.
Runs in seconds on a CPU; the numbers follow from the seed.
"""

import argparse
import functools

import jax
import jax.numpy as jnp

from cpo_jax import diagnostics as diag
from cpo_jax import losses

HPARAMS = {
    "dpo": dict(beta=0.1),
    "ipo": dict(beta=0.1),
    "hinge": dict(beta=0.1),
    "simpo": dict(beta=2.0, gamma=0.5),
    "cpo": dict(beta=0.1, gamma=0.05),
    "cpo_smooth": dict(beta=2.5, gamma=0.5, tau=2.0, alpha=0.25),
    "cpo_easy": dict(beta=2.5, gamma=0.05),
    "cpo_clip": dict(beta=0.1),
}


def synthetic_pairs(key, n, *, bias=0.3, beta=0.1):
  """Reference log-probs [n, 2], reward gaps [n]; a `bias` fraction misranked."""
  k_lp, k_dr, k_bias = jax.random.split(key, 3)
  ref = -jnp.abs(2.0 + jax.random.normal(k_lp, (n, 2)))  # per-token-scale log-probs
  dr = jax.random.uniform(k_dr, (n,), minval=0.01, maxval=0.2)
  misranked = jax.random.uniform(k_bias, (n,)) < bias
  # Misranked pairs: the reference prefers y_l by more than dr / beta.
  shift = jnp.where(misranked, -(dr / beta) - 0.5, 0.5)
  ref = ref.at[:, 0].set(ref[:, 1] + shift)
  return ref, dr


@functools.partial(jax.jit, static_argnames="name")
def evaluate(name, logps, ref, dr):
  loss, m = losses.get_loss(name).fn(logps, ref, **HPARAMS[name])
  return {
      "loss": jnp.mean(loss),
      "rel_acc": diag.relative_accuracy(m["delta"], m["delta_ref"]),
      "abs_acc": diag.absolute_accuracy(m["delta"]),
      "frac_in_U": diag.frac_in_U(m["delta"], m["delta_ref"]),
      "frac_violating": diag.frac_violating(m["delta_ref"], dr, beta=0.1),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pairs", type=int, default=4096)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--bias", type=float, default=0.3)
  args = parser.parse_args(argv)
  ref, dr = synthetic_pairs(jax.random.key(args.seed), args.pairs, bias=args.bias)
  delta_ref = ref[:, 0] - ref[:, 1]
  policies = {
      "reference": ref,
      "rlhf_optimum": ref.at[:, 0].add(dr / 0.1),
      "in_U": ref.at[:, 0].add(jnp.where(delta_ref < 0, -delta_ref / 2, 0.0)),
  }
  header = f"{'loss':<11} {'policy':<13} {'loss':>9} {'rel_acc':>8} {'abs_acc':>8} {'in_U':>6} {'viol':>6}"
  print(header)
  print("-" * len(header))
  for name in losses.LOSSES:
    for pname, logps in policies.items():
      r = jax.device_get(evaluate(name, logps, ref, dr))
      print(f"{name:<11} {pname:<13} {r['loss']:>9.4f} {r['rel_acc']:>8.3f} "
            f"{r['abs_acc']:>8.3f} {r['frac_in_U']:>6.3f} {r['frac_violating']:>6.3f}")


if __name__ == "__main__":
  main()
