"""Shared tiny configs for the trainer tests (imported by tests/test_train*.py, test_cli*.py)."""

from __future__ import annotations

import pathlib

from cpo_jax.configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **train):
  """A 2-layer d=32 byte model on 64 synthetic `add` pairs, batch 8, no eval."""
  c = default.get_config()
  c.model.update(d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, mlp_dim=64)
  c.data.update(dir=str(data_dir), n_train=64, n_test=16, batch_size=8, eval_split="")
  c.train.update(progress=False, ckpt_every=5, steps=10, eval_batch_size=8)
  c.train.update(train)
  c.optim.update(lr=1e-2, warmup_steps=1)
  c.loss.beta = 0.5
  return c


def cli_overrides(data_dir, **train) -> list[str]:
  """The same config as `tiny_config`, as CLI flags."""
  flags = [f"--config={REPO / 'cpo_jax/configs/default.py'}",
           "--config.model.d_model=32", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
           "--config.model.head_dim=16", "--config.model.mlp_dim=64",
           f"--config.data.dir={data_dir}", "--config.data.n_train=64", "--config.data.n_test=16",
           "--config.data.batch_size=8", "--config.data.eval_split=",
           "--config.train.progress=False", "--config.train.eval_batch_size=8",
           "--config.optim.lr=1e-2", "--config.optim.warmup_steps=1", "--config.loss.beta=0.5"]
  flags += [f"--config.train.{k}={v}" for k, v in dict(dict(ckpt_every=5, steps=10), **train).items()]
  return flags
