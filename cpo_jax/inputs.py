"""Config -> tokenizer, prepared dataset, encoded splits and batch iterators.

The one place where `config.data` is read (cpo_jax.data does the work).
"""

from __future__ import annotations

import jax

from cpo_jax import data as D


def tokenizer(dcfg):
  """ByteTokenizer for "byte", else an HFTokenizer from a local file/dir."""
  if dcfg.tokenizer == "byte":
    return D.ByteTokenizer()
  return D.HFTokenizer(dcfg.tokenizer, pad=dcfg.pad_token or None,
                       bos=dcfg.bos_token or None, eos=dcfg.eos_token or None)


def builder(dcfg):
  """Prepares (or reuses) the dataset named by the config."""
  if dcfg.source == "synthetic":
    return D.build_synthetic(dcfg.dir, task=dcfg.task, n_train=dcfg.n_train,
                             n_test=dcfg.n_test, seed=dcfg.data_seed,
                             ref_bias=dcfg.ref_bias, labels=dcfg.labels,
                             bt_scale=dcfg.bt_scale, p_correct=dcfg.p_correct)
  if dcfg.source == "local":
    files = {s: p for s, p in dcfg.files.items() if p}
    if not files:
      raise ValueError("data.source='local' needs data.files.train (and optionally .test)")
    return D.build_local(dcfg.dir, files, style=dcfg.style)
  raise ValueError(f"data.source must be 'synthetic' or 'local', got {dcfg.source!r}")


def encode_config(dcfg) -> D.EncodeConfig:
  return D.EncodeConfig(template=dcfg.template, max_len=dcfg.max_len,
                        max_prompt_len=dcfg.max_prompt_len or None)




class Inputs:
  """Dataset, tokenizer and encoded splits of one config (cached per split)."""

  def __init__(self, dcfg):
    self.cfg = dcfg
    self.tokenizer = tokenizer(dcfg)
    self.builder = builder(dcfg)
    self.encode_cfg = encode_config(dcfg)
    self._pairs = {}

  def pairs(self, split: str) -> D.EncodedPairs:
    if split not in self._pairs:
      self._pairs[split] = D.encode_split(self.builder, split, self.tokenizer, self.encode_cfg)
    return self._pairs[split]

  def buckets(self) -> tuple[int, ...]:
    """One bucket set for every split (prompts are shared), so compiles are reused."""
    return D.default_buckets(self.cfg.max_len)

  def train_iterator(self) -> D.PairIterator:
    c = self.cfg
    bcfg = D.BatchConfig(batch_size=c.batch_size, seed=c.data_seed, shuffle=c.shuffle,
                         num_epochs=c.num_epochs or None, buckets=self.buckets(),
                         sort_window=c.sort_window, process_index=jax.process_index(),
                         process_count=jax.process_count())
    return D.PairIterator(self.pairs(c.train_split), bcfg, pad_id=self.tokenizer.pad_id)

  def eval_iterator(self, batch_size: int, split: str | None = None) -> D.PairIterator:
    """One unshuffled epoch of the held-out split, last batch padded (valid=False)."""
    split = split or self.cfg.eval_split
    bcfg = D.BatchConfig(batch_size=batch_size, shuffle=False, num_epochs=1,
                         drop_remainder=False, buckets=self.buckets(),
                         process_index=jax.process_index(), process_count=jax.process_count())
    return D.PairIterator(self.pairs(split), bcfg, pad_id=self.tokenizer.pad_id)
