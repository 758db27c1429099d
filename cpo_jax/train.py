"""Preference training: a module-level jitted step, Orbax resume, metrics.

    cpo-jax train --config=cpo_jax/configs/small_lm.py:dpo --workdir=/tmp/run

`train_step` is a pure function of (state, ref_params, batch): policy
log-probs through `cpo_jax.models.token_logprobs` (the kernel API), the
frozen reference's log-probs in the same step under `stop_gradient` (or
`batch["ref_logps_sum"]` from a reference cache), any registered loss (or
"sft", the NLL of the chosen response), gradient accumulation over
micro-batches that equals the large-batch step, clipping, AdamW with
warm-up + cosine, and the metrics of DESIGN.md section 4, all on device.
A non-finite loss or gradient leaves the state unchanged and sets
`nonfinite`; the host then stops with `NonFiniteError`, keeping the last
good checkpoint. The model has no dropout, so the step takes no PRNG key;
evaluation sampling uses `fold_in(key(seed), step)`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cpo_jax import checkpoint as ckpt_lib
from cpo_jax import diagnostics, evaluate, inputs, losses, writers
from cpo_jax import sharding as shd
from cpo_jax.models import Transformer, load_hf, token_logprobs

log = logging.getLogger(__name__)
DEVICE_KEYS = ("tokens", "loss_mask", "attention_mask", "dr", "valid", "group", "ref_logps_sum")


class NonFiniteError(RuntimeError):
  """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static (hashable) loss settings of a compiled step."""

  name: str
  reduction: str
  hparams: tuple  # ((name, value), ...) keyword hyper-parameters of the loss fn

  @classmethod
  def from_config(cls, lcfg) -> "LossConfig":
    if lcfg.name == "sft":
      return cls("sft", "sum", ())
    spec = losses.get_loss(lcfg.name)
    accepted = inspect.signature(spec.fn).parameters
    hp = tuple((k, lcfg[k]) for k in sorted(lcfg.keys())
               if k in accepted and k not in ("logps", "ref_logps"))
    return cls(lcfg.name, lcfg.logp_reduction or spec.logp_reduction, hp)


# ---------------------------------------------------------------------------
# Optimiser.


def make_schedule(ocfg, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio`.

  Step k (0-based) uses the warm-up value of k + 1, so the first update is
  not wasted on a zero learning rate.
  """
  warmup = min(ocfg.warmup_steps, max(total_steps - 1, 0))
  base = optax.warmup_cosine_decay_schedule(
      0.0, ocfg.lr, warmup, max(total_steps, warmup + 1), end_value=ocfg.lr * ocfg.min_lr_ratio)
  return lambda count: base(count + 1)


