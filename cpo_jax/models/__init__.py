"""Llama-style decoder (Flax NNX), KV-cache sampling, log-probs, HF import/export.

    cfg = configs.get_config("tiny")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens, mask)                       # [B, L, V] float32
    lp = token_logprobs(model, tokens, mask, target_mask=response_mask)
    gen = generate(model, prompt, prompt_mask, rng, max_new_tokens=32)
    cfg, graphdef, params = load_hf("/ckpt/llama3", mesh=mesh)
    save_hf("/out", cfg, params)
"""

from cpo_jax.models import configs
from cpo_jax.models.hf import CheckpointError, config_from_hf, config_to_hf, load_hf, save_hf
from cpo_jax.models.logprobs import token_logprobs
from cpo_jax.models.sampling import Generation, generate, sample_logits
from cpo_jax.models.transformer import Transformer, init_cache

__all__ = [
    "CheckpointError", "Generation", "Transformer", "config_from_hf", "config_to_hf",
    "configs", "generate", "init_cache", "load_hf", "sample_logits", "save_hf",
    "token_logprobs",
]
