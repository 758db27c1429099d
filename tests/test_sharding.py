"""Mesh construction, the rules table, sharded init, and sharded = single-device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cpo_jax import sharding as shd
from cpo_jax.models import Transformer, configs, token_logprobs


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
  mesh = shd.make_mesh(shd.mesh_config(data=2, fsdp=-1, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(shd.make_mesh(shd.mesh_config()).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="at most one"):
    shd.make_mesh(shd.mesh_config(data=-1, fsdp=-1))
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    shd.make_mesh(shd.mesh_config(data=-1, tensor=3))
  with pytest.raises(ValueError, match="needs 4 devices"):
    shd.make_mesh(shd.mesh_config(data=2, fsdp=2, tensor=1))


def test_rules_table_and_divisibility_errors():
  mesh = shd.make_mesh(shd.mesh_config(data=2, fsdp=2, tensor=2))
  assert shd.logical_to_spec(("batch", "length", "embed"), mesh=mesh) == P(("data", "fsdp"), None, None)
  assert shd.logical_to_spec(("embed", "vocab"), mesh=mesh) == P("fsdp", "tensor")
  assert shd.logical_to_spec(("heads", "head_dim", "embed"), mesh=mesh) == P("tensor", None, "fsdp")
  fsdp = shd.make_mesh(shd.mesh_config(fsdp=8, data=1))
  assert shd.logical_to_spec(("vocab", "embed"), mesh=fsdp) == P(None, "fsdp")  # size-1 axes dropped
  with pytest.raises(ValueError, match=r"kv_heads.*size 3 does not divide mesh axes \('tensor',\)"):
    shd.logical_to_spec(("embed", "kv_heads"), shape=(8, 3), mesh=mesh, what="w")
  with pytest.raises(KeyError, match="no rule"):
    shd.logical_to_spec(("nonsense",))


def test_indivisible_batch_and_parameter_raise():
  mesh = shd.make_mesh(shd.mesh_config(data=8))
  with pytest.raises(ValueError, match=r"batch field tokens.*size 6 does not divide"):
    shd.shard_batch({"tokens": np.zeros((6, 4), np.int32)}, mesh)
  cfg = configs.tiny()
  cfg.n_kv_heads = 1
  tp = shd.make_mesh(shd.mesh_config(data=4, tensor=2))
  with pytest.raises(ValueError, match=r"parameter layers/0/attn/k: .*'kv_heads'"):
    shd.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), tp)
  with shd.use_mesh(mesh):
    with pytest.raises(ValueError, match="activation"):
      jax.jit(lambda x: shd.constrain(x, ("batch", "embed")))(jnp.zeros((4, 2)))


def test_constrain_is_noop_outside_mesh():
  x = jnp.ones((3, 5))
  assert shd.constrain(x, ("batch", "embed")) is x
  with pytest.raises(ValueError, match="do not match"):
    shd.constrain(x, ("batch",))


def _loss(graphdef, params, batch, impl):
  out = token_logprobs(nnx.merge(graphdef, params), batch["tokens"], batch["mask"], impl=impl)
  return -jnp.sum(out.seq_logprobs) / jnp.sum(out.token_count)


@functools.lru_cache(maxsize=None)
def _single_device_reference(impl):
  cfg = configs.tiny()
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  batch = _host_batch()
  loss, grads = jax.jit(jax.value_and_grad(functools.partial(_loss, graphdef), argnums=0),
                        static_argnums=2)(params, batch, impl)
  return loss, grads


def _host_batch():
  rng = np.random.RandomState(0)
  mask = np.ones((8, 12), bool)
  mask[::2, :3] = False
  mask[1::2, -4:] = False
  return {"tokens": rng.randint(0, 256, (8, 12)).astype(np.int32), "mask": mask}


@pytest.mark.parametrize("sizes,impl", [
    (dict(data=8), "reference"), (dict(data=1, fsdp=8), "reference"),
    (dict(data=2, fsdp=2, tensor=2), "reference"),
    (dict(data=2, fsdp=2, tensor=2), "chunked"),   # the kernel's shard_map with vocab on tensor
])
def test_sharded_forward_backward_equals_single_device(sizes, impl):
  mesh = shd.make_mesh(shd.mesh_config(**sizes))
  cfg = configs.tiny()
  graphdef, params = shd.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  logical = jax.tree.leaves(nnx.get_partition_spec(params))
  for names, (path, x) in zip(logical, jax.tree_util.tree_leaves_with_path(params)):
    want = shd.logical_to_spec(tuple(names), mesh=mesh)
    assert x.sharding.spec == want and x.sharding.mesh == mesh, path
  if sizes.get("fsdp") == 8:   # really split: each device holds 1/8 of embed
    assert params["embed"][...].addressable_shards[0].data.shape == (256, 8)
  if sizes.get("tensor") == 2:
    assert params["layers"][0]["mlp"]["gate"][...].sharding.spec == P("fsdp", "tensor")
  with shd.use_mesh(mesh):
    batch = shd.shard_batch(_host_batch(), mesh)
    assert batch["tokens"].sharding.spec == shd.logical_to_spec(("batch", None), mesh=mesh)
    step = jax.jit(jax.value_and_grad(functools.partial(_loss, graphdef)), static_argnums=2)
    loss, grads = step(params, batch, impl)
  ref_loss, ref_grads = _single_device_reference(impl)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4),
               grads, ref_grads)


def test_generation_under_mesh_equals_single_device():
  from cpo_jax.models import generate
  cfg = configs.tiny()
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  host = _host_batch()
  prompt, prompt_mask = host["tokens"][:, :6], np.ones((8, 6), bool)
  prompt_mask[::2, :2] = False

  def run(params, prompt, prompt_mask):
    return generate(nnx.merge(graphdef, params), prompt, prompt_mask, jax.random.key(0),
                    max_new_tokens=4, temperature=0.8, top_p=0.9)

  want = jax.jit(run)(params, prompt, prompt_mask)
  mesh = shd.make_mesh(shd.mesh_config(data=2, fsdp=2, tensor=2))
  _, sharded = shd.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  with shd.use_mesh(mesh):
    batch = shd.shard_batch({"prompt": prompt, "mask": prompt_mask}, mesh)
    got = jax.jit(run)(sharded, batch["prompt"], batch["mask"])
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