def make_optimizer(ocfg, total_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(make_schedule(ocfg, total_steps), b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                      weight_decay=ocfg.weight_decay)
  return optax.chain(optax.clip_by_global_norm(ocfg.clip_norm), adamw) if ocfg.clip_norm else adamw


# ---------------------------------------------------------------------------
# The step.


def sequence_logps(graphdef, params, batch, impl: str):
  """Summed response log-probs and response token counts, both [B, 2] float32."""
  out = token_logprobs(nnx.merge(graphdef, params), batch["tokens"], batch["attention_mask"],
                       target_mask=batch["loss_mask"], impl=impl)
  return out.seq_logprobs, out.token_count


def pair_outputs(params, ref_params, batch, *, graphdef, loss: LossConfig, impl: str):
  """Per-pair loss [B] and per-pair metrics {name: [B]} of one (micro-)batch."""
  if loss.name == "sft":  # NLL of the chosen response only (weight = its tokens)
    chosen = {k: batch[k][:, :1] for k in ("tokens", "attention_mask", "loss_mask")}
    lp_sum, count = sequence_logps(graphdef, params, chosen, impl)
    return -lp_sum[:, 0], {"nll_tokens": count[:, 0]}
  lp_sum, count = sequence_logps(graphdef, params, batch, impl)
  if "ref_logps_sum" in batch:
    ref_sum = batch["ref_logps_sum"].astype(jnp.float32)
  else:
    ref_sum = sequence_logps(graphdef, ref_params, batch, impl)[0]
  ref_sum = jax.lax.stop_gradient(ref_sum)
  mean = lambda x: x / jnp.maximum(count, 1.0)
  lp, ref_lp = (lp_sum, ref_sum) if loss.reduction == "sum" else (mean(lp_sum), mean(ref_sum))
  spec = losses.get_loss(loss.name)
  loss_b, m = spec.fn(lp, ref_lp, **dict(loss.hparams))
  delta_ref = ref_lp[:, 0] - ref_lp[:, 1]
  dr = batch["dr"].astype(jnp.float32)
  known = jnp.isfinite(dr)
  beta = dict(loss.hparams)["beta"]
  m = {k: v for k, v in m.items() if k in _PAIR_METRICS}
  m.update(
      delta_ref_sum=ref_sum[:, 0] - ref_sum[:, 1],
      delta_ref_mean=mean(ref_sum)[:, 0] - mean(ref_sum)[:, 1],
      ref_prefers_rejected=(delta_ref < 0).astype(jnp.float32),
      violating=jnp.where(known, diagnostics.violates_assumption(
          delta_ref, jnp.where(known, dr, 0.0), beta=beta), False).astype(jnp.float32),
      dr_known=known.astype(jnp.float32),
      logp_chosen=lp[:, 0], logp_rejected=lp[:, 1])
  return loss_b, m


_PAIR_METRICS = ("delta", "delta_ref", "rewards_chosen", "rewards_rejected", "margin",
                 "accuracy_relative", "accuracy_absolute", "in_U")


def _micro_loss(params, ref_params, batch, *, graphdef, loss, impl):
  """(sum of weighted losses, (total weight, metric sums)) of one micro-batch."""
  loss_b, m = pair_outputs(params, ref_params, batch, graphdef=graphdef, loss=loss, impl=impl)
  valid = batch["valid"].astype(jnp.float32)
  if loss.name == "sft":  # mean NLL per response token
    return jnp.sum(loss_b * valid), (jnp.sum(valid * m["nll_tokens"]), {})
  return jnp.sum(loss_b * valid), (jnp.sum(valid), {k: jnp.sum(v * valid) for k, v in m.items()})


def train_step(state, ref_params, batch, *, graphdef, tx, schedule, loss: LossConfig,
               accum: int, impl: str):
  """One optimiser step on `batch` split into `accum` equal micro-batches.

  Gradients and metric sums add up over micro-batches and are divided by
  the total weight (valid pairs; tokens for "sft") once, so the update is
  that of the whole batch. Returns (new_state, metrics of scalars).
  """
  grad_fn = jax.value_and_grad(
      functools.partial(_micro_loss, graphdef=graphdef, loss=loss, impl=impl), has_aux=True)
  params = state["params"]
  if accum == 1:
    (num, (den, sums)), grads = grad_fn(params, ref_params, batch)
  else:
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
    micro = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, ref_params, first))

    def body(acc, mb):
      return jax.tree.map(jnp.add, acc, grad_fn(params, ref_params, mb)), None

    ((num, (den, sums)), grads), _ = jax.lax.scan(body, zeros, micro)
  den = jnp.maximum(den, 1.0)
  grads = jax.tree.map(lambda g: g / den, grads)
  loss_value = num / den
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = {"params": keep(new_params, params), "opt_state": keep(opt_state, state["opt_state"]),
               "step": state["step"] + 1}
  metrics = {k: v / den for k, v in sums.items() if k != "dr_known"}
  if "violating" in sums:  # fraction among pairs with a known reward gap
    metrics["violating"] = sums["violating"] / jnp.maximum(sums["dr_known"], 1.0)
  metrics.update(loss=loss_value, grad_norm=grad_norm, lr=schedule(state["step"]),
                 nonfinite=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


def eval_step(params, ref_params, batch, *, graphdef, loss: LossConfig, impl: str):
  """Per-pair loss and metrics {name: [B]} (no gradient), for held-out evaluation."""
  loss_b, m = pair_outputs(params, ref_params, batch, graphdef=graphdef, loss=loss, impl=impl)
  return dict(m, loss=loss_b, valid=batch["valid"].astype(jnp.float32), dr=batch["dr"],
              group=batch["group"])


# ---------------------------------------------------------------------------
# Model, reference and state.


def model_from_source(source: str, config, mesh):
  """(model_cfg, graphdef, params pure dict) from "", "hf:<dir>" or a run workdir."""
  if source.startswith("hf:"):
    cfg, graphdef, state = load_hf(source[3:], mesh=mesh, param_dtype=config.model.param_dtype,
                                   dtype=config.model.dtype)
    cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    cfg.remat = config.model.remat
    return cfg, graphdef, nnx.to_pure_dict(state)
  if source:
    src = ckpt_lib.Checkpointer(source, read_only=True)
    if src.latest_step() is None:
      raise FileNotFoundError(f"init/reference source {source!r} has no checkpoint")
    cfg = ml_collections.ConfigDict(src.meta()["model"])
    cfg.update(dtype=config.model.dtype, remat=config.model.remat)
  else:
    cfg = ml_collections.ConfigDict(config.model.to_dict())
  make = lambda: Transformer(cfg, rngs=nnx.Rngs(config.seed))
  graphdef, state = shd.create_sharded(make, mesh)
  params = nnx.to_pure_dict(state)
  if source:
    params = src.restore_params(params, jax.tree.map(lambda x: x.sharding, params))
  return cfg, graphdef, params


def _copy(tree):
  return jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                 out_shardings=jax.tree.map(lambda x: x.sharding, tree))(tree)


