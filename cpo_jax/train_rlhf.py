"""Online RLHF: reward-model training and KL-regularised policy optimisation.

    cpo-jax rm --config=cpo_jax/configs/rm_small_lm.py --workdir=/tmp/rm
    cpo-jax rl --config=cpo_jax/configs/rl_small_lm.py:rloo --workdir=/tmp/rloo \\
        --config.init_from=/tmp/sl/runs/sft

One RL iteration: draw `prompts_per_step` prompts (a pure function of the
step), sample `samples_per_prompt` responses each with the KV cache at
temperature 1 (`rollout.sample`, jitted and batch-sharded), score them
(the synthetic task's ground-truth r*(x, y) on decoded text, or a frozen
reward model), then one jitted update (`rl_update`) that computes the
policy's, the frozen reference's (under stop_gradient) and the critic's
per-token quantities and optimises

* ``rloo``: REINFORCE leave-one-out (Ahmadian et al. 2024): sequence reward
  ``R = score - beta * sum_t kl_t``, advantage ``R_i - mean_{j!=i} R_j``
  over the K samples of a prompt, loss ``-A * log pi(y|x)`` (summed
  log-probs, mean over sequences); one on-policy gradient step per rollout.
* ``ppo``: per-token rewards ``-beta kl_t`` plus the score on the last token
  (`rlhf.kl_penalized_rewards`), a critic (`reward_model.ScalarHeadModel`,
  backbone initialised from the policy's init or from `rl.value_from`), GAE,
  optional whitening, then `ppo_epochs` x `minibatches` steps of the clipped
  surrogate + `vf_coef` x clipped value loss (token means).

``kl_t`` is `rlhf.kl_estimate(log pi, log pi_ref)` with `rl.kl_estimator`
(k1/k2/k3) on the sampled tokens. Only k1 makes the penalised reward's
expected gradient that of ``E[r] - beta KL``, whose optimum is
``pi_ref exp(r/beta)/Z``; k2/k3 shape the penalty differently.

State and resume follow `cpo_jax.train`: params ``{"policy", ["value"]}``,
optax state and step are saved by `checkpoint.Checkpointer` (the frozen
reference and reward model never are); rollout randomness is
``fold_in(key(seed), step)`` and prompts a function of the step, so a resumed
run repeats an uninterrupted one. SIGTERM saves the current step and
returns ``preempted=True``. A non-finite loss leaves the parameters
unchanged and stops the run with `train.NonFiniteError`. Metrics are read
every iteration: the host must wait for the update anyway before sampling
with the new policy (and for the samples to score them), so reading them
late would hide nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from cpo_jax import checkpoint as ckpt_lib
from cpo_jax import inputs, reward_model, rlhf, rollout, train, writers
from cpo_jax import sharding as shd

log = logging.getLogger(__name__)
ROLLOUT_KEYS = ("tokens", "attention_mask", "response_mask", "scores")


@dataclasses.dataclass(frozen=True)
class RLHParams:
  """Static (hashable) settings of a compiled RL update; fields as in `rl` configs."""

  algo: str
  beta: float
  kl_estimator: str
  samples_per_prompt: int
  ppo_epochs: int = 1
  minibatches: int = 1
  clip_eps: float = 0.2
  vf_coef: float = 0.5
  vf_clip: float = 0.2
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True

  @classmethod
  def from_config(cls, r) -> "RLHParams":
    if r.algo not in ("rloo", "ppo"):
      raise ValueError(f"rl.algo must be 'rloo' or 'ppo', got {r.algo!r}")
    if r.algo == "rloo" and r.samples_per_prompt < 2:
      raise ValueError("rloo needs rl.samples_per_prompt >= 2")
    return cls(**{f.name: r[f.name] for f in dataclasses.fields(cls)})

  @property
  def updates_per_iteration(self) -> int:
    return self.ppo_epochs * self.minibatches if self.algo == "ppo" else 1


# ---------------------------------------------------------------------------
# Pure pieces of the update (module level; tests call them on fixed rollouts).


def _f32(x):
  return x.astype(jnp.float32)


def rloo_terms(logps, ref_logps, mask, scores, *, hp: RLHParams):
  """RLOO sequence rewards, advantages and per-sequence loss [N] (N = prompts * K)."""
  mask = _f32(mask)
  kl_seq = jnp.sum(rlhf.kl_estimate(jax.lax.stop_gradient(logps), ref_logps,
                                    estimator=hp.kl_estimator) * mask, -1)
  reward = _f32(scores) - hp.beta * kl_seq
  adv = rlhf.rloo_advantages(reward.reshape(-1, hp.samples_per_prompt)).reshape(-1)
  loss = rlhf.policy_gradient_loss(jnp.sum(logps * mask, -1), adv)
  return {"loss": loss, "advantages": adv, "reward": reward, "kl_penalty": kl_seq}


def ppo_targets(old_logps, ref_logps, old_values, mask, scores, *, hp: RLHParams):
  """Per-token rewards, GAE advantages (whitened if configured) and returns, [N, T]."""
  rewards = rlhf.kl_penalized_rewards(scores, old_logps, ref_logps, mask, beta=hp.beta,
                                      estimator=hp.kl_estimator)
  adv, returns = rlhf.gae(rewards, old_values, mask, gamma=hp.gamma, lam=hp.lam)
  if hp.whiten_advantages:
    adv = rlhf.whiten(adv, _f32(mask))
  return {"rewards": rewards, "advantages": adv, "returns": returns}


def _token_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def ppo_loss_terms(logps, values, mb, *, hp: RLHParams):
  """(total loss, metrics) of a PPO minibatch from new log-probs/values [n, T]."""
  mask = _f32(mb["response_mask"])
  pg, m = rlhf.ppo_policy_loss(logps, mb["old_logps"], mb["advantages"], mask,
                               clip_eps=hp.clip_eps)
  vf = rlhf.value_loss(values, mb["old_values"], mb["returns"], mask, clip_eps=hp.vf_clip)
  pg, vf = _token_mean(pg, mask), _token_mean(vf, mask)
  return pg + hp.vf_coef * vf, {"policy_loss": pg, "value_loss": vf,
                                "clip_frac": _token_mean(m["clipped"], mask),
                                "approx_kl": _token_mean(m["approx_kl"], mask)}


def _apply(state_params, opt_state, grads, loss, tx):
  """AdamW update guarded against non-finite loss/gradients."""
  grad_norm = optax.tree.norm(grads)
  updates, new_opt = tx.update(grads, opt_state, state_params)
  new_params = optax.apply_updates(state_params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  return keep(new_params, state_params), keep(new_opt, opt_state), grad_norm, finite


def _rloo_update(params, opt_state, batch, ref_lp, mask, *, policy_gd, tx, hp, impl):
  def loss_fn(p):
    lp = rollout.response_logprobs(policy_gd, p["policy"], batch, impl)
    t = rloo_terms(lp, ref_lp, mask, batch["scores"], hp=hp)
    k1 = jnp.sum((jax.lax.stop_gradient(lp) - ref_lp) * mask, -1)
    return jnp.mean(t["loss"]), {"reward": jnp.mean(t["reward"]), "kl": jnp.mean(k1),
                                 "kl_penalty": jnp.mean(t["kl_penalty"]),
                                 "adv_abs": jnp.mean(jnp.abs(t["advantages"]))}

  (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  params, opt_state, grad_norm, finite = _apply(params, opt_state, grads, loss, tx)
  return params, opt_state, finite, dict(m, policy_loss=loss, grad_norm=grad_norm)


def _ppo_update(params, opt_state, batch, ref_lp, mask, rng, *, policy_gd, value_gd, tx, hp,
                impl):
  old_lp = jax.lax.stop_gradient(
      rollout.response_logprobs(policy_gd, params["policy"], batch, impl))
  old_v = jax.lax.stop_gradient(rollout.response_values(value_gd, params["value"], batch))
  tg = ppo_targets(old_lp, ref_lp, old_v, mask, batch["scores"], hp=hp)
  exp = dict(batch, old_logps=old_lp, old_values=old_v, advantages=tg["advantages"],
             returns=tg["returns"])
  n = mask.shape[0]
  perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(rng, e), n))(
      jnp.arange(hp.ppo_epochs))
  order = perms.reshape(hp.ppo_epochs * hp.minibatches, n // hp.minibatches)

  def loss_fn(p, mb):
    lp = rollout.response_logprobs(policy_gd, p["policy"], mb, impl)
    v = rollout.response_values(value_gd, p["value"], mb)
    return ppo_loss_terms(lp, v, mb, hp=hp)

  def body(carry, idx):
    p, o, ok = carry
    mb = jax.tree.map(lambda x: x[idx], exp)
    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, mb)
    p, o, gn, finite = _apply(p, o, grads, loss, tx)
    return (p, o, ok & finite), dict(m, grad_norm=gn)

  (params, opt_state, finite), per = jax.lax.scan(body, (params, opt_state, jnp.array(True)),
                                                  order)
  kl_pen = rlhf.kl_estimate(old_lp, ref_lp, estimator=hp.kl_estimator) * mask
  metrics = {k: jnp.mean(v) for k, v in per.items()}
  metrics.update(kl=jnp.mean(jnp.sum((old_lp - ref_lp) * mask, -1)),
                 kl_penalty=jnp.mean(jnp.sum(kl_pen, -1)),
                 reward=jnp.mean(jnp.sum(tg["rewards"], -1)), value_mean=_token_mean(old_v, mask))
  return params, opt_state, finite, metrics


def rl_update(state, ref_params, batch, rng, *, graphdefs, tx, schedule, hp: RLHParams,
              impl: str):
  """One RL iteration's optimisation on a scored rollout batch; (new_state, metrics).

  Metrics (means over the rollout): ``score`` (reward model / r*), ``kl`` (k1
  sequence KL to the reference), ``kl_penalty`` (the configured estimator),
  ``reward`` (score - beta * kl_penalty), ``response_len``, the loss terms,
  ``grad_norm`` and ``lr`` (means over PPO's minibatch steps), ``nonfinite``.
  """
  policy_gd, value_gd = graphdefs
  mask = _f32(batch["response_mask"])
  ref_lp = jax.lax.stop_gradient(rollout.response_logprobs(policy_gd, ref_params, batch, impl))
  if hp.algo == "rloo":
    params, opt_state, finite, metrics = _rloo_update(
        state["params"], state["opt_state"], batch, ref_lp, mask, policy_gd=policy_gd, tx=tx,
        hp=hp, impl=impl)
  else:
    params, opt_state, finite, metrics = _ppo_update(
        state["params"], state["opt_state"], batch, ref_lp, mask, rng, policy_gd=policy_gd,
        value_gd=value_gd, tx=tx, hp=hp, impl=impl)
  metrics.update(score=jnp.mean(_f32(batch["scores"])),
                 response_len=jnp.mean(jnp.sum(mask, -1)),
                 lr=schedule(state["step"] * hp.updates_per_iteration),
                 nonfinite=1.0 - _f32(finite))
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


# ---------------------------------------------------------------------------
# Setup.


@dataclasses.dataclass
class RLSetup:
  """Everything `train_rl` needs: mesh, settings, state (mutable), frozen reference,
  shardings and the two jitted functions (`sample_fn`, `update_fn`)."""

  mesh: jax.sharding.Mesh
  hp: RLHParams
  graphdefs: tuple
  state: dict
  ref_params: dict
  param_sh: dict
  opt_sh: object
  sample_fn: object
  update_fn: object
  meta: dict


def copy_tree(tree):
  """Fresh buffers with the same shardings (the policy's are donated)."""
  return jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                 out_shardings=jax.tree.map(lambda x: x.sharding, tree))(tree)


def _scalar_model_from(source, cfg, config, mesh, backbone):
  """(graphdef, params) of a critic/RM: a `rm` run's params, or `backbone` + zero head."""
  graphdef, params = reward_model.create(cfg, mesh, seed=config.seed, backbone=backbone)
  if source:
    src = ckpt_lib.Checkpointer(source, read_only=True)
    if src.latest_step() is None:
      raise FileNotFoundError(f"scalar-head model source {source!r} has no checkpoint")
    params = src.restore_params(params, jax.tree.map(lambda x: x.sharding, params))
  return graphdef, params


def setup_rl(config, mesh=None, tokenizer=None) -> RLSetup:
  """Policy, reference, optional critic, optimiser state and the jitted functions."""
  mesh = shd.make_mesh(config.mesh) if mesh is None else mesh
  r = config.rl
  hp = RLHParams.from_config(r)
  n = r.prompts_per_step * r.samples_per_prompt
  if hp.algo == "ppo" and n % hp.minibatches:
    raise ValueError(f"rollout rows {n} (prompts_per_step x samples_per_prompt) must divide "
                     f"into rl.minibatches={hp.minibatches}")
  mb = n // hp.minibatches if hp.algo == "ppo" else n
  for rows, what in ((n, "rollout batch"), (mb, "PPO minibatch")):
    shd.logical_to_spec(("batch",), shape=(rows,), mesh=mesh, what=what)
  tok = tokenizer or inputs.tokenizer(config.data)
  model_cfg, policy_gd, policy = train.model_from_source(config.init_from, config, mesh)
  ref_source = config.reference_from or config.init_from
  ref_params = copy_tree(policy) if ref_source == config.init_from else \
      train.model_from_source(ref_source, config, mesh)[2]
  params, value_gd = {"policy": policy}, None
  if hp.algo == "ppo":
    value_gd, params["value"] = _scalar_model_from(r.value_from, model_cfg, config, mesh,
                                                   copy_tree(policy))
  total = config.train.steps * hp.updates_per_iteration
  rep = NamedSharding(mesh, P())
  with shd.use_mesh(mesh):
    schedule, tx, state, state_sh = train.init_train_state(config.optim, total, params, mesh)
  param_sh, opt_sh = state_sh["params"], state_sh["opt_state"]
  batch_sh = shd.batch_sharding(mesh, 1)
  sample_fn = jax.jit(functools.partial(
      rollout.sample, graphdef=policy_gd, max_new_tokens=r.max_new_tokens, eos_id=tok.eos_id,
      pad_id=tok.pad_id), in_shardings=(param_sh["policy"], batch_sh, batch_sh, rep),
      out_shardings=batch_sh)
  update_fn = jax.jit(functools.partial(
      rl_update, graphdefs=(policy_gd, value_gd), tx=tx, schedule=schedule, hp=hp,
      impl=config.train.kernel_impl), in_shardings=(state_sh, param_sh["policy"], batch_sh, rep),
      out_shardings=(state_sh, rep), donate_argnums=(0,))
  meta = {"model": model_cfg.to_dict(), "reference": ref_source or f"init:seed={config.seed}",
          "algo": hp.algo, "reward": r.reward}
  return RLSetup(mesh, hp, (policy_gd, value_gd), state, ref_params, param_sh, opt_sh,
                 sample_fn, update_fn, meta)


def make_scorer(config, s: RLSetup, ins):
  """Ground-truth scorer of the synthetic task, or a frozen reward model ("rm:<workdir>")."""
  src = config.rl.reward
  if src == "ground_truth":
    if config.data.source != "synthetic":
      raise ValueError("rl.reward='ground_truth' needs synthetic data; give rm:<workdir>")
    return rollout.GroundTruthScorer(config.data.task, ins.pairs(config.data.train_split),
                                     ins.tokenizer)
  if not src.startswith("rm:") or len(src) == 3:
    raise ValueError(f"rl.reward must be 'ground_truth' or 'rm:<workdir>', got {src!r}")
  cfg = ml_collections.ConfigDict(ckpt_lib.Checkpointer(src[3:], read_only=True).meta()["model"])
  gd, params = _scalar_model_from(src[3:], cfg, config, s.mesh, None)
  bsh = shd.batch_sharding(s.mesh, 1)
  return rollout.RewardModelScorer(
      gd, params, (jax.tree.map(lambda x: x.sharding, params), bsh, bsh), bsh)


def collect(s: RLSetup, prompts, scorer, step: int, seed: int) -> dict:
  """Samples and scores the rollout of iteration `step` (host dict + device arrays)."""
  pb = prompts.batch(step)
  k = s.hp.samples_per_prompt
  tok, pmask = np.repeat(pb["tokens"], k, 0), np.repeat(pb["attention_mask"], k, 0)
  rng = jax.random.fold_in(jax.random.key(seed), step)
  with shd.use_mesh(s.mesh):
    gen = s.sample_fn(s.state["params"]["policy"], *shd.shard_batch((tok, pmask), s.mesh), rng)
    batch = rollout.assemble(tok, pmask, jax.device_get(gen))
    batch["scores"] = np.asarray(jax.device_get(scorer(np.repeat(pb["ids"], k), batch)),
                                 np.float32)
  return batch


# ---------------------------------------------------------------------------
# The loops.


def train_rl(config, workdir: str, *, setup: RLSetup | None = None, scorer=None,
             prompts=None) -> dict:
  """Runs (or resumes) RL from `config.init_from`; returns the last metrics and eval.

  `setup` (from `setup_rl`, e.g. on a chosen mesh) is used and updated in
  place (`setup.state` holds the final state). `scorer(ids, rollout) -> [N]`
  and `prompts` (with `.batch(step)`) replace the configured reward and
  prompt source (the bandit tests inject both).
  """
  train.maybe_init_distributed(config)
  ins = inputs.Inputs(config.data)
  s = setup or setup_rl(config, tokenizer=ins.tokenizer)
  r, t = config.rl, config.train
  prompts = prompts or rollout.DatasetPrompts(
      ins.pairs(config.data.train_split), batch_size=r.prompts_per_step, seed=config.data.data_seed,
      pad_id=ins.tokenizer.pad_id)
  scorer = scorer or make_scorer(config, s, ins)
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=t.max_to_keep)
  start = ckpt.latest_step() or 0
  if start:
    ckpt_lib.check_meta(ckpt.meta(start), s.meta["model"], s.meta["reference"], workdir)
    with shd.use_mesh(s.mesh):
      params, opt_state, _ = ckpt.restore(start, s.state["params"], s.param_sh,
                                          s.state["opt_state"], s.opt_sh)
    s.state = {"params": params, "opt_state": opt_state,
               "step": jax.device_put(jnp.int32(start), NamedSharding(s.mesh, P()))}
    log.info("resumed %s at step %d", workdir, start)
  writer = writers.MetricWriter(workdir, total_steps=t.steps, initial_step=start,
                                active=jax.process_index() == 0, tensorboard=t.tensorboard,
                                progress=t.progress)
  report = lambda step: rollout.policy_report(
      config, s.mesh, s.graphdefs[0], s.state["params"]["policy"], s.ref_params, ins,
      beta=r.beta, step=step, kl_prompts=r.eval_kl_prompts,
      kl_max_new_tokens=r.max_new_tokens) if config.data.eval_split else {}
  last, step = {}, start
  with ckpt_lib.sigterm_flag() as preempted:
    try:
      while step < t.steps and not preempted["set"]:
        t0 = time.perf_counter()
        batch = collect(s, prompts, scorer, step, config.seed)
        t_gen = time.perf_counter() - t0
        with shd.use_mesh(s.mesh):
          dev = shd.shard_batch({k: batch[k] for k in ROLLOUT_KEYS}, s.mesh)
          rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)
          s.state, metrics = s.update_fn(s.state, s.ref_params, dev, rng)
        step += 1
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        n_gen = int(batch["response_mask"].sum())
        last.update(iteration_s=time.perf_counter() - t0, rollout_s=t_gen,
                    rollout_tokens_per_s=n_gen / max(t_gen, 1e-9))
        if last["nonfinite"]:
          raise train.NonFiniteError(f"non-finite RL loss/gradient at step {step}; the update was "
                                     "skipped and the run stopped (last checkpoint intact).")
        if step % t.log_every == 0 or step == t.steps:
          writer.write(step, "train", last)
        if step % t.ckpt_every == 0 or step == t.steps:
          ckpt.save(step, s.state["params"], s.state["opt_state"], {"step": step}, s.meta)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
          writer.write(step, "eval", report(step))
      if preempted["set"]:
        ckpt.save_final(step, s.state["params"], s.state["opt_state"], {"step": step}, s.meta)
        log.warning("SIGTERM: saved step %d in %s and stopped", step, workdir)
        return dict(last, step=step, preempted=True)
      ckpt.wait()
      final = report(step)
      if final and step > start:  # a finished run re-reports without re-logging
        writer.write(step, "eval", final)
      return dict(last, step=step, preempted=False, eval=final)
    finally:
      ckpt.close()
      writer.close()

