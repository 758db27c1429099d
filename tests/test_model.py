"""Model invariants: causality by gradients, padding, KV cache = recompute, log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpo_jax.models import Transformer, configs, generate, sample_logits, token_logprobs


def _cfg(**kw):
  cfg = configs.tiny()
  cfg.update(kw)
  return cfg


def _batch(rng=0, b=2, l=8, vocab=256):
  tokens = np.random.RandomState(rng).permutation(vocab)[: b * l].reshape(b, l)
  mask = np.ones((b, l), bool)
  mask[0, :3] = False          # left-padded prompt
  mask[1, -2:] = False         # right-padded response
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


@pytest.mark.parametrize("window", [None, 3])
def test_causal_and_padding_by_gradients(window):
  """Output at t depends on real tokens at slots <= t (within the window) only."""
  # One layer with a window: the receptive field is exactly the window.
  model = Transformer(_cfg(sliding_window=window, n_layers=1 if window else 2), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens, mask = _batch()

  def out_at(params, t):
    logits = nnx.merge(graphdef, params)(tokens, mask)
    return jnp.sum(jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False) ** 2)

  grad = jax.jit(jax.grad(out_at))
  for t in (3, 5):
    g = np.abs(np.asarray(grad(params, t)["embed"][...])).sum(-1)
    for b in range(2):
      for s in range(tokens.shape[1]):
        in_view = s <= t and (window is None or s > t - window)
        depends = in_view and bool(mask[b, s]) and bool(mask[b, t])
        assert (g[tokens[b, s]] > 0) == depends, (b, s, t)


def test_padding_invariance():
  """Adding left/right padding does not change outputs at real positions."""
  model = Transformer(_cfg(), rngs=nnx.Rngs(1))
  tokens = jnp.arange(1, 6, dtype=jnp.int32)[None]
  ref = model(tokens)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens, jnp.zeros((1, 2), jnp.int32)], 1)
  mask = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0]], bool)
  np.testing.assert_allclose(model(padded, mask)[:, 3:8], ref, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, tie_embeddings=True, sliding_window=4)])
def test_kv_cache_generation_equals_recompute(kw):
  """Greedy tokens = argmax of a full forward; cached log-probs = recomputed ones."""
  model = Transformer(_cfg(**kw), rngs=nnx.Rngs(2))
  graphdef, state = nnx.split(model)
  prompt, _ = _batch(3, l=5)
  prompt_mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)

  @jax.jit
  def run(state, prompt, prompt_mask):
    return generate(nnx.merge(graphdef, state), prompt, prompt_mask, jax.random.key(0),
                    max_new_tokens=6, greedy=True)

  gen = run(state, prompt, prompt_mask)
  assert gen.mask.all()
  full = jnp.concatenate([prompt, gen.tokens], 1)
  full_mask = jnp.concatenate([prompt_mask, gen.mask], 1)
  logits = model(full, full_mask)
  np.testing.assert_array_equal(gen.tokens, jnp.argmax(logits[:, 4:-1], -1))
  lp = token_logprobs(model, full, full_mask, impl="reference").logprobs
  np.testing.assert_allclose(gen.logprobs, lp[:, 5:], atol=2e-5)


def test_generation_stops_at_eos():
  model = Transformer(_cfg(), rngs=nnx.Rngs(2))
  prompt, _ = _batch(3, l=5)
  mask = jnp.ones(prompt.shape, bool)
  free = generate(model, prompt, mask, jax.random.key(0), max_new_tokens=4, greedy=True)
  eos = int(free.tokens[0, 1])
  gen = generate(model, prompt, mask, jax.random.key(0), max_new_tokens=4, greedy=True,
                 eos_id=eos, pad_id=7)
  stop = int(np.argmax(np.asarray(gen.tokens[0]) == eos))
  assert gen.mask[0, : stop + 1].all() and not gen.mask[0, stop + 1:].any()
  assert (gen.tokens[0, stop + 1:] == 7).all() and (gen.logprobs[0, stop + 1:] == 0).all()


def test_top_p_and_temperature_sampling():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  toks = np.asarray(sample_logits(logits, jax.random.key(0), top_p=0.7))
  assert set(np.unique(toks)) == {0, 1}
  np.testing.assert_allclose(np.mean(toks == 0), 0.5 / 0.8, atol=0.03)
  cold = np.asarray(sample_logits(logits, jax.random.key(1), temperature=0.05))
  assert np.mean(cold == 0) > 0.99
  assert (sample_logits(logits[:3], jax.random.key(2), greedy=True) == 0).all()


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_token_logprobs_match_log_softmax(impl):
  """Fused and logits paths equal log_softmax(model(tokens)) shifted, on a pair axis."""
  model = Transformer(_cfg(tie_embeddings=True), rngs=nnx.Rngs(3))
  tokens, mask = _batch(4, b=4)
  tokens, mask = tokens.reshape(2, 2, -1), mask.reshape(2, 2, -1)
  resp = jnp.zeros(mask.shape, bool).at[..., 4:].set(True)
  logits = model(tokens.reshape(4, -1), mask.reshape(4, -1)).reshape(2, 2, 8, -1)
  want = jnp.take_along_axis(jax.nn.log_softmax(logits[..., :-1, :]), tokens[..., 1:, None], -1)
  want = jnp.where(mask[..., 1:] & mask[..., :-1] & resp[..., 1:], want[..., 0], 0.0)
  for fused in (True, False):
    out = token_logprobs(model, tokens, mask, target_mask=resp, impl=impl, fused=fused)
    assert out.logprobs.shape == tokens.shape and (out.logprobs[..., 0] == 0).all()
    np.testing.assert_allclose(out.logprobs[..., 1:], want, atol=1e-5)
    np.testing.assert_allclose(out.seq_logprobs, want.sum(-1), atol=1e-4)
    np.testing.assert_array_equal(out.token_count, (want != 0).sum(-1))


def test_bf16_compute_and_params():
  tokens, mask = _batch()
  f32 = Transformer(_cfg(), rngs=nnx.Rngs(5))
  bf16 = Transformer(_cfg(dtype="bfloat16"), rngs=nnx.Rngs(5))
  pure_bf16 = Transformer(_cfg(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(5))
  assert pure_bf16.embed[...].dtype == jnp.bfloat16 and bf16.embed[...].dtype == jnp.float32
  ref = f32(tokens, mask)
  for m in (bf16, pure_bf16):
    out = m(tokens, mask)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out[mask], ref[mask], atol=0.05)


def test_remat_gives_same_gradients():
  tokens, mask = _batch()
  grads = []
  for remat in (False, True):
    graphdef, params = nnx.split(Transformer(_cfg(remat=remat), rngs=nnx.Rngs(6)), nnx.Param)
    loss = lambda p: token_logprobs(nnx.merge(graphdef, p), tokens, mask).seq_logprobs.sum()
    grads.append(jax.jit(jax.grad(loss))(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *grads)


@pytest.mark.parametrize("name,billions", [("llama3_8b", 8.03), ("mistral_7b", 7.24),
                                           ("qwen2_7b", 7.62), ("qwen2_0_5b", 0.494)])
def test_real_config_parameter_counts(name, billions):
  abstract = nnx.eval_shape(lambda: Transformer(configs.get_config(name), rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert abs(n / 1e9 - billions) < 0.01, n
