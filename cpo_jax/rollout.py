"""Rollouts for online RLHF: prompts, KV-cache sampling, scoring, log-probs, values,
and `policy_report`, the comparison axes of any policy against its reference.

A rollout batch (host or device dict; N = prompts * samples_per_prompt rows,
the K samples of a prompt in consecutive rows):

==================  ===============  ==========================================
key                 shape / dtype    meaning
==================  ===============  ==========================================
tokens              [N, P+T] int32   left-padded prompt, then the sampled
                                     response (pad after its eos)
attention_mask      [N, P+T] bool    real tokens
response_mask       [N, T] bool      generated tokens, eos included
scores              [N] float32      sequence reward (ground truth or RM)
==================  ===============  ==========================================

Responses are sampled at temperature 1 from the policy being optimised, so
the recomputed log-probs are the behaviour policy's (RLOO is on-policy; PPO's
first epoch has ratio exactly 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpo_jax import data as D
from cpo_jax import evaluate, train
from cpo_jax import sharding as shd
from cpo_jax.models import generate, token_logprobs


class DatasetPrompts:
  """Prompt batches of a split; batch `step` is a pure function of (seed, step).

  Epoch e visits the prompts in `default_rng([seed, e]).permutation`; step s
  takes the global positions [s*B, (s+1)*B) of the concatenated epochs, so a
  resumed run draws exactly the prompts of an uninterrupted one.
  """

  def __init__(self, pairs: D.EncodedPairs, *, batch_size: int, seed: int, pad_id: int):
    if batch_size > len(pairs):
      raise ValueError(f"prompts_per_step={batch_size} > {len(pairs)} prompts in the split")
    self.pairs, self.batch_size, self.seed, self.pad_id = pairs, batch_size, seed, pad_id
    self.length = int(pairs.prompt_len.max())

  def ids(self, step: int) -> np.ndarray:
    n, b = len(self.pairs), self.batch_size
    pos = np.arange(step * b, (step + 1) * b)
    epochs = pos // n
    perms = {e: np.random.default_rng([self.seed, int(e)]).permutation(n) for e in set(epochs)}
    return np.asarray([perms[e][p % n] for e, p in zip(epochs, pos)])

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Left-padded tokens / attention_mask [B, P] and pair ids [B]."""
    ids = self.ids(step)
    out = D.make_prompt_batch(self.pairs, ids, pad_id=self.pad_id, length=self.length)
    return dict(tokens=out["tokens"], attention_mask=out["attention_mask"], ids=ids)


def sample(params, prompt, prompt_mask, rng, *, graphdef, max_new_tokens: int, eos_id, pad_id,
           greedy: bool = False):
  """Module-level pure sampler: `models.generate` with the KV cache (temperature 1)."""
  return generate(nnx.merge(graphdef, params), prompt, prompt_mask, rng,
                  max_new_tokens=max_new_tokens, greedy=greedy, eos_id=eos_id, pad_id=pad_id)


def assemble(prompt: np.ndarray, prompt_mask: np.ndarray, gen) -> dict[str, np.ndarray]:
  """Rollout fields (without scores) from prompts [N, P] and a `Generation` [N, T]."""
  toks, mask = np.asarray(gen.tokens), np.asarray(gen.mask)
  return dict(tokens=np.concatenate([prompt, toks], 1).astype(np.int32),
              attention_mask=np.concatenate([prompt_mask.astype(bool), mask], 1),
              response_mask=mask)


def response_logprobs(graphdef, params, batch, impl: str = "auto") -> jax.Array:
  """float32 [N, T] log pi(response token | prefix); 0 off the response."""
  t = batch["response_mask"].shape[1]
  p = batch["tokens"].shape[1] - t
  target = jnp.concatenate([jnp.zeros_like(batch["attention_mask"][:, :p]),
                            batch["response_mask"]], 1)
  out = token_logprobs(nnx.merge(graphdef, params), batch["tokens"], batch["attention_mask"],
                       target_mask=target, impl=impl)
  return out.logprobs[:, p:]


def response_values(graphdef, params, batch) -> jax.Array:
  """float32 [N, T] critic values V(prefix before each response token); 0 off the response."""
  t = batch["response_mask"].shape[1]
  p = batch["tokens"].shape[1] - t
  s = nnx.merge(graphdef, params).token_scores(batch["tokens"], batch["attention_mask"])
  return s[:, p - 1:p + t - 1] * batch["response_mask"]


