"""Readers for local preference files: JSONL, JSON and Parquet.

Three record layouts are understood (``style``), per record with "auto":

* ``"pairs"``: ``prompt``, ``chosen``, ``rejected`` strings.
* ``"chat"`` (UltraFeedback-binarized style): ``chosen`` and ``rejected`` are
  lists of ``{"role", "content"}`` messages; the prompt is their shared
  prefix (or, when they share none, an optional ``prompt`` string taken as a
  user turn); what follows must be exactly one assistant message.
* ``"hh"`` (Anthropic HH-RLHF style): ``chosen`` and ``rejected`` are whole
  dialogues "\\n\\nHuman: ...\\n\\nAssistant: ..." whose prompt is the shared
  prefix up to and including the last "\\n\\nAssistant:".

Optional scores: ``score_chosen``/``score_rejected`` (UltraFeedback), or
``all_generated_responses`` + ``all_rm_scores`` (llama3-ultrafeedback-armorm),
looked up by response text. Readers *yield* `DataError`s instead of raising,
so `records.collect` can apply the raise/skip policy.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Iterator

from cpo_jax.data.records import (DataError, PreferenceRecord, check_score,
                                  check_text)

STYLES = ("auto", "pairs", "chat", "hh")
ROLES = ("system", "user", "assistant")
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def iter_raw(path: str | pathlib.Path) -> Iterator[tuple[str, Any]]:
  """Yields (source, raw record or DataError) for one file, by extension."""
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".ndjson"):
    yield from _iter_jsonl(path)
  elif suffix == ".json":
    yield from _iter_json(path)
  elif suffix == ".parquet":
    yield from _iter_parquet(path)
  else:
    raise ValueError(f"{path}: unknown file type {suffix!r} "
                     "(expected .jsonl, .ndjson, .json or .parquet)")


def _iter_jsonl(path):
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      src = f"{path}:line {lineno}"
      # surrogateescape keeps undecodable bytes so they can be blamed on the
      # field that holds them (see records.check_text).
      line = raw.decode("utf-8", errors="surrogateescape")
      if not line.strip():
        continue
      try:
        yield src, json.loads(line)
      except json.JSONDecodeError as e:
        yield src, DataError(src, "(line)", "malformed JSON", e.msg)


def _iter_json(path):
  text = path.read_bytes().decode("utf-8", errors="surrogateescape")
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:line {e.lineno}", "(file)", "malformed JSON",
                    e.msg) from None
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list):
    raise DataError(str(path), "(file)", "wrong type",
                    "expected a list of records or {'data': [...]}")
  for i, rec in enumerate(data):
    yield f"{path}:record {i}", rec


def _iter_parquet(path):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pq.read_table(path)
  for i, rec in enumerate(table.to_pylist()):
    yield f"{path}:record {i}", rec


def render_plain(messages) -> str:
  """Plain-text prompt for chat turns (used without a chat template)."""
  if len(messages) == 1 and messages[0]["role"] == "user":
    return messages[0]["content"]
  names = {"system": "System", "user": "Human", "assistant": "Assistant"}
  body = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)
  return body + HH_ASSISTANT


def _check_messages(msgs, src, field):
  if msgs is None:
    raise DataError(src, field, "missing field")
  if not isinstance(msgs, list) or not msgs:
    raise DataError(src, field, "wrong type",
                    "expected a non-empty list of messages")
  out = []
  for j, m in enumerate(msgs):
    if not isinstance(m, dict):
      raise DataError(src, f"{field}[{j}]", "wrong type",
                      "expected a {'role', 'content'} message")
    role = m.get("role")
    if role not in ROLES:
      raise DataError(src, f"{field}[{j}].role", "bad role", repr(role))
    content = check_text(m.get("content"), src, f"{field}[{j}].content",
                         allow_empty=role != "assistant")
    out.append({"role": role, "content": content})
  return out


def _parse_chat(rec, src):
  chosen = _check_messages(rec.get("chosen"), src, "chosen")
  rejected = _check_messages(rec.get("rejected"), src, "rejected")
  k = 0
  while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
    k += 1
  prefix = chosen[:k]
  for field, msgs in (("chosen", chosen), ("rejected", rejected)):
    rest = msgs[k:]
    if not rest:
      raise DataError(src, field, "chosen identical to rejected")
    if len(rest) != 1 or rest[0]["role"] != "assistant":
      raise DataError(src, field, "bad dialogue",
                      "after the shared prefix expected exactly one "
                      "assistant message")
  if not prefix:
    if rec.get("prompt") is None:
      raise DataError(src, "prompt", "missing field",
                      "chosen/rejected share no prompt turns")
    prefix = [{"role": "user",
               "content": check_text(rec.get("prompt"), src, "prompt")}]
  return prefix, chosen[k]["content"], rejected[k]["content"]


def parse_hh_prompt(prompt: str) -> list[dict[str, str]]:
  """Splits an HH prompt ("\\n\\nHuman: a\\n\\nAssistant:") into messages."""
  msgs, rest = [], prompt
  if rest.endswith(HH_ASSISTANT):
    rest = rest[:-len(HH_ASSISTANT)]
  marks = {HH_HUMAN: "user", HH_ASSISTANT: "assistant"}
  while rest:
    nxt = [(rest.find(m, 1), m) for m in marks if rest.find(m, 1) > 0]
    head = next((m for m in marks if rest.startswith(m)), None)
    end = min(nxt)[0] if nxt else len(rest)
    if head is None:
      msgs.append({"role": "user", "content": rest[:end].strip()})
    else:
      msgs.append({"role": marks[head],
                   "content": rest[len(head):end].strip()})
    rest = rest[end:]
  return msgs


def _parse_hh(rec, src):
  chosen = check_text(rec.get("chosen"), src, "chosen")
  rejected = check_text(rec.get("rejected"), src, "rejected")
  k = chosen.rfind(HH_ASSISTANT)
  if k < 0:
    raise DataError(src, "chosen", "bad dialogue",
                    f"no {HH_ASSISTANT.strip()!r} turn")
  prompt = chosen[:k + len(HH_ASSISTANT)]
  if not rejected.startswith(prompt):
    raise DataError(src, "rejected", "bad dialogue",
                    "does not share the chosen response's prompt prefix")
  return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _scores(rec, src, chosen, rejected):
  sc = check_score(rec.get("score_chosen"), src, "score_chosen")
  sr = check_score(rec.get("score_rejected"), src, "score_rejected")
  texts, scores = rec.get("all_generated_responses"), rec.get("all_rm_scores")
  if texts is not None and scores is not None:
    if not (isinstance(texts, list) and isinstance(scores, list)
            and len(texts) == len(scores)):
      raise DataError(src, "all_rm_scores", "wrong type",
                      "expected lists as long as all_generated_responses")
    table = {t: check_score(s, src, "all_rm_scores")
             for t, s in zip(texts, scores)}
    sc = table.get(chosen, sc) if math.isnan(sc) else sc
    sr = table.get(rejected, sr) if math.isnan(sr) else sr
  return sc, sr


def parse_record(rec: Any, src: str, style: str = "auto") -> PreferenceRecord:
  """One raw record (a dict from JSON/Parquet) -> `PreferenceRecord`."""
  if style not in STYLES:
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
  if not isinstance(rec, dict):
    raise DataError(src, "(record)", "wrong type",
                    f"expected an object, got {type(rec).__name__}")
  for field in ("chosen", "rejected"):
    if rec.get(field) is None:
      raise DataError(src, field, "missing field")
  if style == "auto":
    if isinstance(rec["chosen"], list):
      style = "chat"
    elif "prompt" in rec:
      style = "pairs"
    else:
      style = "hh"
  messages: tuple = ()
  if style == "chat":
    prefix, chosen, rejected = _parse_chat(rec, src)
    messages, prompt = tuple(prefix), render_plain(prefix)
  elif style == "hh":
    prompt, chosen, rejected = _parse_hh(rec, src)
    messages = tuple(parse_hh_prompt(prompt))
  else:
    prompt = check_text(rec.get("prompt"), src, "prompt")
    chosen = check_text(rec.get("chosen"), src, "chosen")
    rejected = check_text(rec.get("rejected"), src, "rejected")
  # Responses must be non-empty and differ (records.validate re-checks).
  chosen = check_text(chosen, src, "chosen")
  rejected = check_text(rejected, src, "rejected")
  sc, sr = _scores(rec, src, chosen, rejected)
  return PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected,
                          source=src, prompt_messages=messages,
                          score_chosen=sc, score_rejected=sr, dr=math.nan)


def read_preference_file(path, style: str = "auto"):
  """Yields `PreferenceRecord`s or `DataError`s for every record of a file."""
  for src, raw in iter_raw(path):
    if isinstance(raw, DataError):
      yield raw
      continue
    try:
      yield parse_record(raw, src, style)
    except DataError as e:
      yield e
