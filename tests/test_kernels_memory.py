"""Memory of the streaming paths, from XLA's own accounting (compile only).

The acceptance check: the gradient of the fused hidden-state path at
N=4096, D=256, V=32768 needs < 10% of the temporary memory of the naive
gradient (which materialises float32 [N, V] logits, log-softmax and its
cotangent). Nothing is executed at these sizes.
"""

import jax
import jax.extend
import jax.numpy as jnp
from cpo_jax import kernels as K


def temp_bytes(fn, *avals):
    return jax.jit(fn).lower(*avals).compile().memory_analysis().temp_size_in_bytes


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def hidden_grad_fn(impl):
    def loss(h, w, y, m):
        return jnp.sum(K.token_logprobs_from_hidden(h, w, y, m, impl=impl).logprobs)

    return jax.grad(loss, argnums=(0, 1))


def test_fused_hidden_gradient_under_10_percent_of_naive():
    n, d, v = 4096, 256, 32768
    avals = (sds((n, d), jnp.float32), sds((d, v), jnp.float32), sds((n,), jnp.int32), sds((n,), jnp.bool_))
    naive = temp_bytes(hidden_grad_fn("reference"), *avals)
    assert naive >= n * v * 4  # the naive gradient really holds [N, V] float32
    assert K.resolve_impl("auto", "hidden", jax.default_backend(), n, v) != "reference"
    fused = temp_bytes(hidden_grad_fn("auto"), *avals)
    assert fused < 0.10 * naive, (fused, naive)


def test_chunked_logits_gradient_never_holds_float32_nv():
    n, v = 2048, 32768
    avals = (sds((n, v), jnp.float32), sds((n,), jnp.int32))

    def grad(impl):
        return jax.grad(lambda x, y: jnp.sum(K.token_logprobs(x, y, impl=impl, return_entropy=True).entropy))

    naive, chunked = temp_bytes(grad("reference"), *avals), temp_bytes(grad("chunked"), *avals)
    assert chunked < 0.10 * naive, (chunked, naive)


def _avals_outside_kernels(jaxpr):
    """Every var aval of a jaxpr and its sub-jaxprs, not entering Pallas kernel bodies."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        if eqn.primitive.name == "pallas_call":
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _avals_outside_kernels(sub)


def test_pallas_logits_vjp_saves_and_builds_no_float32_nv():
    """bf16 logits stay bf16 outside the kernels; only [N] statistics are saved."""
    n, v = 16, 384
    x = jnp.zeros((n, v), jnp.bfloat16)
    y = jnp.zeros((n,), jnp.int32)

    def loss(x):
        return jnp.sum(K.token_logprobs(x, y, impl="pallas", return_entropy=True, block_n=8, block_v=128).logprobs)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(x).jaxpr
    big_f32 = [a for a in _avals_outside_kernels(jaxpr) if a.dtype == jnp.float32 and a.size >= n * v]
    assert big_f32 == []
