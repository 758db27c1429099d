"""The training step and loop: invariants, sharding, accumulation, NaN, config refusal."""

from __future__ import annotations

import json
import struct

import jax
import numpy as np
import pytest

from cpo_jax import checkpoint as ckpt_lib
from cpo_jax import inputs, train, writers
from cpo_jax import sharding as shd
from train_helpers import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def _host(tree):
  return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def _one_batch(config):
  return next(inputs.Inputs(config.data).train_iterator())


def _step(config, mesh, batch, n=1):
  """Runs `n` steps on `batch`; returns params/ref before and after and the last metrics."""
  s = train.setup(config, mesh)
  params0, ref0 = _host(s.state["params"]), _host(s.ref_params)
  state = s.state
  with shd.use_mesh(mesh):
    for _ in range(n):
      state, metrics = s.step_fn(state, s.ref_params, train.device_batch(batch, mesh))
  return params0, ref0, _host(state["params"]), _host(s.ref_params), _host(metrics)


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_policy_moves_and_reference_stays(data_dir):
  config = tiny_config(data_dir)
  mesh = shd.make_mesh(shd.mesh_config(data=2, fsdp=2, tensor=2))
  params0, ref0, params1, ref1, metrics = _step(config, mesh, _one_batch(config))
  assert _max_diff(params0, params1) > 1e-4  # every leaf sees a gradient; the max moved
  moved = [float(np.max(np.abs(a - b))) > 0 for a, b in
           zip(jax.tree.leaves(params0), jax.tree.leaves(params1))]
  assert all(moved)
  assert _max_diff(ref0, ref1) == 0.0
  assert _max_diff(ref0, params0) == 0.0  # reference = the policy's init
  # At init the policy is the reference: DPO loss log 2, delta == delta_ref.
  np.testing.assert_allclose(metrics["loss"], np.log(2.0), rtol=1e-5)
  np.testing.assert_allclose(metrics["delta"], metrics["delta_ref"], atol=1e-5)
  assert metrics["nonfinite"] == 0.0
  for key in ("accuracy_absolute", "accuracy_relative", "ref_prefers_rejected", "violating",
              "rewards_chosen", "rewards_rejected", "margin", "delta_ref_sum", "delta_ref_mean",
              "grad_norm", "lr"):
    assert np.isfinite(metrics[key]), key


def test_sharded_step_equals_single_device(data_dir):
  config = tiny_config(data_dir)
  config.loss.name = "cpo_smooth"
  batch = _one_batch(config)
  one = shd.make_mesh(shd.mesh_config(data=1), devices=jax.devices()[:1])
  eight = shd.make_mesh(shd.mesh_config(data=2, fsdp=2, tensor=2))
  # Two steps: at init delta == delta_ref up to rounding, so indicator metrics
  # (accuracy_relative, in_U) would compare rounding noise.
  _, _, p1, _, m1 = _step(config, one, batch, n=2)
  _, _, p8, _, m8 = _step(config, eight, batch, n=2)
  assert _max_diff(p1, p8) < 1e-5
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_accumulation_equals_large_batch(data_dir, loss):
  config = tiny_config(data_dir)
  config.loss.name = loss
  batch = _one_batch(config)
  batch["valid"][-1] = False  # a padding row must weigh nothing either way
  # Adam's first update is lr * g / (|g| + eps): with a tiny eps it maps
  # rounding-level differences of near-zero gradients to O(lr) parameter
  # changes. A larger eps keeps the update linear in g, so params compare tightly.
  config.optim.eps = 1e-3
  mesh = shd.make_mesh(shd.mesh_config(data=1), devices=jax.devices()[:1])
  _, _, p_big, _, m_big = _step(config, mesh, batch, n=2)
  config.optim.grad_accum = 8
  _, _, p_acc, _, m_acc = _step(config, mesh, batch, n=2)
  assert _max_diff(p_big, p_acc) < 1e-6
  for k in m_big:
    np.testing.assert_allclose(m_acc[k], m_big[k], rtol=1e-5, atol=1e-6, err_msg=k)


class _NaNAt:
  """A PairIterator whose batches carry a cached reference log-prob, NaN at one step."""

  def __init__(self, it, nan_step):
    self.it, self.nan_step, self.n = it, nan_step, 0

  def __next__(self):
    batch = next(self.it)
    self.n += 1
    ref = np.zeros((len(batch["valid"]), 2), np.float32)
    batch["ref_logps_sum"] = ref + (np.nan if self.n == self.nan_step else -20.0)
    return batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def test_nan_stops_cleanly_keeping_last_good_checkpoint(data_dir, tmp_path):
  config = tiny_config(data_dir, steps=20, ckpt_every=3)
  it = _NaNAt(inputs.Inputs(config.data).train_iterator(), nan_step=8)
  with pytest.raises(train.NonFiniteError, match="step 8"):
    train.train(config, str(tmp_path), data=it)
  ck = ckpt_lib.Checkpointer(tmp_path, read_only=True)
  assert ck.latest_step() == 6
  s = train.setup(config)
  params = ck.restore_params(s.state["params"], s.param_sh)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  steps = [r["step"] for r in writers.read_jsonl(tmp_path / "metrics.jsonl")]
  assert steps == list(range(1, 8))


def test_resume_logs_and_changed_model_refused(data_dir, tmp_path):
  config = tiny_config(data_dir, steps=4, ckpt_every=2)
  out = train.train(config, str(tmp_path))
  assert out["step"] == 4 and not out["preempted"]
  config.train.steps = 6
  out = train.train(config, str(tmp_path))  # resumes at 4
  recs = [r for r in writers.read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
  assert {"loss", "in_U", "accuracy_absolute", "tokens_per_s", "lr"} <= set(recs[0])
  events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(events) == 2
  tags = _read_event_tags(events[0])
  assert "train/loss" in tags and "train/in_U" in tags
  config.model.n_layers = 3  # resuming another model is refused, naming the field
  with pytest.raises(ckpt_lib.ConfigMismatchError, match="n_layers: saved 2, now 3"):
    train.train(config, str(tmp_path))


def _read_event_tags(path) -> set[str]:
  """Parses TFRecord framing (checking both CRCs) and pulls the scalar tags out."""
  raw, tags, pos = path.read_bytes(), set(), 0
  while pos < len(raw):
    (n,) = struct.unpack("<Q", raw[pos:pos + 8])
    assert struct.unpack("<I", raw[pos + 8:pos + 12])[0] == writers._masked_crc(raw[pos:pos + 8])
    data = raw[pos + 12:pos + 12 + n]
    assert struct.unpack("<I", raw[pos + 12 + n:pos + 16 + n])[0] == writers._masked_crc(data)
    pos += 16 + n
    i = data.find(b"\x2a")  # summary field; tags are the 0x0a-prefixed strings inside
    while i != -1 and b"/" in data:
      j = data.find(b"train/", i)
      if j == -1:
        break
      end = data.find(b"\x15", j)
      tags.add(data[j:end].decode())
      i = end
  return tags


def test_crc32c_and_event_encoding():
  assert writers.crc32c(b"123456789") == 0xE3069283  # the standard check value
  ev = writers.encode_event(7, 1.5, scalars={"a/b": 2.0})
  assert ev[:9] == b"\x09" + struct.pack("<d", 1.5) and ev[9:11] == b"\x10\x07"
  assert ev.endswith(b"\x15" + struct.pack("<f", 2.0))
  assert json.dumps(writers.read_jsonl("/nonexistent")) == "[]"
