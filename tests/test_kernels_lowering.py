"""The compiled (non-interpret) kernels lower for their real backends, from CPU.

`jit(...).trace(...).lower(lowering_platforms=...)` runs the Pallas Triton
lowering (GPU) and the Mosaic TPU lowering without the hardware, at the
default production tile sizes and ragged shapes, so CI catches an op the
backend cannot lower. (Backend compilation and numerics are checked on a
lent machine by experiments/gpu_check.sh.)
"""

import jax
import jax.numpy as jnp
import pytest

from cpo_jax import kernels as K
from cpo_jax.kernels import hidden_pallas, logits_pallas

N, V, D = 1000, 5000, 256  # neither a multiple of the tiles
TRITON = dict(block_n=4, block_v=2048, interpret=False)
GRID = dict(block_n=256, block_v=2048, interpret=False, backend="tpu")


def sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def lowered_text(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


ROW = sds((N,))


def cases(dtype):
    x, y = sds((N, V), dtype), sds((N,), jnp.int32)
    h, w = sds((N, D), dtype), sds((D, V), dtype)
    return {
        "triton_stats": ("cuda", lambda x, y: logits_pallas.triton_stats(x, y, with_entropy=True, **TRITON), (x, y)),
        "triton_grad": ("cuda", lambda *a: logits_pallas.triton_grad(*a, **TRITON), (x, y) + (ROW,) * 5),
        "triton_api_grad": (
            "cuda",
            lambda x, y: jax.grad(
                lambda x: jnp.sum(
                    K.token_logprobs(x, y, impl="pallas", interpret=False, pallas_driver="triton").logprobs
                )
            )(x),
            (x, y),
        ),
        "tpu_logits_stats": ("tpu", lambda x, y: logits_pallas.grid_stats(x, y, with_entropy=True, **GRID), (x, y)),
        "tpu_logits_grad": ("tpu", lambda *a: logits_pallas.grid_grad(*a, **GRID), (x, y) + (ROW,) * 5),
        "tpu_hidden_stats": (
            "tpu",
            lambda h, w, y: hidden_pallas.hidden_stats(h, w, y, with_entropy=True, **dict(GRID, block_v=512)),
            (h, w, y),
        ),
        "tpu_hidden_grad": (
            "tpu",
            lambda *a: hidden_pallas.hidden_grad(*a, **dict(GRID, block_v=512)),
            (h, w, y) + (ROW,) * 5,
        ),
    }


CUSTOM_CALL = {"cuda": "triton", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", sorted(cases(jnp.float32)))
def test_kernel_lowers_for_backend(name, dtype):
    platform, fn, args = cases(dtype)[name]
    text = lowered_text(fn, args, platform)
    assert CUSTOM_CALL[platform] in text
