"""The kernels on the simulated 8-device mesh: token- and vocab-sharded.

The op must wrap itself in `jax.shard_map` (a Pallas call is never
partitioned by XLA), combine vocabulary shards with pmax/psum, and give the
single-device values and gradients, with gradients sharded like the inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from cpo_jax import kernels as K

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

# V/4 = 75 per vocab shard: ragged against block_v, so padding columns of
# one shard overlap target indices that belong to the next shard.
B, T, V, D = 8, 3, 300, 8
BLOCKS = dict(block_n=8, block_v=64)
EXPLICIT, AUTO = AxisType.Explicit, AxisType.Auto


def mesh_of(axis_type):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))


def data(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(k[0], (B, T, V)) * 3
    y = jax.random.randint(k[1], (B, T), 0, V)
    mask = jax.random.bernoulli(k[2], 0.7, (B, T)).at[0].set(False)
    h = jax.random.normal(k[3], (B, T, D))
    w = jax.random.normal(k[4], (D, V)) * 0.5
    return x, y, mask, h, w


def loss(result):
    return jnp.sum(result.logprobs * jnp.arange(T, dtype=jnp.float32)[None, :]) + 0.3 * jnp.sum(result.entropy)


def put(mesh, a, *spec):
    return jax.device_put(a, NamedSharding(mesh, P(*spec)))


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


TOKEN_VOCAB = [
    (("data", None), "model"),  # tokens over data, vocab over model (TP)
    ((("data", "model"), None), None),  # tokens over all 8 devices
]


@pytest.mark.parametrize("token_spec,vocab_axis", TOKEN_VOCAB)
@pytest.mark.parametrize("impl", ["pallas", "chunked"])
def test_logits_explicit_mesh(token_spec, vocab_axis, impl):
    x, y, mask, _, _ = data()
    want = K.token_logprobs_reference(x, y, mask, return_entropy=True)
    g_want = jax.grad(lambda x: loss(K.token_logprobs_reference(x, y, mask, return_entropy=True)))(x)
    mesh = mesh_of(EXPLICIT)
    with jax.set_mesh(mesh):
        xs = put(mesh, x, *token_spec, vocab_axis)
        ys, ms = put(mesh, y, *token_spec), put(mesh, mask, *token_spec)
        fn = lambda x: K.token_logprobs(x, ys, ms, impl=impl, return_entropy=True, **BLOCKS)  # noqa: E731
        assert K.infer_layout((xs,)) == K.Layout(mesh, token_spec, vocab_axis)
        assert "shard_map" in str(jax.make_jaxpr(fn)(xs))
        out = jax.jit(fn)(xs)
        g = jax.jit(jax.grad(lambda x: loss(fn(x))))(xs)
    assert max_err(out.logprobs, want.logprobs) < 1e-5
    assert max_err(out.entropy, want.entropy) < 1e-5
    assert max_err(g, g_want) < 1e-5
    assert g.sharding.spec == P(*token_spec, vocab_axis)


@pytest.mark.parametrize("token_spec,vocab_axis", TOKEN_VOCAB)
@pytest.mark.parametrize("impl", ["pallas", "chunked"])
def test_hidden_explicit_mesh(token_spec, vocab_axis, impl):
    _, y, mask, h, w = data(1)
    ref = lambda h, w: loss(K.token_logprobs_from_hidden_reference(h, w, y, mask, return_entropy=True))  # noqa: E731
    with jax.default_matmul_precision("highest"):
        g_want = jax.grad(ref, argnums=(0, 1))(h, w)
    mesh = mesh_of(EXPLICIT)
    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        hs, ws = put(mesh, h, *token_spec, None), put(mesh, w, None, vocab_axis)
        ys, ms = put(mesh, y, *token_spec), put(mesh, mask, *token_spec)

        def fn(h, w):
            return K.token_logprobs_from_hidden(h, w, ys, ms, impl=impl, return_entropy=True, **BLOCKS)

        assert K.infer_layout((hs, ws)) == K.Layout(mesh, token_spec, vocab_axis)
        dh, dw = jax.jit(jax.grad(lambda h, w: loss(fn(h, w)), argnums=(0, 1)))(hs, ws)
    assert max_err(dh, g_want[0]) < 1e-5 and max_err(dw, g_want[1]) < 1e-5
    assert dh.sharding.spec == P(*token_spec, None)
    assert dw.sharding.spec == P(None, vocab_axis)


def test_auto_mesh_eager_inference_and_jit_layout():
    """Auto axes: eager calls read the arrays' shardings; under jit a Layout is passed."""
    x, y, mask, _, _ = data(2)
    g_want = jax.grad(lambda x: loss(K.token_logprobs_reference(x, y, mask, return_entropy=True)))(x)
    mesh = mesh_of(AUTO)
    layout = K.Layout(mesh, ("data", None), "model")
    xs = put(mesh, x, "data", None, "model")
    ys, ms = put(mesh, y, "data", None), put(mesh, mask, "data", None)
    assert K.infer_layout((xs,)) == layout
    eager = K.token_logprobs(xs, ys, ms, impl="pallas", return_entropy=True, **BLOCKS)
    assert max_err(eager.seq_logprobs, K.token_logprobs_reference(x, y, mask).seq_logprobs) < 1e-4

    def step(x, y, m):
        fn = lambda x: K.token_logprobs(x, y, m, impl="pallas", return_entropy=True, layout=layout, **BLOCKS)  # noqa: E731
        return jax.grad(lambda x: loss(fn(x)))(x)

    g = jax.jit(step)(xs, ys, ms)
    assert max_err(g, g_want) < 1e-5
    assert g.sharding.spec == P("data", None, "model")
