"""A Llama-style decoder (Llama 3, Mistral, Qwen2) in Flax NNX.

RMSNorm, rotary embeddings (optionally Llama 3 scaled), grouped-query
attention with an optional sliding window and q/k/v biases, SwiGLU MLP,
tied or untied embeddings. Parameters carry logical axis names
(`out_sharding`); activations are constrained by logical names through
`cpo_jax.sharding.constrain` (a no-op outside `sharding.use_mesh`).

Padding: `mask[b, t]` is 1 for real tokens. Any mix of left padding
(prompts) and right padding (responses) works: positions are the count of
real tokens before t, and padded keys are never attended to. Outputs at
padded positions are finite but meaningless.

Shapes: B batch, L length, S cache slots, D d_model, H heads, K kv heads,
G = H / K, E head_dim, F mlp_dim, V vocab.

The training step stays a pure function of pytrees:
`graphdef, params = nnx.split(model, nnx.Param)` outside, then
`nnx.merge(graphdef, params)(tokens, mask)` inside `jax.jit`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cpo_jax.sharding import constrain

Cache = dict[str, Any]
_BLD = ("batch", "length", "embed")


def _param(rngs: nnx.Rngs | None, cfg, shape, names, init: str = "normal") -> nnx.Param:
  """A parameter in `cfg.param_dtype` with logical axis names `names`."""
  dtype = jnp.dtype(cfg.param_dtype)
  if init == "normal":
    value = (cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = jnp.zeros(shape, dtype)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def rope_inv_freq(cfg) -> jax.Array:
  """[E/2] float32 inverse frequencies, with Llama 3 scaling if configured."""
  e = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  sc = cfg.rope_scaling
  if not sc:
    return inv
  if sc["rope_type"] != "llama3":
    raise NotImplementedError(f"rope_scaling type {sc['rope_type']!r} (only 'llama3')")
  old = sc["original_max_position_embeddings"]
  lo, hi, factor = sc["low_freq_factor"], sc["high_freq_factor"], sc["factor"]
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
  smooth = (old / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old / hi) & (wavelen <= old / lo)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x [B, L, N, E] by positions [B, L] (HF rotate-half convention)."""
  angle = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
  cos = jnp.cos(jnp.concatenate([angle, angle], -1))[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(jnp.concatenate([angle, angle], -1))[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


class RMSNorm(nnx.Module):
  """y = scale * x / rms(x), statistics in float32."""

  def __init__(self, cfg):
    self.eps = cfg.rms_eps
    self.scale = _param(None, cfg, (cfg.d_model,), ("embed",), init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    return scale * y.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary positions and an optional KV cache."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, h, k, e = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if h % k:
      raise ValueError(f"n_heads={h} must be a multiple of n_kv_heads={k}")
    self.cfg = cfg
    self.q = _param(rngs, cfg, (d, h, e), ("embed", "heads", "head_dim"))
    self.k = _param(rngs, cfg, (d, k, e), ("embed", "kv_heads", "head_dim"))
    self.v = _param(rngs, cfg, (d, k, e), ("embed", "kv_heads", "head_dim"))
    self.o = _param(rngs, cfg, (h, e, d), ("heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      self.q_bias = _param(None, cfg, (h, e), ("heads", "head_dim"), init="zeros")
      self.k_bias = _param(None, cfg, (k, e), ("kv_heads", "head_dim"), init="zeros")
      self.v_bias = _param(None, cfg, (k, e), ("kv_heads", "head_dim"), init="zeros")

  def _proj(self, x, name):
    w = getattr(self, name)[...].astype(x.dtype)
    y = jnp.einsum("bld,dne->blne", x, w)
    if self.cfg.qkv_bias:
      y = y + getattr(self, name + "_bias")[...].astype(x.dtype)[None, None]
    heads = "heads" if name == "q" else "kv_heads"
    return constrain(y, ("batch", "length", heads, "head_dim"))

  def __call__(self, x, positions, q_slots, key_mask, layer_cache=None, start=None):
    """x [B,L,D]; positions [B,L]; q_slots [L] slot index of each query;
    key_mask [B,S] valid keys (S = L without cache); layer_cache {'k','v'} [B,S,K,E]
    written at slots [start, start+L). Returns (y [B,L,D], new layer_cache)."""
    cfg = self.cfg
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(self._proj(x, "q"), positions, inv_freq)
    k = apply_rope(self._proj(x, "k"), positions, inv_freq)
    v = self._proj(x, "v")
    if layer_cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                              start, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                              start, axis=1)
      kv_names = ("batch", "length", "kv_heads", "head_dim")
      k, v = constrain(k, kv_names), constrain(v, kv_names)
      layer_cache = {"k": k, "v": v}
      k, v = k.astype(x.dtype), v.astype(x.dtype)
    b, l, h, e = q.shape
    n_kv = k.shape[2]
    k_slots = jnp.arange(k.shape[1])
    allowed = k_slots[None, :] <= q_slots[:, None]
    if cfg.sliding_window:
      allowed = allowed & (k_slots[None, :] > q_slots[:, None] - cfg.sliding_window)
    allowed = allowed[None] & key_mask[:, None, :].astype(bool)            # [B, L, S]
    qg = q.reshape(b, l, n_kv, h // n_kv, e)
    scores = jnp.einsum("blkge,bske->bkgls", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(e)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgls,bske->blkge", probs, v).reshape(b, l, h, e)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    y = jnp.einsum("blhe,hed->bld", out, self.o[...].astype(x.dtype))
    return constrain(y, _BLD), layer_cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate x) * up x)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_dim
    self.gate = _param(rngs, cfg, (d, f), ("embed", "mlp"))
    self.up = _param(rngs, cfg, (d, f), ("embed", "mlp"))
    self.down = _param(rngs, cfg, (f, d), ("mlp", "embed"))

  def __call__(self, x):
    g = jnp.einsum("bld,df->blf", x, self.gate[...].astype(x.dtype))
    u = jnp.einsum("bld,df->blf", x, self.up[...].astype(x.dtype))
    hid = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
    return constrain(jnp.einsum("blf,fd->bld", hid, self.down[...].astype(x.dtype)), _BLD)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm x); x + mlp(norm x)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, q_slots, key_mask, layer_cache=None, start=None):
    a, layer_cache = self.attn(self.attn_norm(x), positions, q_slots, key_mask, layer_cache, start)
    x = x + a
    return x + self.mlp(self.mlp_norm(x)), layer_cache


def _run_block(block, *args):
  return block(*args)


_run_block_remat = nnx.remat(_run_block)


class Transformer(nnx.Module):
  """Decoder-only LM. `model(tokens, mask)` -> logits [B, L, V] in float32."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = ml_collections.FrozenConfigDict(cfg)
    self.cfg = cfg
    self.embed = _param(rngs, cfg, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

  def unembedding(self) -> jax.Array:
    """[D, V] output projection (the embedding transposed when tied)."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

  def hidden(self, tokens: jax.Array, mask: jax.Array | None = None, *,
             positions: jax.Array | None = None, cache: Cache | None = None):
    """Final-normed hidden states [B, L, D] (compute dtype) and the updated cache.

    With `cache` (see `init_cache`), tokens are written at slots
    [cache['end'], cache['end'] + L) and attend to every valid earlier slot.
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    b, l = tokens.shape
    mask = jnp.ones((b, l), bool) if mask is None else mask.astype(bool)
    offset = jnp.zeros((b,), jnp.int32) if cache is None else cache["pos"]
    if positions is None:
      positions = offset[:, None] + jnp.maximum(jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
    if cache is None:
      start, key_mask, layer_caches = 0, mask, [None] * cfg.n_layers
    else:
      start = cache["end"]
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], mask, start, axis=1)
      layer_caches = cache["layers"]
    q_slots = start + jnp.arange(l)
    x = constrain(jnp.take(self.embed[...], tokens, axis=0).astype(dtype), _BLD)
    run = _run_block_remat if cfg.remat else _run_block
    new_layers = []
    for block, lc in zip(self.layers, layer_caches):
      x, lc = run(block, x, positions, q_slots, key_mask, lc, start)
      new_layers.append(lc)
    h = self.final_norm(x)
    if cache is not None:
      cache = dict(layers=new_layers, mask=key_mask, end=cache["end"] + l,
                   pos=cache["pos"] + jnp.sum(mask, axis=-1, dtype=jnp.int32))
    return h, cache

  def logits(self, h: jax.Array) -> jax.Array:
    """float32 logits [B, L, V] from hidden states (materialises them: prefer
    `cpo_jax.models.token_logprobs` for log-probs of targets)."""
    w = self.unembedding().astype(h.dtype)
    out = jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32)
    return constrain(out, ("batch", "length", "vocab"))

  def __call__(self, tokens, mask=None, *, positions=None):
    return self.logits(self.hidden(tokens, mask, positions=positions)[0])


def init_cache(cfg, batch: int, max_len: int) -> Cache:
  """Empty KV cache with `max_len` slots in the compute dtype.

  Keys: 'layers' (per layer {'k','v'} [B, S, K, E]), 'mask' [B, S] bool
  (slot holds a real token), 'end' int32 (next slot), 'pos' [B] int32 (real
  tokens seen per row = next position id).
  """
  dtype = jnp.dtype(cfg.dtype)
  kv = lambda: jnp.zeros((batch, max_len, cfg.n_kv_heads, cfg.head_dim), dtype)
  return dict(layers=[{"k": kv(), "v": kv()} for _ in range(cfg.n_layers)],
              mask=jnp.zeros((batch, max_len), bool), end=jnp.zeros((), jnp.int32),
              pos=jnp.zeros((batch,), jnp.int32))
