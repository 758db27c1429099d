"""Property test: the chunked logits path equals the reference for any shape,
chunk size and logit scale (runs without Pallas, so it is fast on CPU)."""

import jax
import jax.numpy as jnp
import pytest

from cpo_jax import kernels as K
from test_kernels import make_logits, rel_err, weighted_loss

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=3, deadline=None)
@given(
    n=st.integers(1, 9),
    v=st.integers(2, 300),
    block_v=st.sampled_from([16, 128, 512]),
    scale=st.sampled_from([0.1, 3.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_chunked_logits_property(n, v, block_v, scale, seed):
    """Any N, V, chunk and logit scale: chunked == reference (values, entropy, grads)."""
    x, y, mask = make_logits((n, v), jnp.float32, scale=scale, seed=seed)
    fn = lambda x: K.token_logprobs(x, y, mask, impl="chunked", return_entropy=True, block_v=block_v)  # noqa: E731
    ref = lambda x: K.token_logprobs_reference(x, y, mask, return_entropy=True)  # noqa: E731
    out, want = fn(x), ref(x)
    assert rel_err(out.logprobs, want.logprobs) < 1e-5 and rel_err(out.entropy, want.entropy) < 1e-5
    g = jax.grad(lambda x: weighted_loss(fn(x)))(x)
    assert rel_err(g, jax.grad(lambda x: weighted_loss(ref(x)))(x)) < 1e-5