def response_texts(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Decoded responses (eos and padding dropped)."""
  eos = tokenizer.eos_id
  return [tokenizer.decode([t for t, m in zip(row, mrow) if m and t != eos])
          for row, mrow in zip(np.asarray(tokens), np.asarray(mask))]


class GroundTruthScorer:
  """r*(x, y) of a synthetic task on decoded text (host-side, exact)."""

  def __init__(self, task: str, pairs: D.EncodedPairs, tokenizer):
    self.task, self.pairs, self.tokenizer = task, pairs, tokenizer

  def __call__(self, ids: np.ndarray, rollout: dict) -> np.ndarray:
    prompts = [self.tokenizer.decode(self.pairs.prompt(i)) for i in ids]
    t = rollout["response_mask"].shape[1]
    texts = response_texts(self.tokenizer, rollout["tokens"][:, -t:], rollout["response_mask"])
    return D.score_batch(self.task, prompts, texts)


def _rm_scores(params, tokens, mask, *, graphdef):
  return nnx.merge(graphdef, params)(tokens, mask)


class RewardModelScorer:
  """A frozen trained reward model (`ScalarHeadModel`) scoring prompt + response."""

  def __init__(self, graphdef, params, in_shardings, out_sharding):
    self.params = params
    self.fn = jax.jit(functools.partial(_rm_scores, graphdef=graphdef),
                      in_shardings=in_shardings, out_shardings=out_sharding)

  def __call__(self, ids: np.ndarray, rollout: dict) -> jax.Array:
    del ids
    return self.fn(self.params, rollout["tokens"], rollout["attention_mask"])


def sequence_kl(graphdef, params, ref_params, batch, impl: str = "auto") -> dict:
  """Per-sequence KL(pi || pi_ref) estimates [N] on samples from pi: k1 (sum of
  log-ratios, unbiased) and k3 (sum of per-token k3, unbiased, >= 0)."""
  lp = response_logprobs(graphdef, params, batch, impl)
  ref = response_logprobs(graphdef, ref_params, batch, impl)
  mask = batch["response_mask"].astype(jnp.float32)
  lr = (lp - ref) * mask
  return {"kl_k1": jnp.sum(lr, -1), "kl_k3": jnp.sum((jnp.expm1(-lr) + lr) * mask, -1)}


def policy_report(config, mesh, graphdef, params, ref_params, ins, *, beta: float, step: int,
                  kl_prompts: int, kl_max_new_tokens: int) -> dict:
  """The comparison axes for any policy vs its reference, on `data.eval_split`:
  pair metrics (absolute/relative accuracy, frac in U, per group; DPO loss at
  `beta`), greedy-generation ground-truth quality, the sampled KL(pi||pi_ref)
  (k1 and k3, per sequence), `inherits_bias`: the fraction of pairs
  violating Assumption 3.1 at `beta` on which the policy prefers y_l, and
  `optimum/*`: absolute accuracy and frac in U of the closed-form RLHF
  optimum (delta* = delta_ref + dr/beta, pairs with known dr) for comparison."""
  loss = train.LossConfig("dpo", "sum", (("beta", beta),))
  ev = train.compiled_eval(graphdef, loss, mesh, jax.tree.map(lambda x: x.sharding, params),
                           impl=config.train.kernel_impl)
  t = config.train
  arrs = evaluate.pair_arrays(ev, params, ref_params, ins.eval_iterator(t.eval_batch_size), mesh)
  out = evaluate.summarize(arrs, "dpo")
  out["dpo_loss"] = out.pop("loss")
  viol = arrs["violating"] > 0
  out["inherits_bias"] = float(np.mean(arrs["delta"][viol] < 0)) if viol.any() else float("nan")
  known = np.isfinite(arrs["dr"])
  if known.any():  # the closed-form RLHF optimum's margin delta* = delta_ref + dr / beta
    d_ref, star = arrs["delta_ref"][known], arrs["delta_ref"][known] + arrs["dr"][known] / beta
    mis = arrs["group"][known] == 1
    out["optimum/accuracy_absolute"] = float(np.mean(star > 0))
    out["optimum/in_U"] = float(np.mean((star < 0) & (star > d_ref)))
    if mis.any():
      out["optimum/accuracy_absolute/misaligned"] = float(np.mean(star[mis] > 0))
      out["optimum/in_U/misaligned"] = float(np.mean(((star < 0) & (star > d_ref))[mis]))
  pairs = ins.pairs(config.data.eval_split)
  rng = jax.random.fold_in(jax.random.key(config.seed), step)
  if t.gen_samples and config.data.source == "synthetic":
    gen, _ = evaluate.generation_quality(
        graphdef, params, pairs, ins.tokenizer, config.data.task, n=t.gen_samples,
        max_new_tokens=t.gen_max_new_tokens, temperature=t.gen_temperature, rng=rng, mesh=mesh)
    out.update(gen)
  if kl_prompts:
    tok = ins.tokenizer
    pb = DatasetPrompts(pairs, batch_size=min(kl_prompts, len(pairs)), seed=0,
                        pad_id=tok.pad_id).batch(0)
    kl = _kl_fn(graphdef, kl_max_new_tokens, tok.eos_id, tok.pad_id, config.train.kernel_impl)
    with shd.use_mesh(mesh):
      est = jax.device_get(kl(params, ref_params, pb["tokens"], pb["attention_mask"], rng))
    out.update({k: float(np.mean(v)) for k, v in est.items()})
  return out


@functools.lru_cache(maxsize=8)
def _kl_fn(graphdef, max_new_tokens, eos_id, pad_id, impl):
  def fn(params, ref_params, prompt, prompt_mask, rng):
    gen = sample(params, prompt, prompt_mask, rng, graphdef=graphdef,
                 max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    batch = dict(tokens=jnp.concatenate([prompt, gen.tokens], 1),
                 attention_mask=jnp.concatenate([prompt_mask.astype(bool), gen.mask], 1),
                 response_mask=gen.mask)
    return sequence_kl(graphdef, params, ref_params, batch, impl)
  return jax.jit(fn)
