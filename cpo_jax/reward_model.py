"""Scalar-head decoders: the Bradley–Terry reward model and the PPO critic.

    cpo-jax rm --config=cpo_jax/configs/rm_small_lm.py --workdir=/tmp/rm

`ScalarHeadModel` is the Flax decoder (`cpo_jax.models.Transformer`) with a
linear head ``s_t = h_t . w + b`` on its final hidden states. As a reward
model it scores a whole sequence by ``s`` at the last real token; as a PPO
critic ``s_t`` is the value of the state after token t. The head starts at
zero, so an untrained critic predicts 0 and an untrained RM ranks nothing.

`rm_step` is the module-level pure training step (jitted with shardings and
donation by `train_rm` below): Bradley–Terry loss
``softplus(m - (r_w - r_l))`` (`cpo_jax.rlhf.bt_reward_loss`) with the
optional margin ``m = rm.margin + rm.margin_dr_scale * dr`` (dr = known true
reward gap, synthetic data only; 0 where unknown), AdamW, clipping, and a
non-finite guard that leaves the state unchanged. Metrics (on device, over
valid pairs): loss, ``accuracy`` = mean[r_w > r_l] against the labels,
``accuracy_gt`` = mean[sign(r_w - r_l) = sign(dr)] against the ground-truth
ranking (pairs with known dr != 0), ``margin`` = mean(r_w - r_l), and
``reward_mean`` / ``reward_std`` over both responses.

`train_rm` is its loop: Orbax checkpoints of params, optimiser and data
iterator (resumed by default, `checkpoint.check_meta` refuses another model
or init), JSONL/TensorBoard logging with metrics read one step late, and
held-out evaluation. SIGTERM saves the current step and returns
``preempted=True``, as in the preference trainer. It has no gradient
accumulation (the preference trainer has).
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cpo_jax import checkpoint as ckpt_lib
from cpo_jax import inputs, rlhf, train, writers
from cpo_jax import sharding as shd
from cpo_jax.models import Transformer

log = logging.getLogger(__name__)


class ScalarHeadModel(nnx.Module):
  """Decoder backbone + linear scalar head (reward model or value model)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.backbone = Transformer(cfg, rngs=rngs)
    dtype = jnp.dtype(cfg.param_dtype)
    self.head = nnx.Param(jnp.zeros((cfg.d_model,), dtype), out_sharding=("embed",),
                          eager_sharding=False)
    self.bias = nnx.Param(jnp.zeros((), dtype), out_sharding=(), eager_sharding=False)

  def token_scores(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 [B, L]: the head on every position's final hidden state."""
    h, _ = self.backbone.hidden(tokens, mask)
    s = jnp.einsum("bld,d->bl", h, self.head[...].astype(h.dtype),
                   preferred_element_type=jnp.float32)
    return s + self.bias[...].astype(jnp.float32)

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 [B]: the score at each row's last real token (any padding side)."""
    mask = mask.astype(bool)
    last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[-1])[None, :], 0), axis=-1)
    return jnp.take_along_axis(self.token_scores(tokens, mask), last[:, None], axis=-1)[:, 0]


def create(cfg, mesh, *, seed: int = 0, backbone=None):
  """(graphdef, params pure dict) created sharded; `backbone` optionally replaces
  the decoder's parameters (a `Transformer` pure dict with matching shapes)."""
  graphdef, state = shd.create_sharded(lambda: ScalarHeadModel(cfg, rngs=nnx.Rngs(seed)), mesh)
  params = nnx.to_pure_dict(state)
  if backbone is not None:
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
    if shapes(backbone) != shapes(params["backbone"]):
      raise ValueError("backbone parameters do not match the scalar-head model config")
    params = dict(params, backbone=backbone)
  return graphdef, params


