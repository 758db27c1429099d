"""Pair batching with an explicit pair axis and a checkpointable iterator.

`PairIterator` walks `EncodedPairs` in a deterministic order and yields
host-local NumPy batches (format in the package docstring). The order of
epoch e is a pure function of (seed, e): a permutation (or identity when
``shuffle=False``), optionally length-grouped within windows of
``sort_window`` batches so that bucket padding wastes little. Global batch
s of an epoch is ``order[s*B:(s+1)*B]``; host h of H takes rows
``[h*B/H, (h+1)*B/H)`` of it, so every host runs the same number of steps.

`PairIterator.get_state()` returns a dict of int64 NumPy scalars (an Orbax
saveable pytree); `set_state` restores it and refuses a state taken on other
data, another seed or another batch size. Restoring the state taken after k
batches yields exactly batches k+1, k+2, ... of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from cpo_jax.data.encode import EncodedPairs


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from ``smallest`` below ``max_len``, then ``max_len``."""
  out, b = [], smallest
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (max_len,)


@dataclasses.dataclass(frozen=True)
class BatchConfig:
  """batch_size: global pairs per step (divisible by process_count).
  seed / shuffle: epoch order. num_epochs: None = forever.
  drop_remainder: False pads the last batch of an epoch with copies of its
    first pair, marked ``valid = False``.
  buckets: allowed padded lengths (ascending; the last must cover every
    pair); None = `default_buckets` of the longest pair.
  sort_window: 0 = off; else group by length within windows of that many
    batches, batch order shuffled within the window.
  padding_side: "right" or "left".
  process_index / process_count: this host and the number of hosts.
  """

  batch_size: int
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  drop_remainder: bool = True
  buckets: tuple[int, ...] | None = None
  sort_window: int = 0
  padding_side: str = "right"
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.batch_size < 1 or self.batch_size % self.process_count:
      raise ValueError("batch_size must be a positive multiple of "
                       "process_count")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError("need 0 <= process_index < process_count")
    if self.padding_side not in ("right", "left"):
      raise ValueError("padding_side must be 'right' or 'left'")


