"""Device mesh, the logical-to-mesh rules table, and sharded state/batches.

Model code names what each dimension *is* (`batch`, `length`, `embed`, `mlp`,
`heads`, `kv_heads`, `head_dim`, `vocab`); `RULES` says which mesh axes it is
split over. A mesh axis is used at most once per array: when two dimensions
map to the same mesh axis the later one stays whole (e.g. activations
[batch, length, embed] are split over batch only under FSDP).

    mesh = make_mesh(mesh_config(data=2, fsdp=-1, tensor=2))
    with use_mesh(mesh):
      graphdef, params = create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
      batch = shard_batch(np_batch, mesh)

Every split is checked: a dimension that does not divide its mesh axes
raises ValueError naming the array and the axis (never silent replication).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The one rules table: logical axis -> mesh axes (None: not split).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
)

_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar("cpo_jax_rules", default=None)


def mesh_config(**sizes: int) -> ml_collections.ConfigDict:
  """Mesh shape config: sizes of `data`, `fsdp`, `tensor`; one may be -1 (the rest)."""
  c = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.update(sizes)
  return c


def make_mesh(cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a (data, fsdp, tensor) mesh with Auto axis types from `mesh_config`."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(names: Sequence[str | None], *, shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | None = None, rules=RULES, what: str = "array") -> P:
  """PartitionSpec for logical axis `names`; checks divisibility when shape and mesh are given."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is not None and name not in table:
      raise KeyError(f"{what}: logical axis {name!r} has no rule; known: {sorted(table)}")
    axes = table.get(name) if name is not None else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    if shape is not None and mesh is not None and axes:
      n = math.prod(mesh.shape[a] for a in axes)
      if shape[i] % n:
        raise ValueError(f"{what}: dimension {i} ({name!r}) of size {shape[i]} does not divide "
                         f"mesh axes {axes} of total size {n} (shape {tuple(shape)})")
    spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*spec)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules=RULES):
  """Sets `mesh` as JAX's context mesh and `rules` for `constrain` inside the block.

  Jitted functions are cached per context mesh; retrace (new jit) if you
  change `rules` for the same mesh.
  """
  token = _ACTIVE_RULES.set((mesh, tuple(rules)))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE_RULES.reset(token)


def active() -> tuple[jax.sharding.Mesh, tuple] | None:
  """(mesh, rules) set by the innermost `use_mesh`, or None."""
  return _ACTIVE_RULES.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `use_mesh`."""
  if len(names) != x.ndim:
    raise ValueError(f"logical names {tuple(names)} do not match shape {x.shape}")
  act = _ACTIVE_RULES.get()
  if act is None:
    return x
  mesh, rules = act
  spec = logical_to_spec(names, shape=x.shape, mesh=mesh, rules=rules, what=f"activation {names}")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _path_str(path) -> str:
  """'layers/0/attn/q' from a pytree key path (attribute keys such as `.value` dropped)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path
                  if not isinstance(k, jax.tree_util.GetAttrKey))


def state_shardings(state, mesh: jax.sharding.Mesh, rules=RULES):
  """NamedSharding tree for an nnx State (abstract or concrete) from its `out_sharding` names."""
  flat_specs, treedef = jax.tree_util.tree_flatten_with_path(nnx.get_partition_spec(state))
  out = []
  for (path, names), leaf in zip(flat_specs, jax.tree.leaves(state)):
    shape = leaf.shape
    names = tuple(names) if names else (None,) * len(shape)
    out.append(NamedSharding(mesh, logical_to_spec(
        names, shape=shape, mesh=mesh, rules=rules, what=f"parameter {_path_str(path)}")))
  return jax.tree_util.tree_unflatten(treedef, out)


def create_sharded(make_model: Callable[[], nnx.Module], mesh: jax.sharding.Mesh,
                   rules=RULES, filter_=nnx.Param):
  """Initialises `make_model()` directly into the sharded layout.

  `nnx.eval_shape` gives the abstract state, the rules give shardings, and
  the initialiser runs under `jax.jit(out_shardings=...)`, so no device ever
  holds a full replica. Returns `(graphdef, state)` of the `filter_` part
  (parameters by default); rebuild with `nnx.merge(graphdef, state)`.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model), filter_)
  shardings = state_shardings(abstract, mesh, rules)

  def init():
    return nnx.split(make_model(), filter_)[1]

  with use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules=RULES) -> NamedSharding:
  """Sharding of a [batch, ...] array: batch split by the rules, the rest whole."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh,
                                              rules=rules))


def shard_batch(batch, mesh: jax.sharding.Mesh, rules=RULES):
  """Places a pytree of host arrays (this process's rows) as global batch-sharded arrays.

  Uses `jax.make_array_from_process_local_data`, so on several hosts each
  passes its own slice of the global batch. The global batch size must be
  divisible by the product of the mesh axes `batch` maps to.
  """
  def place(path, x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim, rules)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    logical_to_spec(("batch",) + (None,) * (x.ndim - 1), shape=global_shape, mesh=mesh,
                    rules=rules, what=f"batch field {_path_str(path) or 'array'}")
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree_util.tree_map_with_path(place, batch)
