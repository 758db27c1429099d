"""Input checks shared by losses, RLHF pieces and diagnostics.

Shapes are static under jit, so shape errors are always raised. Values are
checked only when concrete (Python numbers); traced hyper-parameters pass.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def as_f32(x) -> jax.Array:
  """Upcasts to at least float32 (bf16/f16 inputs are read, maths is float32)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def as_pairs(name: str, x) -> jax.Array:
  """float32 array of shape [B, 2] (chosen, rejected), or a ValueError."""
  x = as_f32(x)
  if x.ndim != 2 or x.shape[-1] != 2:
    raise ValueError(
        f"{name} must have shape [B, 2] (chosen, rejected); got {x.shape}.")
  return x


def check_positive(name: str, value) -> None:
  """Raises for a concrete hyper-parameter <= 0."""
  if isinstance(value, numbers.Real) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")


def check_same_shape(**arrays) -> None:
  """Raises a ValueError naming every argument when shapes differ."""
  shapes = {name: jnp.shape(a) for name, a in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"shapes must match, got {shapes}.")
