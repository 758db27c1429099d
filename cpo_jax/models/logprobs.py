"""Per-token log-probs of a token sequence under the model, via the kernel API.

The fused path (`fused=True`, default) hands the final hidden states and the
[D, V] unembedding to `cpo_jax.kernels.token_logprobs_from_hidden`, so the
[B, L, V] logits are never materialised (for `impl` other than "reference").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpo_jax import kernels
from cpo_jax import sharding as shd
from cpo_jax.models.transformer import Transformer


def _layout(h_shape: tuple) -> kernels.Layout | None:
  """Kernel layout from the active `sharding.use_mesh` (None outside one)."""
  act = shd.active()
  if act is None:
    return None
  mesh, rules = act
  token_spec = shd.logical_to_spec(("batch", "length"), shape=h_shape[:-1], mesh=mesh,
                                   rules=rules, what="log-prob tokens")
  vocab = shd.logical_to_spec(("vocab",), mesh=mesh, rules=rules)[0]
  return kernels.Layout(mesh, tuple(token_spec), vocab)


def token_logprobs(model: Transformer, tokens: jax.Array, mask: jax.Array | None = None, *,
                   target_mask: jax.Array | None = None, impl: str = "auto",
                   fused: bool = True, return_entropy: bool = False) -> kernels.TokenLogprobs:
  """log p(tokens[t] | tokens[<t]) for every position, aligned with `tokens`.

  Args:
    model: the policy or reference model (e.g. `nnx.merge(graphdef, params)`).
    tokens: int [..., L] token ids (leading dims, e.g. a pair axis, are flattened).
    mask: [..., L] 1 on real tokens (left/right padding 0); None = all real.
    target_mask: [..., L] which positions to score (e.g. the response mask);
      None = every real token with a real predecessor.
    impl: kernel implementation ("auto", "pallas", "chunked", "reference").
    fused: use the hidden-state kernel (no [.., V] logits) instead of logits.
    return_entropy: also return the per-token predictive entropy.

  Returns:
    `kernels.TokenLogprobs` with `logprobs` (and `entropy`) float32 [..., L]:
    position 0 and unscored positions are 0. `seq_logprobs` / `token_count`
    [...] sum / count the scored positions (summed log-prob; divide for the
    length-averaged one).
  """
  lead, l = tokens.shape[:-1], tokens.shape[-1]
  tokens = tokens.reshape(-1, l)
  mask = jnp.ones(tokens.shape, bool) if mask is None else mask.reshape(-1, l).astype(bool)
  scored = mask[:, 1:] & mask[:, :-1]
  if target_mask is not None:
    scored = scored & target_mask.reshape(-1, l)[:, 1:].astype(bool)
  h, _ = model.hidden(tokens, mask)
  h, targets = h[:, :-1], tokens[:, 1:]
  layout = _layout(h.shape)
  if fused:
    w = model.unembedding().astype(h.dtype)
    out = kernels.token_logprobs_from_hidden(h, w, targets, scored, impl=impl, layout=layout,
                                             return_entropy=return_entropy)
  else:
    out = kernels.token_logprobs(model.logits(h), targets, scored, impl=impl, layout=layout,
                                 return_entropy=return_entropy)
  pad = lambda x: None if x is None else jnp.pad(x, ((0, 0), (1, 0))).reshape(*lead, l)
  return out._replace(logprobs=pad(out.logprobs), entropy=pad(out.entropy),
                      seq_logprobs=out.seq_logprobs.reshape(lead),
                      token_count=out.token_count.reshape(lead))
