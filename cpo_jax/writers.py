"""Metric sinks of the trainer: JSONL, TensorBoard event files, a progress bar.

TensorBoard: neither `tensorboard` nor `tensorboardX` is a dependency, so
`EventWriter` writes the event-file format directly: TFRecord framing
(length, masked CRC-32C, payload, masked CRC-32C) around hand-encoded
`Event{wall_time, step, summary{value{tag, simple_value}}}` protobufs. Only
scalars are written. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing uses."""
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, *, scalars: dict | None = None,
                 file_version: str | None = None) -> bytes:
  """Serialises one `tensorflow.Event` protobuf (scalars or a file version)."""
  out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step))
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", float(v)))
        for tag, v in scalars.items())
    out += _field_bytes(5, values)
  return out


def frame_record(data: bytes) -> bytes:
  """TFRecord framing of one payload."""
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack(
      "<I", _masked_crc(data))


class EventWriter:
  """Appends scalar summaries to a new `events.out.tfevents.*` file in `logdir`."""

  def __init__(self, logdir):
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = logdir / name
    self._f = open(self.path, "ab")
    self._write(encode_event(0, time.time(), file_version="brain.Event:2"))

  def _write(self, event: bytes) -> None:
    self._f.write(frame_record(event))

  def scalars(self, step: int, values: dict) -> None:
    finite = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    if finite:
      self._write(encode_event(step, time.time(), scalars=finite))
      self._f.flush()

  def close(self) -> None:
    self._f.close()


class JsonlWriter:
  """One JSON object per line: {"step": s, "split": ..., metrics...}.

  On resume, `truncate_after(step)` drops lines of steps the restored
  checkpoint never reached, so the file always describes one run.
  """

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._f = open(self.path, "a", encoding="utf-8")

  def truncate_after(self, step: int) -> None:
    self._f.close()
    kept = [line for line in read_jsonl(self.path) if line["step"] <= step]
    tmp = self.path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self.path)
    self._f = open(self.path, "a", encoding="utf-8")

  def write(self, step: int, split: str, values: dict) -> None:
    rec = {"step": int(step), "split": split}
    rec.update({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                for k, v in values.items()})
    self._f.write(json.dumps(rec) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_jsonl(path) -> list[dict]:
  """All complete records of a metrics file (a torn last line is ignored)."""
  out = []
  if not pathlib.Path(path).exists():
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return out


class MetricWriter:
  """JSONL + TensorBoard + tqdm behind one `write(step, split, values)`.

  Every method is a no-op except on process 0 (`active=False`).
  """

  def __init__(self, workdir, *, total_steps: int, initial_step: int, active: bool,
               tensorboard: bool, progress: bool):
    self.active = active
    self.jsonl = self.tb = self.bar = None
    if not active:
      return
    workdir = pathlib.Path(workdir)
    self.jsonl = JsonlWriter(workdir / "metrics.jsonl")
    self.jsonl.truncate_after(initial_step)
    if tensorboard:
      self.tb = EventWriter(workdir / "tb")
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True)

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.active:
      return
    self.jsonl.write(step, split, values)
    if self.tb is not None:
      self.tb.scalars(step, {f"{split}/{k}": v for k, v in values.items()})
    if self.bar is not None and split == "train":
      self.bar.n = step
      self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                           tok_s=f"{values.get('tokens_per_s', 0.0):.0f}", refresh=False)
      self.bar.refresh()

  def close(self) -> None:
    for w in (self.jsonl, self.tb, self.bar):
      if w is not None:
        w.close()
