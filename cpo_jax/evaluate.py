"""Held-out evaluation: pair metrics over a split and sampled-generation quality.

`pair_arrays` runs a jitted eval step (`train.eval_step`) over one
unshuffled epoch of a split and returns per-pair NumPy arrays (padding rows
dropped). `Evaluator` reduces them to scalars, per reference-bias group on
synthetic data, and for synthetic tasks samples `train.gen_samples`
completions of held-out prompts and scores them with the task's
ground-truth reward r*(x, y).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from cpo_jax import data as D
from cpo_jax import sharding as shd
from cpo_jax.models import generate

def pair_arrays(eval_fn, params, ref_params, iterator, mesh) -> dict[str, np.ndarray]:
  """Per-pair outputs of `eval_fn` over `iterator` (valid rows only).

  The outputs are global (replicated) arrays, so on several hosts every
  host gets every pair.
  """
  from cpo_jax.train import device_batch  # pylint: disable=g-import-not-at-top
  parts = []
  for batch in iterator:
    with shd.use_mesh(mesh):
      out = jax.device_get(eval_fn(params, ref_params, device_batch(batch, mesh)))
    ok = np.asarray(out["valid"]) > 0
    parts.append({k: np.asarray(v)[ok] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize(arrs: dict[str, np.ndarray], loss_name: str) -> dict[str, float]:
  """Scalar metrics from `pair_arrays`: means, and on synthetic data per group."""
  if loss_name == "sft":
    return {"loss": float(arrs["loss"].sum() / max(arrs["nll_tokens"].sum(), 1.0))}
  skip = ("valid", "dr", "group", "dr_known")
  out = {k: float(np.mean(v)) for k, v in arrs.items() if k not in skip}
  known = arrs["dr_known"] > 0
  out["violating"] = float(arrs["violating"][known].mean()) if known.any() else float("nan")
  for g, name in ((0, "aligned"), (1, "misaligned")):
    sel = arrs["group"] == g
    if sel.any() and (arrs["group"] == 1).any():
      for k in ("accuracy_absolute", "accuracy_relative", "in_U", "delta", "delta_ref"):
        out[f"{k}/{name}"] = float(np.mean(arrs[k][sel]))
  return out


def generation_quality(graphdef, params, pairs: D.EncodedPairs, tokenizer, task: str, *,
                       n: int, max_new_tokens: int, temperature: float, rng, mesh):
  """Mean ground-truth reward and exact-answer rate of sampled completions
  (overall and, on synthetic data with both groups present, per group).

  Samples the first `n` prompts of `pairs` (left-padded, one compile) at
  `temperature` (0 = greedy) and scores the decoded text with r*(x, y).
  """
  ids = np.arange(min(n, len(pairs)))
  prompts = D.make_prompt_batch(pairs, ids, pad_id=tokenizer.pad_id,
                                length=int(pairs.prompt_len.max()))
  with shd.use_mesh(mesh):
    gen = _sampler(graphdef, max_new_tokens, float(temperature), tokenizer.eos_id,
                   tokenizer.pad_id)(params, prompts["tokens"], prompts["attention_mask"], rng)
  toks, mask = np.asarray(gen.tokens), np.asarray(gen.mask)
  texts, answers = [], []
  for row, i in enumerate(ids):
    keep = [t for t, m in zip(toks[row], mask[row]) if m and t != tokenizer.eos_id]
    texts.append(tokenizer.decode(pairs.prompt(i)))
    answers.append(tokenizer.decode(keep))
  rewards = D.score_batch(task, texts, answers)
  out = {"gen_reward": float(rewards.mean()), "gen_exact": float(np.mean(rewards == 0.0))}
  groups = pairs.group[ids]
  if (groups == 1).any() and (groups == 0).any():
    for g, name in ((0, "aligned"), (1, "misaligned")):
      out[f"gen_reward/{name}"] = float(rewards[groups == g].mean())
      out[f"gen_exact/{name}"] = float(np.mean(rewards[groups == g] == 0.0))
  return out, list(zip(texts, answers, rewards.tolist()))


@functools.lru_cache(maxsize=8)
def _sampler(graphdef, max_new_tokens, temperature, eos_id, pad_id):
  def sample(params, prompt, mask, rng):
    return generate(nnx.merge(graphdef, params), prompt, mask, rng, max_new_tokens=max_new_tokens,
                    temperature=temperature or 1.0, greedy=temperature == 0.0, eos_id=eos_id,
                    pad_id=pad_id)
  return jax.jit(sample)


class Evaluator:
  """`evaluator(params, ref_params, step) -> {metric: float}` on the held-out split."""

  def __init__(self, config, ins, mesh, graphdef, eval_fn):
    self.config, self.ins, self.mesh = config, ins, mesh
    self.graphdef, self.eval_fn = graphdef, eval_fn
    self.samples = []

  def __call__(self, params, ref_params, step: int) -> dict[str, float]:
    c, t = self.config, self.config.train
    if not c.data.eval_split:
      return {}
    it = self.ins.eval_iterator(t.eval_batch_size)
    out = summarize(pair_arrays(self.eval_fn, params, ref_params, it, self.mesh), c.loss.name)
    if t.gen_samples and c.data.source == "synthetic":
      rng = jax.random.fold_in(jax.random.key(c.seed), step)
      gen, self.samples = generation_quality(
          self.graphdef, params, self.ins.pairs(c.data.eval_split), self.ins.tokenizer,
          c.data.task, n=t.gen_samples, max_new_tokens=t.gen_max_new_tokens,
          temperature=t.gen_temperature, rng=rng, mesh=self.mesh)
      out.update(gen)
    return out
