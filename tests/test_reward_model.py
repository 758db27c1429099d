"""Reward model: learns a known reward from Bradley–Terry pairs; metric definitions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpo_jax import reward_model
from cpo_jax.models import configs

L, VOCAB = 8, 16


def known_reward(tokens):
  """r*(y) = #(token 5) - #(token 6) over a sequence of L tokens from {3..10}."""
  return (tokens == 5).sum(-1) - (tokens == 6).sum(-1)


def make_pairs(rng, n):
  """Pairs [n, 2, L] with the higher-r* sequence first (ties redrawn)."""
  a = rng.integers(3, 11, size=(4 * n, L))
  b = rng.integers(3, 11, size=(4 * n, L))
  ra, rb = known_reward(a), known_reward(b)
  keep = np.flatnonzero(ra != rb)[:n]
  first = (ra > rb)[keep]
  chosen = np.where(first[:, None], a[keep], b[keep])
  rejected = np.where(first[:, None], b[keep], a[keep])
  tokens = np.stack([chosen, rejected], 1).astype(np.int32)
  return dict(tokens=tokens, attention_mask=np.ones_like(tokens, bool),
              dr=np.abs(ra - rb)[keep].astype(np.float32), valid=np.ones(n, bool))


def _model():
  cfg = configs.tiny()
  cfg.update(vocab_size=VOCAB, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, mlp_dim=64)
  return cfg, reward_model.ScalarHeadModel(cfg, rngs=nnx.Rngs(0))


def test_reward_model_learns_known_reward():
  _, model = _model()
  graphdef, params = nnx.split(model)
  tx = optax.adamw(3e-3)
  schedule = optax.constant_schedule(3e-3)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  step = jax.jit(functools.partial(reward_model.rm_step, graphdef=graphdef, tx=tx,
                                   schedule=schedule, margin=0.0, margin_dr_scale=0.0))
  rng = np.random.default_rng(0)
  first = None
  for _ in range(150):
    state, m = step(state, make_pairs(rng, 32))
    first = first or float(m["loss"])
  test = make_pairs(np.random.default_rng(1), 256)
  sums, n = jax.jit(functools.partial(reward_model.rm_eval_sums, graphdef=graphdef, margin=0.0,
                                      margin_dr_scale=0.0))(state["params"], test)
  ev = reward_model.reduce_metrics(sums, n)
  seqs = test["tokens"].reshape(-1, L)
  r = nnx.merge(graphdef, state["params"])(seqs, np.ones_like(seqs, bool))
  corr = np.corrcoef(np.asarray(r), known_reward(seqs))[0, 1]
  print(f"first loss {first:.3f}, held-out accuracy {float(ev['accuracy']):.3f}, "
        f"corr(r, r*) {corr:.3f}")
  assert first > 0.6  # starts at log 2 (zero head)
  assert float(ev["accuracy"]) > 0.9 and float(ev["accuracy_gt"]) == float(ev["accuracy"])
  assert corr > 0.9


def test_metrics_and_margin_on_constant_rewards():
  """Head 0, bias b: every reward is b, so loss = softplus(m), accuracy 0, std 0."""
  _, model = _model()
  model.bias[...] = jnp.asarray(1.5)
  graphdef, params = nnx.split(model)
  batch = make_pairs(np.random.default_rng(0), 8)
  batch["valid"][-2:] = False  # padding rows are ignored
  for margin, scale in ((0.0, 0.0), (1.0, 0.5)):
    loss, m = reward_model.rm_outputs(params, batch, graphdef=graphdef, margin=margin,
                                      margin_dr_scale=scale)
    np.testing.assert_allclose(loss, jax.nn.softplus(margin + scale * batch["dr"]), rtol=1e-5)
  sums, n = reward_model.rm_eval_sums(params, batch, graphdef=graphdef, margin=0.0,
                                      margin_dr_scale=0.0)
  ev = reward_model.reduce_metrics(sums, n)
  assert float(n) == 6
  np.testing.assert_allclose([ev["loss"], ev["accuracy"], ev["margin"], ev["reward_mean"],
                              ev["reward_std"]], [np.log(2), 0, 0, 1.5, 0], atol=1e-3)
