"""Tokenwise log-prob kernels: log p(target) without a float32 [N, V] log-softmax.

API (all return a `TokenLogprobs` NamedTuple):

    token_logprobs(logits[..., V], targets[...], mask=None, *, impl="auto",
                   return_entropy=False, interpret=None, block_n=None,
                   block_v=None, layout=None, pallas_driver=None)
    token_logprobs_from_hidden(h[..., D], w[D, V], targets[...], mask=None,
                   *, impl="auto", return_entropy=False, interpret=None,
                   block_n=None, block_v=None, layout=None)
    token_logprobs_reference(...), token_logprobs_from_hidden_reference(...)

    TokenLogprobs(
      logprobs      [...]        float32  log p(y_t); 0 where mask is False
      entropy       [...] | None float32  H(p_t) (only if return_entropy)
      seq_logprobs  [...[:-1]]   float32  logprobs summed over the last axis
      token_count   [...[:-1]]   float32  unmasked tokens over the last axis)

For length-averaged (SimPO / official-CPO) log-probs use
`seq_logprobs / max(token_count, 1)`. Targets must lie in [0, V) where the
mask is True. Gradients flow to logits (or h and w), never to targets/mask.

impl: "reference" (plain XLA, float32 log_softmax; differentiated by JAX),
"pallas" (streaming Pallas kernels with a custom VJP: logits path on TPU,
GPU via Triton, interpret mode; hidden path on TPU and interpret mode),
"chunked" (portable plain-JAX custom VJP: fused XLA reductions for logits,
vocab-chunked matmuls for the hidden path), "auto" (reference when N·V is
small: <= 2^22, or <= 2^26 on CPU where XLA measured faster; else pallas
where it lowers natively, else chunked; never interpret mode). `interpret=None` means $CPO_JAX_PALLAS_INTERPRET if set,
else True on CPU only (Pallas has no compiled CPU lowering).

Sharding: with `layout=None` the op reads the NamedSharding of its inputs
(concrete arrays, or explicit mesh axes under jit) and runs each of its
forward and backward inside one `jax.shard_map`: token dims sharded over
data/FSDP axes, the vocabulary (last logits dim, or w's V) over a tensor-
parallel axis, combined with pmax/psum of the log-sum-exp statistics. Under
jit with Auto axes, pass `layout=Layout(mesh, token_spec, vocab_axis)`.
"""

from cpo_jax.kernels.api import (
    IMPLS,
    INTERPRET_ENV,
    infer_layout,
    resolve_impl,
    resolve_interpret,
    token_logprobs,
    token_logprobs_from_hidden,
)
from cpo_jax.kernels.core import Layout
from cpo_jax.kernels.reference import (
    TokenLogprobs,
    token_logprobs_from_hidden_reference,
    token_logprobs_reference,
)

__all__ = [
    "IMPLS",
    "INTERPRET_ENV",
    "Layout",
    "TokenLogprobs",
    "infer_layout",
    "resolve_impl",
    "resolve_interpret",
    "token_logprobs",
    "token_logprobs_from_hidden",
    "token_logprobs_from_hidden_reference",
    "token_logprobs_reference",
]
