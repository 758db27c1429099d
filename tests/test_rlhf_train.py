"""Online RLHF training: RLOO/PPO terms on fixed rollouts (hand-computed), the rollout
path vs the sampler's cached log-probs, critic causality, sharded = single device,
resume = uninterrupted run, and RL against a trained reward model with evaluation."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpo_jax import inputs, reward_model, rollout, train_rlhf, writers
from cpo_jax import sharding as shd
from cpo_jax.configs import rl_small_lm, rm_small_lm
from cpo_jax.models import Transformer, configs

DIGITS = np.arange(ord("0"), ord("9") + 1) + 3  # byte-tokenizer ids of '0'..'9'


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def tiny_rl_config(algo, data_dir, **rl):
  c = rl_small_lm.get_config(algo)
  c.model.update(d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, mlp_dim=64)
  c.data.update(dir=str(data_dir), task="add", n_train=32, n_test=8, eval_split="")
  c.train.update(steps=4, ckpt_every=2, log_every=1, progress=False, tensorboard=False,
                 gen_samples=8, eval_batch_size=8)
  c.optim.update(lr=1e-3, warmup_steps=1)
  c.rl.update(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=4, eval_kl_prompts=8)
  c.rl.update(rl)
  return c


def digit_reward(ids, batch):
  """Fraction of response tokens that are decimal digits (non-trivial on a random model)."""
  del ids
  t = batch["response_mask"].shape[1]
  hit = np.isin(batch["tokens"][:, -t:], DIGITS) & batch["response_mask"]
  return hit.sum(-1) / t + 0.1 * batch["response_mask"].sum(-1)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- terms on fixed rollouts -------------------------------------------------


def test_rloo_terms_hand_computed():
  hp = train_rlhf.RLHParams("rloo", beta=0.5, kl_estimator="k1", samples_per_prompt=3)
  logps = jnp.array([[-1.0, -2.0], [-0.5, 0.0], [-1.0, -1.0]])
  ref = jnp.array([[-1.5, -2.0], [-0.5, -3.0], [-2.0, -1.0]])
  mask = jnp.array([[1, 1], [1, 0], [1, 1]], bool)
  scores = jnp.array([1.0, 0.0, 2.0])
  t = train_rlhf.rloo_terms(logps, ref, mask, scores, hp=hp)
  # KL (k1, summed over response tokens): 0.5, 0.0, 1.0; reward = score - 0.5 KL.
  reward = [0.75, 0.0, 1.5]
  adv = [0.75 - (0.0 + 1.5) / 2, 0.0 - (0.75 + 1.5) / 2, 1.5 - (0.75 + 0.0) / 2]
  seq_logp = [-3.0, -0.5, -2.0]
  np.testing.assert_allclose(t["kl_penalty"], [0.5, 0.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(t["reward"], reward, atol=1e-6)
  np.testing.assert_allclose(t["advantages"], adv, atol=1e-6)
  np.testing.assert_allclose(t["loss"], [-a * s for a, s in zip(adv, seq_logp)], atol=1e-6)
  # The gradient flows through log pi only (the KL term is a stop-gradient reward).
  g = jax.grad(lambda lp: jnp.sum(train_rlhf.rloo_terms(lp, ref, mask, scores, hp=hp)["loss"]))(
      logps)
  np.testing.assert_allclose(g, -np.asarray(adv)[:, None] * np.asarray(mask), atol=1e-6)


def test_ppo_targets_and_loss_hand_computed():
  hp = train_rlhf.RLHParams("ppo", beta=0.1, kl_estimator="k1", samples_per_prompt=1,
                            clip_eps=0.2, vf_coef=0.5, vf_clip=0.2, gamma=1.0, lam=0.9,
                            whiten_advantages=False)
  mask = jnp.array([[1, 1, 0]], bool)
  old = jnp.array([[-1.0, -2.0, 0.0]])
  ref = jnp.array([[-1.5, -1.0, 0.0]])
  values = jnp.array([[0.5, 0.2, 0.0]])
  tg = train_rlhf.ppo_targets(old, ref, values, mask, jnp.array([1.0]), hp=hp)
  # rewards: -0.1 * kl_t, score on the last response token: [-0.05, -0.1 * -1 + 1].
  np.testing.assert_allclose(tg["rewards"], [[-0.05, 1.1, 0.0]], atol=1e-6)
  # deltas: t1 = 1.1 - 0.2 = 0.9; t0 = -0.05 + 0.2 - 0.5 = -0.35; A0 = -0.35 + 0.9 * 0.9.
  np.testing.assert_allclose(tg["advantages"], [[0.46, 0.9, 0.0]], atol=1e-6)
  np.testing.assert_allclose(tg["returns"], [[0.96, 1.1, 0.0]], atol=1e-6)
  mb = dict(response_mask=mask, old_logps=old, old_values=values, **tg)
  new_lp = jnp.array([[-0.9, -2.5, 0.0]])
  new_v = jnp.array([[0.6, 0.5, 0.0]])
  loss, m = train_rlhf.ppo_loss_terms(new_lp, new_v, mb, hp=hp)
  pg0 = -0.46 * math.exp(0.1)                       # ratio 1.105 inside the clip range
  pg1 = max(-0.9 * math.exp(-0.5), -0.9 * 0.8)      # ratio 0.607 < 0.8: clipped branch
  vf0 = 0.5 * (0.6 - 0.96) ** 2                     # value moved by 0.1 < clip
  vf1 = 0.5 * max((0.5 - 1.1) ** 2, (0.4 - 1.1) ** 2)  # clipped value 0.2 + 0.2 is worse
  np.testing.assert_allclose(m["policy_loss"], (pg0 + pg1) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["value_loss"], (vf0 + vf1) / 2, rtol=1e-6)
  np.testing.assert_allclose(loss, (pg0 + pg1) / 2 + 0.5 * (vf0 + vf1) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["clip_frac"], 0.0, atol=1e-7)  # max() picked the unclipped


# --- the rollout path ----------------------------------------------------------


def _tiny_model(seed=0):
  cfg = configs.tiny()
  cfg.update(d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, mlp_dim=64, vocab_size=16,
             init_std=0.3)
  return cfg, Transformer(cfg, rngs=nnx.Rngs(seed))


def test_rollout_logprobs_equal_sampler_cached_logprobs():
  """assemble + response_logprobs (full recompute) = the KV-cache sampler's log-probs,
  with left-padded prompts, temperature-1 sampling and rows that stop at eos."""
  _, model = _tiny_model()
  graphdef, params = nnx.split(model)
  prompt = jnp.array([[0, 0, 5, 6], [7, 8, 9, 4], [0, 3, 3, 3]], jnp.int32)
  pmask = prompt != 0
  gen = jax.jit(lambda p, x, m, k: rollout.sample(p, x, m, k, graphdef=graphdef,
                                                  max_new_tokens=8, eos_id=2, pad_id=0))(
                                                      params, prompt, pmask, jax.random.key(3))
  assert not np.asarray(gen.mask).all() and np.asarray(gen.mask).any()  # some rows hit eos
  batch = rollout.assemble(np.asarray(prompt), np.asarray(pmask), gen)
  lp = jax.jit(functools.partial(rollout.response_logprobs, graphdef, impl="reference"))(
      params, batch)
  np.testing.assert_allclose(lp, gen.logprobs, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(lp)[~batch["response_mask"]], 0.0)


def test_critic_values_are_causal_and_aligned():
  """values[t] is V of the prefix before response token t: changing response token j
  changes values only at t > j, and values[0] is the score at the last prompt token."""
  cfg, _ = _tiny_model()
  critic = reward_model.ScalarHeadModel(cfg, rngs=nnx.Rngs(1))
  critic.head[...] = jax.random.normal(jax.random.key(0), critic.head.shape)
  graphdef, params = nnx.split(critic)
  tokens = np.array([[0, 5, 6, 7, 8, 9, 10]], np.int32)
  batch = dict(tokens=tokens, attention_mask=tokens != 0, response_mask=np.ones((1, 4), bool))
  values = jax.jit(functools.partial(rollout.response_values, graphdef))
  v = np.asarray(values(params, batch))
  score = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, x != 0))(params, tokens[:, :3])
  np.testing.assert_allclose(v[0, 0], score[0], atol=1e-5)
  changed = dict(batch, tokens=tokens.copy())
  changed["tokens"][0, 4] = 11  # response token 1
  v2 = np.asarray(values(params, changed))
  np.testing.assert_allclose(v2[0, :2], v[0, :2], atol=1e-6)
  assert np.all(np.abs(v2[0, 2:] - v[0, 2:]) > 1e-6)


# --- loops ----------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["rloo", "ppo"])
def test_sharded_iterations_equal_single_device(algo, data_dir):
  """Two RL iterations (sampling, scoring, update) on a data=2 x fsdp=2 x tensor=2 mesh
  give the single-device samples, metrics and parameters."""
  config = tiny_rl_config(algo, data_dir)
  config.model.vocab_size = 264  # 259 byte ids padded to split over tensor=2 (never decoded here)
  ins = inputs.Inputs(config.data)
  prompts = rollout.DatasetPrompts(ins.pairs("train"), batch_size=4, seed=0, pad_id=0)
  runs = {}
  for name, mesh in (("one", shd.make_mesh(shd.mesh_config(data=1), devices=jax.devices()[:1])),
                     ("eight", shd.make_mesh(shd.mesh_config(data=2, fsdp=2, tensor=2)))):
    s = train_rlhf.setup_rl(config, mesh)
    for step in range(2):
      batch = train_rlhf.collect(s, prompts, digit_reward, step, config.seed)
      with shd.use_mesh(mesh):
        dev = shd.shard_batch({k: batch[k] for k in train_rlhf.ROLLOUT_KEYS}, mesh)
        s.state, metrics = s.update_fn(s.state, s.ref_params, dev, jax.random.key(step))
    runs[name] = (batch, _host(metrics), _host(s.state["params"]))
  (b1, m1, p1), (b8, m8, p8) = runs["one"], runs["eight"]
  np.testing.assert_array_equal(b8["tokens"], b1["tokens"])
  assert m1["grad_norm"] > 0 and m1["score"] > 0
  for k, v in m1.items():
    np.testing.assert_allclose(m8[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
  assert _max_diff(p1, p8) < 1e-5


class _Crash(RuntimeError):
  pass


def test_resume_reproduces_uninterrupted_run(data_dir, tmp_path):
  config = tiny_rl_config("rloo", data_dir)
  config.train.steps = 3
  full = train_rlhf.train_rl(config, str(tmp_path / "full"), scorer=digit_reward)
  calls = {"n": 0}

  def crashing(ids, batch):
    calls["n"] += 1
    if calls["n"] == 3:  # the rollout of step 3, after the step-2 checkpoint
      raise _Crash()
    return digit_reward(ids, batch)

  with pytest.raises(_Crash):
    train_rlhf.train_rl(config, str(tmp_path / "resumed"), scorer=crashing)
  resumed = train_rlhf.train_rl(config, str(tmp_path / "resumed"), scorer=digit_reward)
  a = [r for r in writers.read_jsonl(tmp_path / "full" / "metrics.jsonl") if r["split"] == "train"]
  b = [r for r in writers.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
       if r["split"] == "train"]
  assert [r["step"] for r in b] == [1, 2, 3]
  for ra, rb in zip(a, b):
    for k in ("score", "kl", "reward", "policy_loss", "grad_norm", "lr"):
      assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
  assert full["grad_norm"] == pytest.approx(resumed["grad_norm"], rel=1e-5)


def test_reward_model_run_then_rl_against_it(data_dir, tmp_path):
  """`rm` trains and checkpoints a reward model; `rl` with reward=rm:<dir> optimises it
  and evaluates on the comparison axes."""
  rm_cfg = rm_small_lm.get_config()
  rm_cfg.model.update(d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, mlp_dim=64)
  rm_cfg.data.update(dir=str(data_dir), task="add", n_train=32, n_test=8, batch_size=8)
  rm_cfg.train.update(steps=3, ckpt_every=3, eval_every=0, progress=False, tensorboard=False,
                      eval_batch_size=8)
  rm_out = reward_model.train_rm(rm_cfg, str(tmp_path / "rm"))
  assert rm_out["step"] == 3 and np.isfinite(rm_out["loss"])
  assert {"accuracy", "accuracy_gt", "margin", "reward_mean", "reward_std"} <= set(rm_out["eval"])
  config = tiny_rl_config("rloo", data_dir, reward=f"rm:{tmp_path / 'rm'}")
  config.data.eval_split = "train"
  config.train.steps = 1
  out = train_rlhf.train_rl(config, str(tmp_path / "rl"))
  assert out["step"] == 1 and np.isfinite(out["policy_loss"]) and out["score"] != 0
  ev = out["eval"]
  for k in ("accuracy_absolute", "in_U", "gen_reward", "kl_k1", "kl_k3", "dpo_loss"):
    assert np.isfinite(ev[k]), k
  assert ev["kl_k3"] >= 0.0


def test_reward_model_sigterm_saves_the_current_step(data_dir, tmp_path):
  """SIGTERM mid-run: `train_rm` saves the step it reached and returns preempted."""
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from cpo_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from cpo_jax import writers  # pylint: disable=g-import-not-at-top
  rm_cfg = rm_small_lm.get_config()
  rm_cfg.model.update(d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, mlp_dim=64)
  rm_cfg.data.update(dir=str(data_dir), task="add", n_train=32, n_test=8, batch_size=8)
  rm_cfg.train.update(steps=2000, ckpt_every=100_000, log_every=1, eval_every=0,
                      progress=False, tensorboard=False, eval_batch_size=8)
  work = tmp_path / "rm"
  before = signal.getsignal(signal.SIGTERM)

  def send_sigterm_after_3_steps():
    for _ in range(6000):
      recs = writers.read_jsonl(work / "metrics.jsonl")
      if len([r for r in recs if r["split"] == "train"]) >= 3:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      threading.Event().wait(0.01)

  sender = threading.Thread(target=send_sigterm_after_3_steps, daemon=True)
  sender.start()
  out = reward_model.train_rm(rm_cfg, str(work))
  sender.join(timeout=5)
  assert out["preempted"] is True and 3 <= out["step"] < 2000
  assert ckpt_lib.Checkpointer(work, read_only=True).latest_step() == out["step"]
  assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
