"""Cache of per-pair reference log-probs, keyed by where they came from.

The frozen reference only has to be run once per dataset: `compute` runs a
caller's function over a one-epoch, unshuffled `PairIterator` and scatters
its [B, 2] outputs by record number; `save` writes them (atomically: temp
file + rename) next to the dataset, with a `CacheKey` naming the reference
checkpoint, the tokeniser, the data and the encoding settings. `load`
refuses the cache (`StaleCacheError`, naming every component that changed)
when any of the four differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Callable, Mapping

import numpy as np


class StaleCacheError(ValueError):
  """The cache was computed for another reference/tokeniser/data/encoding."""


@dataclasses.dataclass(frozen=True)
class CacheKey:
  """reference: names the reference weights (`fingerprint_path` of the
  checkpoint directory, or any string the caller trusts, e.g. a step id).
  tokenizer: `Tokenizer.fingerprint`. data: `builders.dataset_fingerprint`.
  encoding: `EncodeConfig.fingerprint()`.
  """

  reference: str
  tokenizer: str
  data: str
  encoding: str


def fingerprint_path(path) -> str:
  """SHA-256 over the relative names and contents of every file under path."""
  root = pathlib.Path(path)
  files = [root] if root.is_file() else sorted(
      p for p in root.rglob("*") if p.is_file())
  h = hashlib.sha256()
  for p in files:
    h.update(str(p.relative_to(root) if p != root else p.name).encode())
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return "sha256:" + h.hexdigest()


def cache_path(dataset_dir, split: str, name: str = "ref_logps") -> pathlib.Path:
  """Where the cache of one split lives: ``<dataset_dir>/<name>/<split>.npz``."""
  return pathlib.Path(dataset_dir) / name / f"{split}.npz"


def save(path, key: CacheKey, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes arrays (e.g. ``logps [N, 2]``) and the key, atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {k: np.asarray(v) for k, v in arrays.items()}
  if "__key__" in payload:
    raise ValueError("'__key__' is reserved")
  payload["__key__"] = np.asarray(json.dumps(dataclasses.asdict(key)))
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **payload)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def load(path, key: CacheKey) -> dict[str, np.ndarray]:
  """Reads a cache; raises `StaleCacheError` if its key differs from key."""
  with np.load(path, allow_pickle=False) as z:
    stored = json.loads(str(z["__key__"]))
    changed = [f"{k} (cached {stored.get(k)!r}, now {v!r})"
               for k, v in dataclasses.asdict(key).items()
               if stored.get(k) != v]
    if changed:
      raise StaleCacheError(f"{path}: reference log-prob cache is stale: "
                            + "; ".join(changed))
    return {k: z[k] for k in z.files if k != "__key__"}


def compute(batches, fn: Callable[[dict], np.ndarray], num_records: int,
            *, fill: float = np.nan) -> np.ndarray:
  """Runs ``fn(batch) -> [B, 2]`` over batches; scatters by ``index``.

  Use a `PairIterator` with ``shuffle=False, num_epochs=1,
  drop_remainder=False``. Records that were skipped while encoding keep
  ``fill``. Returns float32 [num_records, 2].
  """
  out = np.full((num_records, 2), fill, np.float32)
  for batch in batches:
    vals = np.asarray(fn(batch), np.float32)
    ok = batch["valid"]
    out[batch["index"][ok]] = vals[ok]
  return out