def pair_rewards(graphdef, params, batch) -> jax.Array:
  """[B, 2] rewards of (chosen, rejected) for a pair batch (tokens [B, 2, L])."""
  b, _, l = batch["tokens"].shape
  model = nnx.merge(graphdef, params)
  r = model(batch["tokens"].reshape(2 * b, l), batch["attention_mask"].reshape(2 * b, l))
  return r.reshape(b, 2)


def rm_outputs(params, batch, *, graphdef, margin: float, margin_dr_scale: float):
  """(per-pair loss [B], per-pair metrics {name: [B]}) of one pair batch."""
  rewards = pair_rewards(graphdef, params, batch)
  dr = batch["dr"].astype(jnp.float32)
  known = jnp.isfinite(dr) & (dr != 0)
  dr0 = jnp.where(known, dr, 0.0)
  loss, m = rlhf.bt_reward_loss(rewards, margin=margin + margin_dr_scale * dr0)
  gap = m["reward_gap"]
  return loss, {
      "accuracy": m["accuracy"],
      "accuracy_gt": jnp.where(known, (gap * dr0 > 0), False).astype(jnp.float32),
      "gt_known": known.astype(jnp.float32),
      "margin": gap,
      "reward_sum": rewards[:, 0] + rewards[:, 1],
      "reward_sq_sum": jnp.square(rewards[:, 0]) + jnp.square(rewards[:, 1]),
  }


def reduce_metrics(sums: dict, n_valid) -> dict:
  """Scalar metrics from per-pair metric sums over `n_valid` pairs."""
  n = jnp.maximum(n_valid, 1.0)
  mean = sums["reward_sum"] / (2 * n)
  var = jnp.maximum(sums["reward_sq_sum"] / (2 * n) - jnp.square(mean), 0.0)
  return {"loss": sums["loss"] / n, "accuracy": sums["accuracy"] / n,
          "accuracy_gt": sums["accuracy_gt"] / jnp.maximum(sums["gt_known"], 1.0),
          "margin": sums["margin"] / n, "reward_mean": mean, "reward_std": jnp.sqrt(var)}


def _sums(params, batch, *, graphdef, margin, margin_dr_scale):
  loss, m = rm_outputs(params, batch, graphdef=graphdef, margin=margin,
                       margin_dr_scale=margin_dr_scale)
  valid = batch["valid"].astype(jnp.float32)
  sums = {k: jnp.sum(v * valid) for k, v in dict(m, loss=loss).items()}
  return sums["loss"] / jnp.maximum(jnp.sum(valid), 1.0), (sums, jnp.sum(valid))


