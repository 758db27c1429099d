"""Atomic output: a failed write leaves the previous file intact and no debris."""

import json
import os

import pytest

from cpo_jax import atomic


def test_write_json_replaces_and_keeps_mode(tmp_path):
  path = tmp_path / "sub" / "out.json"
  atomic.write_json(path, {"a": 1})
  atomic.write_json(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2}
  umask = os.umask(0)
  os.umask(umask)
  assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
  assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_failed_write_keeps_old_file(tmp_path):
  path = tmp_path / "out.json"
  atomic.write_json(path, {"ok": True})
  with pytest.raises(TypeError):
    atomic.write_json(path, {"bad": object()})  # not JSON-serialisable
  assert json.loads(path.read_text()) == {"ok": True}
  with pytest.raises(RuntimeError):
    with atomic.atomic_path(path) as tmp:
      tmp.write_text("half")
      raise RuntimeError("crash mid-write")
  assert json.loads(path.read_text()) == {"ok": True}
  assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