def compiled_eval(graphdef, loss, mesh, param_sh, *, impl):
  """The jitted eval step (per-pair outputs, replicated)."""
  ref_sh = None if loss.name == "sft" else param_sh
  return jax.jit(functools.partial(eval_step, graphdef=graphdef, loss=loss, impl=impl),
                 in_shardings=(param_sh, ref_sh, shd.batch_sharding(mesh, 1)),
                 out_shardings=NamedSharding(mesh, P()))


def compiled_step(graphdef, tx, schedule, loss, mesh, param_sh, opt_sh, *, accum, impl):
  """The jitted train step with explicit in/out shardings; the state is donated."""
  rep = NamedSharding(mesh, P())
  batch_sh = shd.batch_sharding(mesh, 1)  # a prefix: splits dim 0 of every batch field
  state_sh = {"params": param_sh, "opt_state": opt_sh, "step": rep}
  ref_sh = None if loss.name == "sft" else param_sh
  return jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                   loss=loss, accum=accum, impl=impl),
                 in_shardings=(state_sh, ref_sh, batch_sh), out_shardings=(state_sh, rep),
                 donate_argnums=(0,))


def evaluate_workdir(config, workdir: str, *, split: str | None = None) -> dict:
  """Evaluates the latest checkpoint of `workdir` (the CLI's `eval`)."""
  mesh = shd.make_mesh(config.mesh)
  loss = LossConfig.from_config(config.loss)
  if split:
    config.data.eval_split = split
  step = ckpt_lib.Checkpointer(workdir, read_only=True).latest_step()
  _, graphdef, params = model_from_source(workdir, config, mesh)
  ref_source = config.reference_from or config.init_from
  ref_params = None if loss.name == "sft" else model_from_source(ref_source, config, mesh)[2]
  ev = compiled_eval(graphdef, loss, mesh, jax.tree.map(lambda x: x.sharding, params),
                     impl=config.train.kernel_impl)
  with shd.use_mesh(mesh):
    out = evaluate.Evaluator(config, inputs.Inputs(config.data), mesh, graphdef, ev)(
        params, ref_params, step)
  return dict(out, step=step)


