"""Model configs as `ml_collections.ConfigDict`s: tiny test models and real shapes.

`get_config(name)` returns an unlocked copy; override fields as usual
(`cfg.n_layers = 4`). Field meanings are given once, in `base()`.
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
  """Defaults shared by every model; each field's meaning is commented."""
  c = ml_collections.ConfigDict()
  c.family = "llama"            # HF family for export: llama | mistral | qwen2.
  c.vocab_size = 256            # Rows of the embedding table.
  c.d_model = 64                # Residual width (HF hidden_size).
  c.n_layers = 2                # Decoder blocks.
  c.n_heads = 4                 # Query heads.
  c.n_kv_heads = 2              # Key/value heads (grouped-query attention).
  c.head_dim = 16               # Width of one head.
  c.mlp_dim = 128               # SwiGLU hidden width (HF intermediate_size).
  c.rms_eps = 1e-5              # RMSNorm epsilon.
  c.rope_theta = 10000.0        # RoPE base.
  c.rope_scaling = None         # None or a dict for Llama 3 scaling, see `llama3_rope`.
  c.qkv_bias = False            # Biases on q/k/v projections (Qwen2: True).
  c.sliding_window = None       # Attend to at most this many past slots (Mistral v0.1).
  c.tie_embeddings = False      # Unembedding = embedding transpose.
  c.max_len = 2048              # Longest sequence the model is meant for (HF max_position_embeddings).
  c.param_dtype = "float32"     # Storage dtype of parameters: float32 | bfloat16.
  c.dtype = "float32"           # Compute dtype of activations/matmuls: float32 | bfloat16.
  c.remat = False               # Rematerialise each block in the backward pass.
  c.init_std = 0.02             # Normal init scale for matrices.
  return c


def llama3_rope() -> dict:
  """Llama 3.1 rope scaling (HF `rope_type: llama3`)."""
  return dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=8192)


def tiny() -> ml_collections.ConfigDict:
  """2-layer d=64 model for tests and CPU experiments (~0.1M params)."""
  return base()


def llama3_8b() -> ml_collections.ConfigDict:
  """Meta-Llama-3-8B(-Instruct) shapes."""
  c = base()
  c.update(family="llama", vocab_size=128256, d_model=4096, n_layers=32,
           n_heads=32, n_kv_heads=8, head_dim=128, mlp_dim=14336, rms_eps=1e-5,
           rope_theta=500000.0, max_len=8192, dtype="bfloat16")
  return c


def llama31_8b() -> ml_collections.ConfigDict:
  """Llama-3.1-8B shapes: Llama 3 with the llama3 rope scaling and 128k context."""
  c = llama3_8b()
  c.rope_scaling = llama3_rope()
  c.max_len = 131072
  return c


def mistral_7b() -> ml_collections.ConfigDict:
  """Mistral-7B-v0.1 shapes (4096-slot sliding window)."""
  c = base()
  c.update(family="mistral", vocab_size=32000, d_model=4096, n_layers=32,
           n_heads=32, n_kv_heads=8, head_dim=128, mlp_dim=14336, rms_eps=1e-5,
           rope_theta=10000.0, max_len=32768, dtype="bfloat16")
  c.sliding_window = 4096
  return c


def qwen2_7b() -> ml_collections.ConfigDict:
  """Qwen2-7B shapes (q/k/v biases)."""
  c = base()
  c.update(family="qwen2", vocab_size=152064, d_model=3584, n_layers=28,
           n_heads=28, n_kv_heads=4, head_dim=128, mlp_dim=18944, rms_eps=1e-6,
           rope_theta=1000000.0, qkv_bias=True, max_len=32768, dtype="bfloat16")
  return c


def qwen2_0_5b() -> ml_collections.ConfigDict:
  """Qwen2-0.5B shapes (tied embeddings): a real model small enough for one GPU."""
  c = qwen2_7b()
  c.update(vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
           n_kv_heads=2, head_dim=64, mlp_dim=4864, tie_embeddings=True)
  return c


CONFIGS = {"tiny": tiny, "llama3_8b": llama3_8b, "llama31_8b": llama31_8b,
           "mistral_7b": mistral_7b, "qwen2_7b": qwen2_7b, "qwen2_0_5b": qwen2_0_5b}


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the named model config; raises KeyError listing known names."""
  if name not in CONFIGS:
    raise KeyError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}")
  return CONFIGS[name]()