def epoch_order(cfg: BatchConfig, epoch: int, lengths: np.ndarray) -> np.ndarray:
  """Global order of pair ids for one epoch (pure function)."""
  n = len(lengths)
  if not cfg.shuffle:
    order = np.arange(n)
  else:
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
  if cfg.sort_window <= 0:
    return order
  win = cfg.sort_window * cfg.batch_size
  parts = []
  for w, start in enumerate(range(0, n, win)):
    chunk = order[start:start + win]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    nb = -(-len(chunk) // cfg.batch_size)
    perm = np.random.default_rng([cfg.seed, epoch, w, 1]).permutation(nb)
    if len(chunk) % cfg.batch_size:  # keep the short batch last
      perm = np.concatenate([perm[perm != nb - 1], [nb - 1]])
    parts += [chunk[b * cfg.batch_size:(b + 1) * cfg.batch_size] for b in perm]
  return np.concatenate(parts) if parts else order


def bucket_length(data: EncodedPairs, ids: np.ndarray, buckets) -> int:
  """Smallest bucket holding every sequence of pairs ``ids``."""
  need = int(data.seq_len()[ids].max())
  length = next((x for x in buckets if x >= need), None)
  if length is None:
    raise ValueError(f"a pair of {need} tokens exceeds the largest bucket "
                     f"{buckets[-1]}")
  return length


def make_batch(data: EncodedPairs, ids: np.ndarray, valid: np.ndarray, *,
               length: int, pad_id: int, padding_side: str = "right",
               extras: Mapping[str, np.ndarray] | None = None) -> dict:
  """Pads pairs ``ids`` to ``length`` into one batch dict (package doc)."""
  b = len(ids)
  p_len = data.prompt_len[ids]
  r_len = data.resp_len[ids]
  seq = p_len[:, None] + r_len  # [B, 2]
  tokens = np.full((b, 2, length), pad_id, np.int32)
  loss_mask = np.zeros((b, 2, length), bool)
  for row, i in enumerate(ids):
    p = data.prompt(i)
    for k in range(2):
      r = data.response(i, k)
      n = len(p) + len(r)
      s = 0 if padding_side == "right" else length - n
      tokens[row, k, s:s + len(p)] = p
      tokens[row, k, s + len(p):s + n] = r
      loss_mask[row, k, s + len(p):s + n] = True
  ar = np.arange(length, dtype=np.int32)
  if padding_side == "right":
    attn = ar < seq[..., None]
    positions = np.where(attn, ar, 0)
  else:
    start = (length - seq)[..., None]
    attn = ar >= start
    positions = np.where(attn, ar - start, 0)
  batch = dict(
      tokens=tokens, loss_mask=loss_mask, attention_mask=attn,
      positions=positions.astype(np.int32),
      prompt_len=p_len.astype(np.int32), response_len=r_len.astype(np.int32),
      dr=data.dr[ids], scores=data.scores[ids], group=data.group[ids],
      index=data.index[ids], valid=valid)
  for name, arr in (extras or {}).items():
    batch[name] = np.asarray(arr)[data.index[ids]]
  return batch


class PairIterator:
  """Deterministic, resumable iterator of host-local pair batches.

  extras: per-record arrays indexed by the record number in the split
    (e.g. ``{"ref_logps": cache["logps"]}``), gathered into every batch.
  """

  def __init__(self, data: EncodedPairs, cfg: BatchConfig, *, pad_id: int,
               extras: Mapping[str, np.ndarray] | None = None):
    if len(data) < cfg.batch_size and cfg.drop_remainder:
      raise ValueError(f"{len(data)} pairs < batch_size {cfg.batch_size}")
    self.data, self.cfg, self.pad_id = data, cfg, pad_id
    self.extras = dict(extras or {})
    self._lengths = data.seq_len()
    self.buckets = tuple(cfg.buckets or default_buckets(
        int(self._lengths.max()) if len(data) else 1))
    if len(data) and self.buckets[-1] < self._lengths.max():
      raise ValueError(f"largest bucket {self.buckets[-1]} < longest pair "
                       f"{self._lengths.max()}")
    self._fp = data.fingerprint()
    n = len(data)
    self.steps_per_epoch = (n // cfg.batch_size if cfg.drop_remainder
                            else -(-n // cfg.batch_size))
    self._epoch, self._step = 0, 0
    self._order_epoch, self._order = -1, None

  def get_state(self) -> dict[str, np.ndarray]:
    """Where the iterator is, as int64 scalars (save it with the model)."""
    c = self.cfg
    return {k: np.asarray(v, np.int64) for k, v in dict(
        epoch=self._epoch, step_in_epoch=self._step, seed=c.seed,
        batch_size=c.batch_size, num_pairs=len(self.data),
        data_fingerprint=self._fp).items()}

  def set_state(self, state: Mapping[str, np.ndarray]) -> None:
    """Restores `get_state()`; refuses a state taken on other data/settings."""
    want = self.get_state()
    for key in ("seed", "batch_size", "num_pairs", "data_fingerprint"):
      if int(state[key]) != int(want[key]):
        raise ValueError(f"iterator state does not match this iterator: "
                         f"{key} {int(state[key])} != {int(want[key])}")
    self._epoch, self._step = int(state["epoch"]), int(state["step_in_epoch"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    c = self.cfg
    if self._step >= self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    if c.num_epochs is not None and self._epoch >= c.num_epochs:
      raise StopIteration
    if self.steps_per_epoch == 0:
      raise StopIteration
    if self._order_epoch != self._epoch:
      self._order = epoch_order(c, self._epoch, self._lengths)
      self._order_epoch = self._epoch
    ids = self._order[self._step * c.batch_size:
                      (self._step + 1) * c.batch_size]
    valid = np.ones(c.batch_size, bool)
    if len(ids) < c.batch_size:  # last, partial batch (drop_remainder=False)
      valid[len(ids):] = False
      ids = np.concatenate([ids, np.full(c.batch_size - len(ids), ids[0])])
    # The bucket comes from the global batch so every host pads alike.
    length = bucket_length(self.data, ids, self.buckets)
    local = c.batch_size // c.process_count
    sl = slice(c.process_index * local, (c.process_index + 1) * local)
    self._step += 1
    return make_batch(self.data, ids[sl], valid[sl], length=length,
                      pad_id=self.pad_id, padding_side=c.padding_side,
                      extras=self.extras)


def make_prompt_batch(data: EncodedPairs, ids: np.ndarray, *, pad_id: int,
                      length: int | None = None) -> dict[str, np.ndarray]:
  """Left-padded prompts of pairs ``ids``, for sampling from a policy.

  Returns tokens / attention_mask / positions [B, Lp] and index [B]; score
  the generations with `synthetic.ground_truth_reward` on decoded text.
  """
  p_len = data.prompt_len[ids]
  length = int(p_len.max()) if length is None else length
  if p_len.max() > length:
    raise ValueError(f"a prompt of {p_len.max()} tokens > length {length}")
  tokens = np.full((len(ids), length), pad_id, np.int32)
  for row, i in enumerate(ids):
    tokens[row, length - p_len[row]:] = data.prompt(i)
  start = (length - p_len)[:, None]
  ar = np.arange(length, dtype=np.int32)
  attn = ar >= start
  return dict(tokens=tokens, attention_mask=attn,
              positions=np.where(attn, ar - start, 0).astype(np.int32),
              index=data.index[ids])
