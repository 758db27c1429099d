"""Throughput of online RLHF: KV-cache generation tokens/s and full RL iteration time.

Command:  python -m experiments.bench_rlhf [--algos rloo,ppo] [--iters 10] [--json out.json]
Setting:  the small-LM RL config (cpo_jax/configs/rl_small_lm.py: 2-layer d=64 byte
          decoder, 32 prompts x 4 samples, 10 new tokens) from a random init on the
          synthetic ``reverse`` task; `--model_size` widens the model
          (d_model, mlp = 3 d_model, heads = d_model / 16) for larger measurements.
Measures: generation = the jitted `rollout.sample` alone (prefill + cached decode)
          in generated slots per second (B x T / time) and real tokens per second
          (rows stop at eos); iteration = prompts -> sampling -> ground-truth
          scoring on the host -> the jitted update (`train_rlhf.rl_update`), i.e.
          `train_rlhf.collect` + the update step, median over `--iters` after one
          warm-up iteration (compilation excluded).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

from cpo_jax import atomic
from cpo_jax import inputs, rollout, train_rlhf
from cpo_jax import sharding as shd
from cpo_jax.configs import rl_small_lm


def bench(algo: str, *, iters: int, model_size: int, data_dir: str, prompts: int) -> dict:
  c = rl_small_lm.get_config(algo)
  c.data.dir = data_dir
  c.init_from = ""
  c.rl.prompts_per_step = prompts
  if model_size:
    c.model.update(d_model=model_size, mlp_dim=3 * model_size, n_heads=model_size // 16,
                   n_kv_heads=max(model_size // 32, 1), head_dim=16)
  ins = inputs.Inputs(c.data)
  s = train_rlhf.setup_rl(c, tokenizer=ins.tokenizer)
  src = rollout.DatasetPrompts(ins.pairs("train"), batch_size=prompts, seed=0,
                               pad_id=ins.tokenizer.pad_id)
  scorer = train_rlhf.make_scorer(c, s, ins)
  k, t_new = c.rl.samples_per_prompt, c.rl.max_new_tokens
  pb = src.batch(0)
  tok, mask = np.repeat(pb["tokens"], k, 0), np.repeat(pb["attention_mask"], k, 0)
  with shd.use_mesh(s.mesh):
    dev = shd.shard_batch((tok, mask), s.mesh)
    gen_times, real = [], 0
    for i in range(iters + 1):
      t0 = time.perf_counter()
      gen = s.sample_fn(s.state["params"]["policy"], *dev, jax.random.key(i))
      jax.block_until_ready(gen)
      if i:
        gen_times.append(time.perf_counter() - t0)
        real += int(np.asarray(gen.mask).sum())
  it_times = []
  for step in range(iters + 1):
    t0 = time.perf_counter()
    batch = train_rlhf.collect(s, src, scorer, step, c.seed)
    with shd.use_mesh(s.mesh):
      b = shd.shard_batch({key: batch[key] for key in train_rlhf.ROLLOUT_KEYS}, s.mesh)
      s.state, metrics = s.update_fn(s.state, s.ref_params, b, jax.random.key(step))
      jax.block_until_ready(metrics)
    if step:
      it_times.append(time.perf_counter() - t0)
  n = prompts * k
  med = statistics.median(gen_times)
  n_params = sum(x.size for x in jax.tree.leaves(s.state["params"]["policy"]))
  return {"algo": algo, "rows": n, "new_tokens": t_new, "prompt_len": int(tok.shape[1]),
          "policy_params": int(n_params), "gen_s": med, "gen_slots_per_s": n * t_new / med,
          "gen_real_tokens_per_s": real / sum(gen_times),
          "iteration_s": statistics.median(it_times),
          "updates_per_iteration": s.hp.updates_per_iteration}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--algos", default="rloo,ppo")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--prompts", type=int, default=32)
  p.add_argument("--model_size", type=int, default=0, help="d_model (0 = small_lm's 64)")
  p.add_argument("--data_dir", default="/tmp/cpo_jax_data")
  p.add_argument("--json", default="")
  a = p.parse_args()
  dev = jax.devices()[0]
  print(f"device: {len(jax.devices())} x {dev.device_kind} ({platform.machine()}), "
        f"jax {jax.__version__}")
  rows = [bench(algo, iters=a.iters, model_size=a.model_size, data_dir=a.data_dir,
                prompts=a.prompts) for algo in a.algos.split(",")]
  print("| algo | params | rows x new tokens | gen ms | gen slots/s | gen real tok/s | "
        "updates/iter | RL iteration ms |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['algo']} | {r['policy_params']:,} | {r['rows']} x {r['new_tokens']} | "
          f"{1e3 * r['gen_s']:.1f} | {r['gen_slots_per_s']:,.0f} | "
          f"{r['gen_real_tokens_per_s']:,.0f} | {r['updates_per_iteration']} | "
          f"{1e3 * r['iteration_s']:.1f} |")
  if a.json:
    atomic.write_json(a.json, {"device": str(dev.device_kind), "jax": jax.__version__,
                               "rows": rows}, indent=1)


if __name__ == "__main__":
  main()
