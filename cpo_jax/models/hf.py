"""Hugging Face checkpoint import/export (Llama, Mistral, Qwen2; safetensors).

`load_hf(dir, mesh=...)` reads `config.json` and `*.safetensors` (single file
or sharded with `model.safetensors.index.json`) and builds every parameter
with `jax.make_array_from_callback`: each device reads only its own slice
from the file, so no device (or host buffer) ever holds a full copy of a
sharded tensor. `save_hf(dir, cfg, params)` writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

Every problem with a checkpoint raises `CheckpointError` naming the tensor
and the file. No torch/transformers import here.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from cpo_jax import sharding as shd
from cpo_jax.models import configs
from cpo_jax.models.transformer import Transformer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYER = {  # our name within a block -> (HF name within model.layers.{i}, layout)
    "attn_norm/scale": ("input_layernorm.weight", "same"),
    "mlp_norm/scale": ("post_attention_layernorm.weight", "same"),
    "attn/q": ("self_attn.q_proj.weight", "in_heads"),
    "attn/k": ("self_attn.k_proj.weight", "in_heads"),
    "attn/v": ("self_attn.v_proj.weight", "in_heads"),
    "attn/o": ("self_attn.o_proj.weight", "heads_out"),
    "attn/q_bias": ("self_attn.q_proj.bias", "bias_heads"),
    "attn/k_bias": ("self_attn.k_proj.bias", "bias_heads"),
    "attn/v_bias": ("self_attn.v_proj.bias", "bias_heads"),
    "mlp/gate": ("mlp.gate_proj.weight", "T"),
    "mlp/up": ("mlp.up_proj.weight", "T"),
    "mlp/down": ("mlp.down_proj.weight", "T"),
}
_TOP = {"embed": ("model.embed_tokens.weight", "same"),
        "final_norm/scale": ("model.norm.weight", "same"),
        "lm_head": ("lm_head.weight", "T")}


class CheckpointError(ValueError):
  """A checkpoint that does not match what the model expects."""


def _hf_entry(path: tuple) -> tuple[str, str]:
  """Our parameter path -> (HF tensor name, layout)."""
  name = "/".join(str(k) for k in path)
  if name in _TOP:
    return _TOP[name]
  _, i, rest = name.split("/", 2)
  hf_name, layout = _LAYER[rest]
  return f"model.layers.{i}.{hf_name}", layout


def _hf_shape(shape: tuple, layout: str) -> tuple:
  if layout == "same":
    return tuple(shape)
  if layout == "T":
    return tuple(shape[::-1])
  if layout == "in_heads":
    return (shape[1] * shape[2], shape[0])
  if layout == "heads_out":
    return (shape[2], shape[0] * shape[1])
  return (shape[0] * shape[1],)  # bias_heads


def _read(sl, layout: str, index: tuple, shape: tuple) -> np.ndarray:
  """Reads our slice `index` of a parameter of `shape` from HF tensor slice `sl`."""
  s = [slice(*ix.indices(n)[:2]) for ix, n in zip(index, shape)]
  if layout == "same":
    return sl[tuple(s)] if s else sl[:]
  if layout == "T":
    return sl[s[1], s[0]].T
  e = shape[-1] if layout == "bias_heads" else shape[2] if layout == "in_heads" else shape[1]
  hs = s[1] if layout == "in_heads" else s[0]
  rows = slice(hs.start * e, hs.stop * e)
  if layout == "in_heads":
    x = sl[rows, s[0]].T
    return x.reshape(x.shape[0], -1, e)[:, :, s[2]]
  if layout == "heads_out":
    x = sl[s[2], rows].T
    return x.reshape(-1, e, x.shape[1])[:, s[1], :]
  return sl[rows].reshape(-1, e)[:, s[1]]


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
  """Our full array -> HF layout."""
  if layout == "same":
    return x
  if layout == "T":
    return x.T
  if layout == "in_heads":
    return x.reshape(x.shape[0], -1).T
  if layout == "heads_out":
    return x.reshape(-1, x.shape[-1]).T
  return x.reshape(-1)


def config_from_hf(hf: dict, where: str = "config.json", *, param_dtype: str = "float32",
                   dtype: str = "float32") -> ml_collections.ConfigDict:
  """Our model config from a HF `config.json` dict; rejects what we cannot represent."""
  family = hf.get("model_type")
  archs = hf.get("architectures") or [ARCHITECTURES.get(family, "")]
  if family not in ARCHITECTURES or archs != [ARCHITECTURES[family]]:
    raise CheckpointError(f"{where}: unsupported architecture model_type={family!r} "
                          f"architectures={archs}; supported: {sorted(ARCHITECTURES.values())}")
  if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
    raise CheckpointError(f"{where}: only bias-free SiLU MLPs are supported")
  if family == "llama" and hf.get("attention_bias", False):
    raise CheckpointError(f"{where}: Llama attention_bias=True (o_proj bias) is not supported")
  if family == "qwen2" and hf.get("use_sliding_window", False):
    raise CheckpointError(f"{where}: Qwen2 use_sliding_window=True is not supported")
  rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported")
  theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
  c = configs.base()
  c.update(family=family, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
           n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
           n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
           head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
           mlp_dim=hf["intermediate_size"], rms_eps=hf.get("rms_norm_eps", 1e-6),
           rope_theta=float(theta), qkv_bias=family == "qwen2",
           tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
           max_len=hf.get("max_position_embeddings", 2048), param_dtype=param_dtype, dtype=dtype)
  if rope_type == "llama3":
    c.rope_scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                           "original_max_position_embeddings")}
    c.rope_scaling["rope_type"] = "llama3"
  c.sliding_window = hf.get("sliding_window") if family == "mistral" else None
  return c


def config_to_hf(cfg, dtype: str) -> dict:
  """HF `config.json` dict for our config (legacy and transformers>=5 rope keys)."""
  family = cfg.family
  if family not in ARCHITECTURES:
    raise ValueError(f"cannot export family {family!r}; supported: {sorted(ARCHITECTURES)}")
  if cfg.qkv_bias != (family == "qwen2"):
    raise ValueError(f"qkv_bias={cfg.qkv_bias} cannot be expressed as a {family} checkpoint")
  if cfg.sliding_window and family != "mistral":
    raise ValueError(f"sliding_window needs family 'mistral', got {family!r}")
  rope = dict(cfg.rope_scaling) if cfg.rope_scaling else {"rope_type": "default"}
  out = dict(architectures=[ARCHITECTURES[family]], model_type=family,
             vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
             num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
             num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
             max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.rms_eps,
             rope_theta=cfg.rope_theta, rope_parameters=dict(rope, rope_theta=cfg.rope_theta),
             tie_word_embeddings=cfg.tie_embeddings, torch_dtype=dtype, dtype=dtype)
  if cfg.rope_scaling:
    out["rope_scaling"] = dict(cfg.rope_scaling)
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  if family == "mistral":
    out["sliding_window"] = cfg.sliding_window
  if family == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  return out


def _weight_map(ckpt_dir: str) -> dict[str, str]:
  """HF tensor name -> safetensors file path."""
  index = os.path.join(ckpt_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      return {k: os.path.join(ckpt_dir, v) for k, v in json.load(f)["weight_map"].items()}
  files = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"{ckpt_dir}: no *.safetensors files")
  out = {}
  for fn in files:
    with safe_open(os.path.join(ckpt_dir, fn), framework="numpy") as f:
      out.update({k: os.path.join(ckpt_dir, fn) for k in f.keys()})
  return out


def _param_path(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def load_hf(ckpt_dir: str, *, mesh: jax.sharding.Mesh | None = None, rules=shd.RULES,
            param_dtype: str = "float32", dtype: str = "float32"):
  """Loads a local HF checkpoint directory into (cfg, graphdef, params).

  With `mesh`, parameters are created directly in the `rules` layout (each
  device reads its own slice); without, on the default device. Rebuild the
  model with `nnx.merge(graphdef, params)`.
  """
  cfg_file = os.path.join(ckpt_dir, "config.json")
  with open(cfg_file) as f:
    cfg = config_from_hf(json.load(f), cfg_file, param_dtype=param_dtype, dtype=dtype)
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  if mesh is None:
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract)
  else:
    shardings = shd.state_shardings(abstract, mesh, rules)
  weight_map = _weight_map(ckpt_dir)
  used = set()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  arrays = []
  with contextlib.ExitStack() as stack:
    handles: dict[str, Any] = {}
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
      name, layout = _hf_entry(_param_path(path))
      if name not in weight_map:
        raise CheckpointError(f"tensor {name!r} missing from checkpoint {ckpt_dir} "
                              f"(files: {sorted(set(map(os.path.basename, weight_map.values())))})")
      file = weight_map[name]
      if file not in handles:
        handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
      sl = handles[file].get_slice(name)
      got, want = tuple(sl.get_shape()), _hf_shape(leaf.shape, layout)
      if got != want:
        raise CheckpointError(f"tensor {name!r} in {file} has shape {got}, expected {want}")
      if sl.get_dtype() not in _FLOAT_DTYPES:
        raise CheckpointError(f"tensor {name!r} in {file} has dtype {sl.get_dtype()}, "
                              f"expected one of {sorted(_FLOAT_DTYPES)}")
      used.add(name)
      cb = lambda idx, sl=sl, layout=layout, leaf=leaf: np.ascontiguousarray(
          _read(sl, layout, idx, leaf.shape)).astype(leaf.dtype)
      arrays.append(jax.make_array_from_callback(leaf.shape, sharding, cb))
  unexpected = sorted(k for k in set(weight_map) - used if not k.endswith(_IGNORED_SUFFIXES)
                      and not (cfg.tie_embeddings and k == "lm_head.weight"))
  if unexpected:
    raise CheckpointError(f"unexpected tensors in {ckpt_dir}: "
                          + ", ".join(f"{k!r} ({os.path.basename(weight_map[k])})"
                                      for k in unexpected[:10]))
  return cfg, graphdef, jax.tree_util.tree_unflatten(treedef, arrays)


def _host(x: jax.Array) -> np.ndarray:
  """Full value on the host (gathers across processes when needed)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf(out_dir: str, cfg, params, *, dtype: str = "bfloat16",
            max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes params (an nnx Param State) as a HF checkpoint directory in `dtype`.

  Tensors are gathered to the host one at a time; files are split at
  `max_shard_bytes` with a `model.safetensors.index.json`. On several hosts
  every process must call this; process 0 writes.
  """
  hf_cfg = config_to_hf(cfg, dtype)
  np_dtype = jnp.dtype(dtype)
  write = jax.process_index() == 0
  if write:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2)
  groups, size = [[]], 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    nbytes = int(np.prod(x.shape)) * np_dtype.itemsize
    if groups[-1] and size + nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append((*_hf_entry(_param_path(path)), x))
    size += nbytes
  n, weight_map, total = len(groups), {}, 0
  for i, group in enumerate(groups, 1):
    fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
    tensors = {name: np.ascontiguousarray(_to_hf(_host(x), layout).astype(np_dtype))
               for name, layout, x in group}
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update(dict.fromkeys(tensors, fname))
    if write:
      save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
  if write and n > 1:
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
