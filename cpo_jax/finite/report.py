"""Small I/O helpers for the experiment scripts: JSON, CSV, figures, progress.

Kept out of the training code (no file I/O in the loss path). Numbers are
converted from JAX/NumPy arrays to plain Python so the JSON is portable.
"""

from __future__ import annotations

import argparse
import csv
import pathlib

import numpy as np

from cpo_jax import atomic


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
  return atomic.write_json(path, to_python(obj), indent=2)


def save_csv(path, columns: dict) -> pathlib.Path:
  """Writes equal-length 1-D columns {name: values} as a CSV with a header."""
  cols = {k: np.asarray(v).reshape(-1) for k, v in columns.items()}
  lengths = {len(v) for v in cols.values()}
  if len(lengths) != 1:
    raise ValueError(f"columns differ in length: { {k: len(v) for k, v in cols.items()} }")
  with atomic.atomic_path(path) as tmp, tmp.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(list(cols))
    for row in zip(*cols.values()):
      writer.writerow([f"{v:.6g}" if isinstance(v, (float, np.floating)) else v
                       for v in row])
  return pathlib.Path(path)


def save_figure(fig, path) -> pathlib.Path:
  return atomic.save_figure(fig, path, dpi=110)


def figure_main(run, doc: str, argv=None):
  """The command line shared by the figure scripts: --out DIR [--quick]."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--out", default="results")
  parser.add_argument("--quick", action="store_true", help="small smoke setting")
  args = parser.parse_args(argv)
  return run(args.out, quick=args.quick)


def progress(iterable, desc: str, enabled: bool = True):
  """tqdm progress bar (to stderr), or the bare iterable when disabled."""
  if not enabled:
    return iterable
  from tqdm.auto import tqdm
  return tqdm(iterable, desc=desc, leave=False)
