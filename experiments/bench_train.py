"""Benchmark of the DPO training step (policy fwd+bwd + reference fwd, AdamW update).

Command:  python -m experiments.bench_train                 (CPU preset)
          python -m experiments.bench_train --preset 1b      (GPU/TPU, ~1.1B model, L = 2048)
          python -m experiments.bench_train --preset 1b --lower_only   (shape check, any host)
Prints:   step time, tokens/s (both sequences of every pair), model FLOPs per
          step, achieved TFLOP/s and, where the peak of the device is known,
          MFU = achieved / peak. The step is `cpo_jax.train.train_step` as the
          trainer runs it (jit with shardings and donation) on random tokens.
FLOPs:    per token, policy 6·N + reference 2·N (N = parameters in matmuls,
          embedding gather excluded) plus attention scores/values
          (policy 3x and reference 1x of 4·L·n_heads·head_dim per layer, full
          L x L as the model computes it). XLA's own count is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from cpo_jax import train
from cpo_jax.configs import default

# Dense bf16 peak FLOP/s by device kind (vendor figures, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}

PRESETS = {
    # Small enough for 2 CPU cores: 4 layers, d = 256, 8 pairs of 128 tokens.
    "cpu": dict(model=dict(n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, head_dim=32,
                           mlp_dim=768, vocab_size=4096), batch=8, length=128, dtype="float32"),
    # TinyLlama-1.1B shapes, bf16 compute, f32 master weights, remat per block.
    "1b": dict(model=dict(n_layers=22, d_model=2048, n_heads=32, n_kv_heads=4, head_dim=64,
                          mlp_dim=5632, vocab_size=32000, remat=True, max_len=2048),
               batch=8, length=2048, dtype="bfloat16"),
}


def bench_config(preset: str, batch: int | None, length: int | None):
  p = PRESETS[preset]
  c = default.get_config()
  c.model.update(p["model"], dtype=p["dtype"])
  c.data.batch_size = batch or p["batch"]
  c.data.max_len = length or p["length"]
  c.train.steps = 1000
  return c


def matmul_params(cfg) -> int:
  d, h, k, e, f, v, n = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim,
                         cfg.vocab_size, cfg.n_layers)
  return n * (d * h * e * 2 + d * k * e * 2 + 3 * d * f) + d * v


def step_flops(cfg, batch: int, length: int) -> float:
  tokens = batch * 2 * length
  attn = 4 * length * cfg.n_heads * cfg.head_dim * cfg.n_layers  # per token, forward
  return tokens * (8 * matmul_params(cfg) + 4 * attn)


def random_batch(cfg, batch: int, length: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, cfg.vocab_size, size=(batch, 2, length), dtype=np.int32)
  loss_mask = np.zeros((batch, 2, length), bool)
  loss_mask[..., length // 2:] = True  # first half prompt, second half response
  return dict(tokens=tokens, loss_mask=loss_mask, attention_mask=np.ones_like(loss_mask),
              dr=np.full((batch,), np.nan, np.float32), valid=np.ones((batch,), bool))


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def run(preset="cpu", *, batch=None, length=None, steps=5, lower_only=False) -> dict:
  config = bench_config(preset, batch, length)
  b, l = config.data.batch_size, config.data.max_len
  if lower_only:  # shapes and shardings only: nothing is allocated or compiled
    flops = step_flops(config.model, b, l)
    return {"preset": preset, "params_matmul": matmul_params(config.model), "flops_per_step": flops,
            "lowered": _lower_abstract(config, b, l) and True}
  s = train.setup(config)
  dev_batch = train.device_batch(random_batch(config.model, b, l), s.mesh)
  state = s.state
  with train.shd.use_mesh(s.mesh):
    compiled = s.step_fn.lower(state, s.ref_params, dev_batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    state, m = s.step_fn(state, s.ref_params, dev_batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = s.step_fn(state, s.ref_params, dev_batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  flops = step_flops(config.model, b, l)
  peak = peak_flops(jax.devices()[0])
  n_dev = len(jax.devices())
  out = {"preset": preset, "device": jax.devices()[0].device_kind, "devices": n_dev,
         "batch_pairs": b, "length": l, "params_matmul": matmul_params(config.model),
         "step_time_s": dt, "tokens_per_s": b * 2 * l / dt, "model_flops_per_step": flops,
         "xla_flops_per_step": float(cost.get("flops", float("nan"))) if cost else None,
         "achieved_tflops": flops / dt / 1e12, "loss": float(m["loss"])}
  if peak:
    out["mfu"] = flops / dt / (peak * n_dev)
  return out


def _lower_abstract(config, b, l) -> bool:
  """Lowers the jitted step for abstract inputs (checks shapes/shardings of big presets)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from cpo_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from cpo_jax.models import Transformer  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh(config.mesh)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(config.model,
                                                                    rngs=nnx.Rngs(0))), nnx.Param)
  param_sh = nnx.to_pure_dict(shd.state_shardings(abstract, mesh))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), param_sh)
  loss = train.LossConfig.from_config(config.loss)
  schedule = train.make_schedule(config.optim, config.train.steps)
  tx = train.make_optimizer(config.optim, config.train.steps)
  opt_sh = train.opt_shardings(tx, params, param_sh, mesh)
  opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                     jax.eval_shape(tx.init, params), opt_sh)
  step = train.compiled_step(graphdef, tx, schedule, loss, mesh, param_sh, opt_sh,
                             accum=config.optim.grad_accum, impl=config.train.kernel_impl)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       random_batch(config.model, b, l))
  state = {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32)}
  with shd.use_mesh(mesh):
    step.lower(state, params, batch)
  return True


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  p.add_argument("--batch", type=int, default=None, help="pairs per step")
  p.add_argument("--length", type=int, default=None, help="tokens per sequence")
  p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  p.add_argument("--lower_only", action="store_true", help="lower for abstract inputs only")
  a = p.parse_args()
  print(json.dumps(run(a.preset, batch=a.batch, length=a.length, steps=a.steps,
                       lower_only=a.lower_only), indent=1))


if __name__ == "__main__":
  main()
