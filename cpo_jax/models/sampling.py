"""Autoregressive sampling with the KV cache: greedy, temperature, top-p.

`generate` is a pure function of the model's arrays and a PRNG key; jit it
with the model rebuilt from its state inside, e.g.

    @functools.partial(jax.jit, static_argnames=("max_new_tokens",))
    def sample(params, prompt, prompt_mask, rng, max_new_tokens):
      return generate(nnx.merge(graphdef, params), prompt, prompt_mask, rng,
                      max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9)

Prompts are left-padded (every row's last prompt slot is a real token).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cpo_jax.models.transformer import Transformer, init_cache


class Generation(NamedTuple):
  """Sampled continuations.

  Attributes:
    tokens: int32 [B, T] sampled ids; `pad_id` after a row's end-of-sequence.
    mask: bool [B, T] True on generated tokens (including the eos itself).
    logprobs: float32 [B, T] log p_model(token) at temperature 1 without
      top-p truncation (what `token_logprobs` recomputes); 0 where not `mask`.
  """

  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float = 1.0,
                  top_p: float = 1.0, greedy: bool = False) -> jax.Array:
  """Token ids [B] from float logits [B, V]: argmax, or temperature + nucleus sampling."""
  if greedy or temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs            # mass of strictly better tokens
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: Transformer, prompt: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             greedy: bool = False, eos_id: int | None = None, pad_id: int = 0) -> Generation:
  """Samples `max_new_tokens` tokens after left-padded prompts [B, P] with a KV cache.

  The prompt is processed in one prefill call; each new token then costs one
  cached step. Rows that emit `eos_id` are finished: later tokens are
  `pad_id` and masked out. The step key is `fold_in(rng, t)`.
  """
  b, p = prompt.shape
  cache = init_cache(model.cfg, b, p + max_new_tokens)
  h, cache = model.hidden(prompt, prompt_mask, cache=cache)
  logits = model.logits(h[:, -1:])[:, 0]
  graphdef, state = nnx.split(model)

  def step(carry, t):
    cache, logits, done = carry
    m = nnx.merge(graphdef, state)
    tok = sample_logits(logits, jax.random.fold_in(rng, t), temperature=temperature,
                        top_p=top_p, greedy=greedy)
    live = ~done
    tok = jnp.where(live, tok, pad_id)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    lp = jnp.where(live, lp, 0.0)
    if eos_id is not None:
      done = done | (tok == eos_id)
    h, cache = m.hidden(tok[:, None], live[:, None], cache=cache)
    return (cache, m.logits(h)[:, 0], done), (tok, live, lp)

  init = (cache, logits, jnp.zeros((b,), bool))
  _, (toks, live, lps) = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
  return Generation(tokens=toks.T, mask=live.T, logprobs=lps.T)