def rm_step(state, batch, *, graphdef, tx, schedule, margin: float, margin_dr_scale: float):
  """One AdamW step of the Bradley–Terry loss; returns (new_state, scalar metrics)."""
  (loss, (sums, n)), grads = jax.value_and_grad(_sums, has_aux=True)(
      state["params"], batch, graphdef=graphdef, margin=margin, margin_dr_scale=margin_dr_scale)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_params = optax.apply_updates(state["params"], updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = {"params": keep(new_params, state["params"]),
               "opt_state": keep(opt_state, state["opt_state"]), "step": state["step"] + 1}
  metrics = dict(reduce_metrics(sums, n), grad_norm=grad_norm, lr=schedule(state["step"]),
                 nonfinite=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


def rm_eval_sums(params, batch, *, graphdef, margin: float, margin_dr_scale: float):
  """(metric sums, valid count) of one held-out batch (no gradient)."""
  return _sums(params, batch, graphdef=graphdef, margin=margin,
               margin_dr_scale=margin_dr_scale)[1]


def train_rm(config, workdir: str, *, mesh=None) -> dict:
  """Trains (or resumes) a Bradley–Terry reward model; returns last train/eval metrics."""
  train.maybe_init_distributed(config)
  mesh = shd.make_mesh(config.mesh) if mesh is None else mesh
  ins = inputs.Inputs(config.data)
  it = ins.train_iterator()
  model_cfg, _, backbone = train.model_from_source(config.init_from, config, mesh)
  graphdef, params = create(model_cfg, mesh, seed=config.seed, backbone=backbone)
  t, total = config.train, config.train.steps
  rep = NamedSharding(mesh, P())
  hp = dict(margin=config.rm.margin, margin_dr_scale=config.rm.margin_dr_scale)
  with shd.use_mesh(mesh):
    schedule, tx, state, state_sh = train.init_train_state(config.optim, total, params, mesh)
  opt_state = state["opt_state"]
  param_sh, opt_sh = state_sh["params"], state_sh["opt_state"]
  bsh = shd.batch_sharding(mesh, 1)
  step_fn = jax.jit(functools.partial(rm_step, graphdef=graphdef, tx=tx,
                                      schedule=schedule, **hp),
                    in_shardings=(state_sh, bsh), out_shardings=(state_sh, rep),
                    donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(rm_eval_sums, graphdef=graphdef, **hp),
                    in_shardings=(param_sh, bsh), out_shardings=rep)
  meta = {"model": model_cfg.to_dict(), "reference": f"rm-init:{config.init_from or 'random'}",
          "kind": "reward_model"}
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=t.max_to_keep)
  start = ckpt.latest_step() or 0
  if start:
    ckpt_lib.check_meta(ckpt.meta(start), meta["model"], meta["reference"], workdir)
    with shd.use_mesh(mesh):
      params, opt_state, data_state = ckpt.restore(start, params, param_sh, opt_state, opt_sh)
    it.set_state(data_state)
  state = {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.int32(start), rep)}
  writer = writers.MetricWriter(workdir, total_steps=total, initial_step=start,
                                active=jax.process_index() == 0, tensorboard=t.tensorboard,
                                progress=t.progress)

  def evaluate_rm():
    if not config.data.eval_split:
      return {}
    sums, n = None, 0.0
    with shd.use_mesh(mesh):
      for b in ins.eval_iterator(t.eval_batch_size):
        bs, bn = jax.device_get(eval_fn(state["params"], train.device_batch(b, mesh)))
        sums = bs if sums is None else jax.tree.map(np.add, sums, bs)
        n += float(bn)
    return {k: float(v) for k, v in reduce_metrics(sums, n).items()}

  def emit(step, metrics, t0):  # reads one step's metrics (blocks on that step only)
    out = dict({k: float(v) for k, v in jax.device_get(metrics).items()},
               step_time_s=time.perf_counter() - t0)
    if out["nonfinite"]:
      raise train.NonFiniteError(f"non-finite reward-model loss at step {step}; the update was "
                                 "skipped and the run stopped (last checkpoint intact).")
    if step % t.log_every == 0 or step == total:
      writer.write(step, "train", out)
    return out

  last, step, pending = {}, start, None
  with ckpt_lib.sigterm_flag() as preempted:
    try:
      while step < total and not preempted["set"]:
        t0 = time.perf_counter()
        with shd.use_mesh(mesh):
          state, metrics = step_fn(state, train.device_batch(next(it), mesh))
        step += 1
        if pending is not None:  # the previous step's metrics, one step late
          last = emit(*pending)
        pending = (step, metrics, t0)
        if step % t.ckpt_every == 0 or step == total:
          last, pending = emit(*pending), None
          ckpt.save(step, state["params"], state["opt_state"], it.get_state(), meta)
        if t.eval_every and step % t.eval_every == 0 and step < total:
          writer.write(step, "eval", evaluate_rm())
      if pending is not None:
        last = emit(*pending)
      if preempted["set"]:
        ckpt.save_final(step, state["params"], state["opt_state"], it.get_state(), meta)
        log.warning("SIGTERM: saved step %d in %s and stopped", step, workdir)
        return dict(last, step=step, preempted=True)
      ckpt.wait()
      final = evaluate_rm()
      if final and step > start:  # a finished run re-reports without re-logging
        writer.write(step, "eval", final)
      return dict(last, step=step, preempted=False, eval=final)
    finally:
      ckpt.close()
      writer.close()
