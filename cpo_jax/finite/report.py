"""Small I/O helpers for the experiment scripts: JSON, CSV, figures, progress.

Kept out of the training code (no file I/O in the loss path). Numbers are
converted from JAX/NumPy arrays to plain Python so the JSON is portable.
"""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np


def to_python(x):
  """Recursively converts arrays / NumPy scalars to lists / floats / ints."""
  if isinstance(x, dict):
    return {str(k): to_python(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_python(v) for v in x]
  if hasattr(x, "shape") or isinstance(x, np.generic):
    arr = np.asarray(x)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  return x


def save_json(path, obj) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(to_python(obj), indent=2, sort_keys=False) + "\n")
  return path


def save_csv(path, columns: dict) -> pathlib.Path:
  """Writes equal-length 1-D columns {name: values} as a CSV with a header."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  cols = {k: np.asarray(v).reshape(-1) for k, v in columns.items()}
  lengths = {len(v) for v in cols.values()}
  if len(lengths) != 1:
    raise ValueError(f"columns differ in length: { {k: len(v) for k, v in cols.items()} }")
  with path.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(list(cols))
    for row in zip(*cols.values()):
      writer.writerow([f"{v:.6g}" if isinstance(v, (float, np.floating)) else v
                       for v in row])
  return path


def save_figure(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def progress(iterable, desc: str, enabled: bool = True):
  """tqdm progress bar (to stderr), or the bare iterable when disabled."""
  if not enabled:
    return iterable
  from tqdm.auto import tqdm
  return tqdm(iterable, desc=desc, leave=False)
