"""HF import/export against `transformers` (test-only dependency, CPU torch).

Tiny random checkpoints are created locally with `save_pretrained`; nothing
is downloaded.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cpo_jax import sharding as shd  # noqa: E402
from cpo_jax.models import CheckpointError, load_hf, save_hf  # noqa: E402

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               rms_norm_eps=1e-5)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0,
                                               original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4, head_dim=8)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=1e6)),
}


def _hf_model(family, seed=0):
  config_cls, extra = FAMILIES[family]
  torch.manual_seed(seed)
  cfg = config_cls(**_COMMON, **extra)
  cfg._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval().float()
  with torch.no_grad():   # perturb everything (norm scales, biases) so layout bugs show
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _hf_logits(model, tokens, mask):
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(pos, dtype=torch.long))
  return out.logits.numpy()


def _batch():
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 96, (4, 10)).astype(np.int32)
  mask = np.ones((4, 10), np.int32)
  mask[0, :4] = 0          # left-padded prompt
  mask[1, -3:] = 0         # right-padded response
  mask[2, :2] = 0
  mask[2, -2:] = 0         # both
  return tokens, mask


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
  model = _hf_model(request.param)
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  return request.param, path, model


def _logits(graphdef, params, tokens, mask):
  return np.asarray(jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, m))(params, tokens, mask))


def test_logits_parity_and_export_round_trip(checkpoint, tmp_path):
  family, path, hf = checkpoint
  tokens, mask = _batch()
  want = _hf_logits(hf, tokens, mask)
  mesh = shd.make_mesh(shd.mesh_config(data=2, fsdp=2, tensor=2))
  cfg, graphdef, params = load_hf(path, mesh=mesh)
  assert cfg.family == family
  assert params["layers"][0]["attn"]["q"][...].sharding.spec == shd.logical_to_spec(
      ("embed", "heads", "head_dim"), mesh=mesh)
  got = _logits(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)

  save_hf(str(tmp_path), cfg, params, dtype="float32")
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  back.config._attn_implementation = "eager"
  for name, tensor in hf.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)
  np.testing.assert_allclose(_hf_logits(back, tokens, mask)[valid], want[valid], atol=1e-5)


def test_sharded_index_export_reimports(checkpoint, tmp_path):
  family, path, _ = checkpoint
  cfg, graphdef, params = load_hf(path)
  save_hf(str(tmp_path), cfg, params, dtype="bfloat16", max_shard_bytes=10_000)
  files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  assert len(files) > 2 and os.path.exists(tmp_path / "model.safetensors.index.json")
  cfg2, _, params2 = load_hf(str(tmp_path), param_dtype="bfloat16")
  assert cfg2.to_dict() == dict(cfg.to_dict(), param_dtype="bfloat16")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.astype(jnp.bfloat16), b),
               params, params2)


def _copy(src, dst, edit_tensors=None, edit_config=None):
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  if edit_config:
    edit_config(config)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  return dst


Q = "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("edit,match", [
    (dict(edit_config=lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])),
     r"config\.json.*unsupported architecture.*gpt2"),
    (dict(edit_tensors=lambda t: t.pop(Q)), rf"{Q}.* missing .*model\.safetensors"),
    (dict(edit_tensors=lambda t: t.update({Q: t[Q][:-1]})),
     rf"{Q}.* in .*model\.safetensors has shape \(31, 32\), expected \(32, 32\)"),
    (dict(edit_tensors=lambda t: t.update({Q: t[Q].astype(np.int32)})),
     rf"{Q}.* in .*model\.safetensors has dtype I32"),
    (dict(edit_tensors=lambda t: t.update(extra=np.zeros(3, np.float32))),
     r"unexpected tensors .*'extra' \(model\.safetensors\)"),
])
def test_bad_checkpoints_name_tensor_and_file(tmp_path, edit, match):
  src = str(tmp_path / "good")
  _hf_model("llama").save_pretrained(src)
  bad = _copy(src, str(tmp_path / "bad"), **edit)
  with pytest.raises(CheckpointError, match=match):
    load_hf(bad)


def test_import_reads_only_each_devices_slice(checkpoint, monkeypatch):
  """Under fsdp=8 every callback returns 1/8 of the embedding, never the full table."""
  from cpo_jax.models import hf as hf_module
  family, path, _ = checkpoint
  shapes = {}
  real_read = hf_module._read

  def spy(sl, layout, index, shape):
    out = real_read(sl, layout, index, shape)
    shapes.setdefault(shape, set()).add(out.shape)
    return out

  monkeypatch.setattr(hf_module, "_read", spy)
  mesh = shd.make_mesh(shd.mesh_config(data=1, fsdp=8))
  _, _, params = load_hf(path, mesh=mesh)
  assert shapes[(96, 32)] == {(96, 4)}                 # embed [vocab, embed/8]
  assert shapes[(32, 4, 8)] == {(4, 4, 8)}             # q [embed/8, heads, head_dim]
  assert params["embed"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
