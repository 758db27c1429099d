"""Atomic file output: a reader sees the old file or the new one, never half.

Every result file the library and its experiments write (JSON, CSV, text,
figures) goes through `atomic_path`: write to a temporary file in the same
folder, then `os.replace` it onto the destination.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pathlib
import tempfile


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path beside `path`, renamed onto it only on success."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
  os.close(fd)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
  try:
    yield pathlib.Path(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path, text: str) -> pathlib.Path:
  with atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")
  return pathlib.Path(path)


def write_json(path, obj, **kwargs) -> pathlib.Path:
  """``json.dumps(obj, **kwargs)`` written atomically, with a final newline."""
  return write_text(path, json.dumps(obj, **kwargs) + "\n")


def save_figure(fig, path, **kwargs) -> pathlib.Path:
  """``fig.savefig`` written atomically (format from the suffix, default png)."""
  fmt = pathlib.Path(path).suffix.lstrip(".") or "png"
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format=fmt, **kwargs)
  return pathlib.Path(path)


def write_csv_rows(path, rows, fieldnames) -> pathlib.Path:
  """A CSV of dict rows (header = `fieldnames`), written atomically."""
  with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
  return pathlib.Path(path)