def device_batch(batch: dict, mesh):
  """The fields the step reads, placed batch-sharded on the mesh."""
  return shd.shard_batch({k: v for k, v in batch.items() if k in DEVICE_KEYS}, mesh)


def maybe_init_distributed(config) -> None:
  if (config.multihost or os.environ.get("JAX_COORDINATOR_ADDRESS")) and \
      not jax.distributed.is_initialized():
    jax.distributed.initialize()


# ---------------------------------------------------------------------------
# The loop.


def opt_shardings(tx, params, param_sh, mesh):
  """Optimiser-state shardings: moments like their parameter, scalars replicated."""
  return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_sh,
                               transform_non_params=lambda _: NamedSharding(mesh, P()))


class TrainState(NamedTuple):
  """A freshly initialised, sharded training state and how it is laid out."""

  schedule: optax.Schedule
  tx: optax.GradientTransformation
  state: dict            # {"params", "opt_state", "step"}, sharded
  state_sh: dict         # the same tree of NamedShardings


def init_train_state(ocfg, total_steps: int, params, mesh) -> TrainState:
  """AdamW + schedule for `params`, with its state created directly sharded.

  Optimiser moments are sharded like their parameter; scalars are replicated.
  Call inside `shd.use_mesh(mesh)`.
  """
  rep = NamedSharding(mesh, P())
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  schedule, tx = make_schedule(ocfg, total_steps), make_optimizer(ocfg, total_steps)
  opt_sh = opt_shardings(tx, params, param_sh, mesh)
  state = {"params": params, "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(params),
           "step": jax.device_put(jnp.int32(0), rep)}
  return TrainState(schedule, tx, state, {"params": param_sh, "opt_state": opt_sh, "step": rep})


@dataclasses.dataclass
class Setup:
  """Everything a run needs on device: model, frozen reference, state, compiled steps."""

  mesh: jax.sharding.Mesh
  loss: LossConfig
  model_cfg: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  state: dict            # {"params", "opt_state", "step"}, sharded
  ref_params: dict | None  # frozen reference (None for "sft"); never saved
  param_sh: dict
  opt_sh: object
  step_fn: Callable
  eval_fn: Callable
  meta: dict             # saved with every checkpoint, checked on resume


def setup(config, mesh: jax.sharding.Mesh | None = None) -> Setup:
  """Builds the policy, reference, optimiser state and the jitted steps for `config`."""
  mesh = shd.make_mesh(config.mesh) if mesh is None else mesh
  loss = LossConfig.from_config(config.loss)
  if config.data.batch_size % config.optim.grad_accum:
    raise ValueError("data.batch_size must be a multiple of optim.grad_accum")
  # Model creation enters the mesh itself (nnx.eval_shape must run outside it).
  model_cfg, graphdef, params = model_from_source(config.init_from, config, mesh)
  ref_source = config.reference_from or config.init_from
  ref_params = None
  if loss.name != "sft":
    if ref_source == config.init_from:
      ref_params = _copy(params)  # separate buffers: the policy's are donated
    else:
      ref_params = model_from_source(ref_source, config, mesh)[2]
  total, impl = config.train.steps, config.train.kernel_impl
  with shd.use_mesh(mesh):
    schedule, tx, state, state_sh = init_train_state(config.optim, total, params, mesh)
  param_sh, opt_sh = state_sh["params"], state_sh["opt_state"]
  meta = {"model": model_cfg.to_dict(), "reference": ref_source or f"init:seed={config.seed}",
          "loss": loss.name}
  return Setup(mesh, loss, model_cfg, graphdef, state, ref_params, param_sh, opt_sh,
               compiled_step(graphdef, tx, schedule, loss, mesh, param_sh, opt_sh,
                             accum=config.optim.grad_accum, impl=impl),
               compiled_eval(graphdef, loss, mesh, param_sh, impl=impl), meta)


