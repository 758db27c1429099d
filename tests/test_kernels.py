"""Values and gradients of the log-prob kernels against the plain-JAX references.

On CPU the Pallas kernels run in interpret mode; on an accelerator (set
JAX_PLATFORMS and CPO_JAX_PALLAS_INTERPRET=0, see experiments/gpu_check.sh)
the same tests run compiled. Shapes are tiny and ragged on purpose: V is
not a multiple of the vocab tile, N not a multiple of the row tile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax import kernels as K

BACKEND = jax.default_backend()
COMPILED = not K.resolve_interpret(None, BACKEND)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
BLOCKS = dict(block_n=8, block_v=128)

# (impl, pallas_driver) for the logits path; Triton only exists on GPU or interpreted.
LOGITS_IMPLS = [("pallas", None), ("chunked", None)]
if not COMPILED or BACKEND == "gpu":
    LOGITS_IMPLS.append(("pallas", "triton"))
HIDDEN_IMPLS = ["chunked"] + (["pallas"] if not (COMPILED and BACKEND == "gpu") else [])


def rel_err(a, b):
    """max|a - b| / max(max|b|, 1): relative for large values, absolute near 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))


def make_logits(shape, dtype, scale=3.0, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = (jax.random.normal(k1, shape) * scale).astype(dtype)
    y = jax.random.randint(k2, shape[:-1], 0, shape[-1])
    mask = jax.random.bernoulli(k3, 0.75, shape[:-1])
    return x, y, mask


def weighted_loss(result, ent_weight=0.3):
    """A loss touching every output with distinct per-token weights."""
    w = jnp.cos(jnp.arange(result.logprobs.size, dtype=jnp.float32)).reshape(result.logprobs.shape)
    total = jnp.sum(result.logprobs * w) + 0.5 * jnp.sum(result.seq_logprobs)
    if result.entropy is not None:
        total = total + ent_weight * jnp.sum(result.entropy * w[::-1])
    return total


def check_logits(x, y, mask, impl, driver, return_entropy=True):
    fn = lambda x: K.token_logprobs(  # noqa: E731
        x, y, mask, impl=impl, pallas_driver=driver, return_entropy=return_entropy, **BLOCKS
    )
    ref = lambda x: K.token_logprobs_reference(x, y, mask, return_entropy=return_entropy)  # noqa: E731
    tol = TOL[x.dtype.type]
    out, want = jax.jit(fn)(x), ref(x)
    assert out.logprobs.dtype == jnp.float32
    assert rel_err(out.logprobs, want.logprobs) < tol
    assert rel_err(out.seq_logprobs, want.seq_logprobs) < tol
    np.testing.assert_array_equal(out.token_count, want.token_count)
    if return_entropy:
        assert rel_err(out.entropy, want.entropy) < tol
    else:
        assert out.entropy is None
    g = jax.jit(jax.grad(lambda x: weighted_loss(fn(x))))(x)
    g_want = jax.grad(lambda x: weighted_loss(ref(x)))(x)
    assert g.dtype == x.dtype and g.shape == x.shape
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
    assert rel_err(g, g_want) < tol
    return out, g


@pytest.mark.parametrize("impl,driver", LOGITS_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logits_ragged_matches_reference(impl, driver, dtype):
    # N = 2*5 = 10 rows (block 8), V = 300 (block 128): both edges ragged.
    x, y, mask = make_logits((2, 5, 300), dtype)
    mask = mask.at[1].set(False)  # a fully masked sequence
    out, g = check_logits(x, y, mask, impl, driver)
    assert float(out.seq_logprobs[1]) == 0.0 and float(out.token_count[1]) == 0.0
    np.testing.assert_array_equal(np.asarray(g[1], np.float32), 0.0)


@pytest.mark.parametrize("impl,driver", LOGITS_IMPLS)
def test_logits_single_token_and_no_entropy(impl, driver):
    x, y, mask = make_logits((3, 1, 130), jnp.float32, seed=1)
    check_logits(x, y, mask, impl, driver, return_entropy=False)


@pytest.mark.parametrize("impl,driver", LOGITS_IMPLS)
def test_logits_extreme_values(impl, driver):
    x, y, _ = make_logits((4, 200), jnp.float32, seed=2)
    x = x.at[:, 7].set(1e4).at[0, 150].set(-1e4).at[1].set(-1e4).at[2, y[2]].set(1e4)
    out, _ = check_logits(x, y, None, impl, driver)
    assert np.all(np.isfinite(out.logprobs)) and np.all(np.isfinite(out.entropy))
    assert float(out.logprobs[2]) > -1.0  # target tied at the max: log(1/2)


@pytest.mark.parametrize("impl,driver", LOGITS_IMPLS)
def test_logits_fully_masked_is_zero_not_nan(impl, driver):
    x, y, _ = make_logits((2, 3, 150), jnp.float32, seed=3)
    mask = jnp.zeros(y.shape, bool)
    out = K.token_logprobs(x, y, mask, impl=impl, pallas_driver=driver, return_entropy=True, **BLOCKS)
    for a in (out.logprobs, out.entropy, out.seq_logprobs, out.token_count):
        np.testing.assert_array_equal(a, 0.0)
    g = jax.grad(lambda x: weighted_loss(K.token_logprobs(x, y, mask, impl=impl, pallas_driver=driver, **BLOCKS)))(x)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("impl,driver", LOGITS_IMPLS[:2])
def test_logits_vmap_and_grad(impl, driver):
    x, y, mask = make_logits((3, 4, 140), jnp.float32, seed=4)

    def per_example(x_TV, y_T, m_T):
        return K.token_logprobs(x_TV, y_T, m_T, impl=impl, pallas_driver=driver, **BLOCKS).seq_logprobs

    got = jax.vmap(per_example)(x, y, mask)
    want = K.token_logprobs_reference(x, y, mask).seq_logprobs
    assert rel_err(got, want) < 1e-5
    g = jax.grad(lambda x: jnp.sum(jax.vmap(per_example)(x, y, mask) ** 2))(x)
    g_want = jax.grad(lambda x: jnp.sum(K.token_logprobs_reference(x, y, mask).seq_logprobs ** 2))(x)
    assert rel_err(g, g_want) < 1e-5


def make_hidden(n_shape, d, v, dtype, w_scale=0.5, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    h = jax.random.normal(k1, (*n_shape, d)).astype(dtype)
    w = (jax.random.normal(k2, (d, v)) * w_scale).astype(dtype)
    y = jax.random.randint(k3, n_shape, 0, v)
    mask = jax.random.bernoulli(k4, 0.75, n_shape)
    return h, w, y, mask


def check_hidden(h, w, y, mask, impl, return_entropy=True):
    fn = lambda h, w: K.token_logprobs_from_hidden(  # noqa: E731
        h, w, y, mask, impl=impl, return_entropy=return_entropy, **BLOCKS
    )
    ref = lambda h, w: K.token_logprobs_from_hidden_reference(h, w, y, mask, return_entropy=return_entropy)  # noqa: E731
    tol = TOL[h.dtype.type]
    with jax.default_matmul_precision("highest"):
        out, want = jax.jit(fn)(h, w), ref(h, w)
        grads = jax.jit(jax.grad(lambda h, w: weighted_loss(fn(h, w)), argnums=(0, 1)))(h, w)
        grads_want = jax.grad(lambda h, w: weighted_loss(ref(h, w)), argnums=(0, 1))(h, w)
    assert rel_err(out.logprobs, want.logprobs) < tol
    if return_entropy:
        assert rel_err(out.entropy, want.entropy) < tol
    for g, g_want, a in zip(grads, grads_want, (h, w)):
        assert g.dtype == a.dtype and g.shape == a.shape
        assert rel_err(g, g_want) < tol
    return out


@pytest.mark.parametrize("impl", HIDDEN_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hidden_ragged_matches_reference(impl, dtype):
    h, w, y, mask = make_hidden((2, 5), 16, 300, dtype)
    out = check_hidden(h, w, y, mask.at[0].set(False), impl)
    np.testing.assert_array_equal(out.logprobs[0], 0.0)


@pytest.mark.parametrize("impl", HIDDEN_IMPLS)
def test_hidden_extreme_and_single_token(impl):
    h, w, y, _ = make_hidden((3, 1), 8, 260, jnp.float32, w_scale=2e3, seed=5)
    out = check_hidden(h, w, y, None, impl)
    assert np.max(np.abs(np.asarray(h @ w))) > 1e3  # logits really are extreme
    assert np.all(np.isfinite(out.logprobs)) and np.all(np.isfinite(out.entropy))


@pytest.mark.parametrize("impl", HIDDEN_IMPLS)
def test_hidden_vmap_over_h(impl):
    h, w, y, mask = make_hidden((2, 3), 8, 140, jnp.float32, seed=7)

    def per_example(h_TD, w_DV, y_T, m_T):
        return K.token_logprobs_from_hidden(h_TD, w_DV, y_T, m_T, impl=impl, **BLOCKS).seq_logprobs

    batched = jax.vmap(per_example, in_axes=(0, None, 0, 0))
    with jax.default_matmul_precision("highest"):
        want = K.token_logprobs_from_hidden_reference(h, w, y, mask).seq_logprobs
        g = jax.grad(lambda h, w: jnp.sum(batched(h, w, y, mask) ** 2), argnums=(0, 1))(h, w)
        g_want = jax.grad(
            lambda h, w: jnp.sum(K.token_logprobs_from_hidden_reference(h, w, y, mask).seq_logprobs ** 2),
            argnums=(0, 1),
        )(h, w)
        assert rel_err(batched(h, w, y, mask), want) < 1e-5
    for a, b in zip(g, g_want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("v,block_v", [(129, 128), (300, 64), (37, 16)])
def test_hidden_chunked_clamped_last_chunk(v, block_v):
    """Chunked path: any V / chunk combination (clamped, overlapping last chunk)."""
    h, w, y, mask = make_hidden((6,), 8, v, jnp.float32, seed=v)
    fn = lambda h, w: K.token_logprobs_from_hidden(h, w, y, mask, impl="chunked", block_v=block_v)  # noqa: E731
    ref = lambda h, w: K.token_logprobs_from_hidden_reference(h, w, y, mask)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        assert rel_err(fn(h, w).logprobs, ref(h, w).logprobs) < 1e-5
        g = jax.grad(lambda h, w: weighted_loss(fn(h, w)), argnums=(0, 1))(h, w)
        g_want = jax.grad(lambda h, w: weighted_loss(ref(h, w)), argnums=(0, 1))(h, w)
    for a, b in zip(g, g_want):
        assert rel_err(a, b) < 1e-5


def test_streaming_equals_logits_path():
    """The fused hidden path equals the logits path on the materialised h @ w."""
    h, w, y, mask = make_hidden((2, 3), 16, 200, jnp.float32, seed=6)
    with jax.default_matmul_precision("highest"):
        a = K.token_logprobs_from_hidden(h, w, y, mask, impl="chunked", return_entropy=True, block_v=64)
        b = K.token_logprobs(h @ w, y, mask, impl="chunked", return_entropy=True, block_v=64)
    assert rel_err(a.logprobs, b.logprobs) < 1e-5 and rel_err(a.entropy, b.entropy) < 1e-5


def test_dispatch_rules(monkeypatch):
    assert K.resolve_impl("auto", "logits", "cpu", 8, 100) == "reference"
    assert K.resolve_impl("auto", "logits", "cpu", 1 << 12, 1 << 12) == "reference"
    assert K.resolve_impl("auto", "logits", "cpu", 1 << 12, 1 << 15) == "chunked"
    assert K.resolve_impl("auto", "logits", "gpu", 1 << 12, 1 << 12) == "pallas"
    assert K.resolve_impl("auto", "hidden", "gpu", 1 << 12, 1 << 12) == "chunked"
    assert K.resolve_impl("auto", "hidden", "tpu", 1 << 12, 1 << 12) == "pallas"
    assert K.resolve_impl("chunked", "logits", "tpu", 8, 8) == "chunked"
    with pytest.raises(ValueError):
        K.resolve_impl("fast", "logits", "cpu", 8, 8)
    monkeypatch.delenv(K.INTERPRET_ENV, raising=False)
    assert K.resolve_interpret(None, "cpu") and not K.resolve_interpret(None, "gpu")
    monkeypatch.setenv(K.INTERPRET_ENV, "1")
    assert K.resolve_interpret(None, "gpu")
    monkeypatch.setenv(K.INTERPRET_ENV, "0")
    assert not K.resolve_interpret(None, "tpu") and K.resolve_interpret(True, "tpu")


def test_shape_validation():
    x, y, _ = make_logits((2, 3, 10), jnp.float32)
    with pytest.raises(ValueError):
        K.token_logprobs(x, y[:, :2])
    with pytest.raises(ValueError):
        K.token_logprobs(x, y, jnp.ones((2, 2), bool))
    with pytest.raises(ValueError):
        K.token_logprobs_from_hidden(x, jnp.ones((9, 4)), y)
