"""The canonical preference record, its validation, and bad-input reporting.

Every source (synthetic task, JSONL/JSON/Parquet file) is turned into
`PreferenceRecord`s before anything is written. Validation either raises a
`DataError` that names the file, the line (or record number) and the field,
or, under ``on_error="skip"``, counts the record in a `SkipReport` so that
nothing is ever dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
  """Bad input; the message names the file, line/record and field."""

  def __init__(self, source: str, field: str, reason: str, detail: str = ""):
    self.source, self.field, self.reason = source, field, reason
    msg = f"{source}: field {field!r}: {reason}"
    super().__init__(msg + (f" ({detail})" if detail else ""))


@dataclasses.dataclass
class SkipReport:
  """Records skipped under ``on_error="skip"``: counts by reason + examples."""

  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: list[str] = dataclasses.field(default_factory=list)
  max_examples: int = 20

  def add(self, err: DataError) -> None:
    self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
    if len(self.examples) < self.max_examples:
      self.examples.append(str(err))

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def merge(self, other: "SkipReport") -> None:
    for k, v in other.counts.items():
      self.counts[k] = self.counts.get(k, 0) + v
    room = self.max_examples - len(self.examples)
    self.examples.extend(other.examples[:max(room, 0)])

  def to_dict(self) -> dict[str, Any]:
    return {"total": self.total, "counts": dict(self.counts),
            "examples": list(self.examples)}

  def summary(self) -> str:
    if not self.total:
      return "skipped 0 records"
    parts = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items()))
    return f"skipped {self.total} records: {parts}"


def check_on_error(on_error: str) -> None:
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
  """One preference pair, prompt shared by both responses.

  prompt: the prompt as plain text (for chat data, a plain-text rendering).
  chosen / rejected: the preferred and the dispreferred response text.
  prompt_messages: chat turns before the response, as a list of
    {"role", "content"} dicts; empty for plain-text prompts.
  score_chosen / score_rejected: optional per-response scores (NaN: unknown),
    e.g. ArmoRM scores or the synthetic ground-truth reward.
  dr: ground-truth reward gap r*(x, y_w) - r*(x, y_l) (NaN: unknown).
  source: "file:line" (or "file:record N") naming where the pair came from.
  group: integer tag (synthetic data: 1 if the prompt is in the set the
    biased reference is taught to get wrong, else 0; files: 0).
  """

  prompt: str
  chosen: str
  rejected: str
  source: str
  prompt_messages: tuple = ()
  score_chosen: float = math.nan
  score_rejected: float = math.nan
  dr: float = math.nan
  group: int = 0

  def to_example(self) -> dict[str, Any]:
    """The flat dict written by the TFDS builders (see `FEATURES`)."""
    return {
        "prompt": self.prompt,
        "chosen": self.chosen,
        "rejected": self.rejected,
        "prompt_messages": json.dumps(list(self.prompt_messages),
                                      ensure_ascii=False),
        "score_chosen": self.score_chosen,
        "score_rejected": self.score_rejected,
        "dr": self.dr,
        "group": self.group,
        "source": self.source,
    }


def decode_example(ex: dict[str, Any]) -> PreferenceRecord:
  """Inverse of `PreferenceRecord.to_example` for a record read from disk."""
  txt = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  return PreferenceRecord(
      prompt=txt(ex["prompt"]), chosen=txt(ex["chosen"]),
      rejected=txt(ex["rejected"]), source=txt(ex["source"]),
      prompt_messages=tuple(json.loads(txt(ex["prompt_messages"]))),
      score_chosen=float(ex["score_chosen"]),
      score_rejected=float(ex["score_rejected"]),
      dr=float(ex["dr"]), group=int(ex["group"]))


def _has_bad_unicode(s: str) -> int:
  """Index of the first lone surrogate (undecodable byte), or -1."""
  for i, ch in enumerate(s):
    if "\ud800" <= ch <= "\udfff":
      return i
  return -1


def check_text(value: Any, source: str, field: str, *,
               allow_empty: bool = False) -> str:
  """Validates one text field; returns it or raises `DataError`."""
  if value is None:
    raise DataError(source, field, "missing field")
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(source, field, "non-UTF-8 bytes",
                      f"byte offset {e.start}") from None
  if not isinstance(value, str):
    raise DataError(source, field, "wrong type",
                    f"expected a string, got {type(value).__name__}")
  pos = _has_bad_unicode(value)
  if pos >= 0:
    raise DataError(source, field, "non-UTF-8 bytes", f"character {pos}")
  if not allow_empty and not value.strip():
    raise DataError(source, field, "empty text")
  return value


def check_score(value: Any, source: str, field: str) -> float:
  """Optional numeric score: None -> NaN; anything non-numeric raises."""
  if value is None:
    return math.nan
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise DataError(source, field, "wrong type",
                    f"expected a number, got {type(value).__name__}")
  return float(value)


def validate(rec: PreferenceRecord) -> PreferenceRecord:
  """Checks the invariants every pair must satisfy, whatever its source."""
  check_text(rec.prompt, rec.source, "prompt", allow_empty=True)
  check_text(rec.chosen, rec.source, "chosen")
  check_text(rec.rejected, rec.source, "rejected")
  if rec.chosen == rec.rejected:
    raise DataError(rec.source, "chosen/rejected",
                    "chosen identical to rejected")
  if not rec.prompt.strip() and not rec.prompt_messages:
    raise DataError(rec.source, "prompt", "empty text")
  return rec


def collect(records, on_error: str, report: SkipReport) -> list:
  """Drains an iterator of records-or-`DataError`s under an error policy.

  The iterator yields either `PreferenceRecord`s or `DataError` instances
  (a reader yields the error instead of raising so that it can go on).
  """
  check_on_error(on_error)
  out = []
  for item in records:
    if isinstance(item, DataError):
      if on_error == "raise":
        raise item
      report.add(item)
      continue
    try:
      out.append(validate(item))
    except DataError as e:
      if on_error == "raise":
        raise
      report.add(e)
  return out