def train(config: ml_collections.ConfigDict, workdir: str, *, data=None) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns final metrics.

  `data` optionally replaces the training iterator (anything with
  `__next__`, `get_state`, `set_state`). Raises `NonFiniteError` on NaN/inf,
  `checkpoint.ConfigMismatchError` when resuming another model.
  On SIGTERM the current step is saved and the function returns early with
  `{"preempted": True, ...}`.
  """
  maybe_init_distributed(config)
  ins = inputs.Inputs(config.data)
  it = data if data is not None else ins.train_iterator()
  total = config.train.steps
  s = setup(config)
  mesh, meta, ref_params, step_fn = s.mesh, s.meta, s.ref_params, s.step_fn
  state = s.state
  with shd.use_mesh(mesh), ckpt_lib.sigterm_flag() as preempted:
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.train.max_to_keep)
    start = ckpt.latest_step() or 0
    if start:
      ckpt_lib.check_meta(ckpt.meta(start), meta["model"], meta["reference"], workdir)
      params, opt_state, data_state = ckpt.restore(start, state["params"], s.param_sh,
                                                   state["opt_state"], s.opt_sh)
      it.set_state(data_state)
      state = {"params": params, "opt_state": opt_state,
               "step": jax.device_put(jnp.int32(start), NamedSharding(mesh, P()))}
      log.info("resumed %s at step %d", workdir, start)
    writer = writers.MetricWriter(workdir, total_steps=total, initial_step=start,
                                  active=jax.process_index() == 0,
                                  tensorboard=config.train.tensorboard,
                                  progress=config.train.progress)
    evaluator = evaluate.Evaluator(config, ins, mesh, s.graphdef, s.eval_fn)
    pending, last, step, clock = None, {}, start, [time.perf_counter()]
    try:
      while step < total and not preempted["set"]:
        try:
          host_batch = next(it)
        except StopIteration:
          break
        n_tok = int(np.sum(host_batch["attention_mask"]) * jax.process_count())
        state, metrics = step_fn(state, ref_params, device_batch(host_batch, mesh))
        step += 1
        if pending is not None:  # metrics of the previous step, one step late
          last = _emit(writer, *pending, clock, config)
        pending = (step, metrics, n_tok)
        if step % config.train.ckpt_every == 0 or step == total:
          last = _emit(writer, *pending, clock, config)
          pending = None
          ckpt.save(step, state["params"], state["opt_state"], it.get_state(), meta)
        if config.train.eval_every and step % config.train.eval_every == 0 and step < total:
          writer.write(step, "eval", evaluator(state["params"], ref_params, step))
      if pending is not None:
        last = _emit(writer, *pending, clock, config)
      ckpt.save_final(step, state["params"], state["opt_state"], it.get_state(), meta)
      if preempted["set"]:
        log.warning("SIGTERM: saved step %d in %s and stopped", step, workdir)
        return dict(last, step=step, preempted=True)
      final = evaluator(state["params"], ref_params, step)
      if step > start:  # a finished run re-opened only re-reports its final eval
        writer.write(step, "eval", final)
      return dict(last, step=step, preempted=False, eval=final)
    finally:
      ckpt.close()
      writer.close()


def _emit(writer, step, metrics, n_tok, clock, config) -> dict:
  """Fetches one step's metrics (blocks on that step only), checks them, logs them.

  step_time_s is the wall time since the previous step's metrics arrived
  (the first step's includes compilation).
  """
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  now = time.perf_counter()
  dt, clock[0] = now - clock[0], now
  values.update(step_time_s=dt, tokens_per_s=n_tok / max(dt, 1e-9))
  if values["nonfinite"]:
    raise NonFiniteError(
        f"non-finite loss/gradient at step {step} (loss={values['loss']}, "
        f"grad_norm={values['grad_norm']}); the update was skipped and the run stopped. "
        "The last checkpoint written before it is intact; lower optim.lr or inspect the data.")
  if step % config.train.log_every == 0 or step == config.train.steps:
    writer.write(step, "train", values)
  return values
