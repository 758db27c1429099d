"""Tokenisation of preference records into ragged prompt/response token arrays.

`encode_records` templates and tokenises every pair once, applies the length
limits, and returns `EncodedPairs`: flat int32 token arrays with offsets
(the prompt once, then chosen and rejected responses), plus per-pair
metadata. Batching (`batching`) only gathers and pads from these arrays.

Length rules (``EncodeConfig``), in this order:

1. The prompt is cut to ``max_prompt_len`` tokens (default: ``max_len -
   min_response_len``): ``"keep_end"`` keeps its
   last tokens (the most recent turns and the assistant header; a leading
   BOS / begin-of-text token is kept too), ``"keep_start"`` its first,
   ``"error"`` refuses the pair.
2. Each response may use ``budget = min(max_response_len, max_len -
   prompt_len)`` tokens. If ``budget < min_response_len`` the prompt leaves
   no room for the response: the pair is refused (field ``prompt``). A longer
   response is cut to its first ``budget`` tokens, or refused with
   ``response_truncation="error"``.
3. Chosen and rejected must still differ after truncation.

Refused pairs raise `records.DataError` naming the record's source
(``file:line``) and field, or with ``on_error="skip"`` are counted in the
returned `SkipReport`.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from cpo_jax.data import chat_templates, records

TRUNCATION = ("keep_end", "keep_start", "error")
_BOS_NAMES = ("<bos>", "<|begin_of_text|>", "<s>")  # kept by "keep_end"


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
  """How pairs are templated, tokenised and cut to length.

  template: one of `chat_templates.TEMPLATES`.
  max_len: maximum prompt + response tokens of one sequence.
  max_prompt_len: prompt truncation length (None: max_len -
    min_response_len); a larger value can leave no room for the response.
  max_response_len: response limit (None: max_len).
  prompt_truncation: "keep_end", "keep_start" or "error".
  response_truncation: "keep_start" or "error".
  min_response_len: fewest response tokens a pair may keep.
  add_bos / add_eos: raw template only: BOS before the prompt, EOS after
    each response (when the tokeniser has them).
  on_error: "raise" or "skip".
  """

  template: str = "raw"
  max_len: int = 64
  max_prompt_len: int | None = None
  max_response_len: int | None = None
  prompt_truncation: str = "keep_end"
  response_truncation: str = "keep_start"
  min_response_len: int = 1
  add_bos: bool = True
  add_eos: bool = True
  on_error: str = "raise"

  def __post_init__(self):
    if self.prompt_truncation not in TRUNCATION:
      raise ValueError(f"prompt_truncation must be in {TRUNCATION}")
    if self.response_truncation not in ("keep_start", "error"):
      raise ValueError("response_truncation must be 'keep_start' or 'error'")
    if self.template not in chat_templates.TEMPLATES:
      raise ValueError(f"template must be in {chat_templates.TEMPLATES}")
    if self.min_response_len < 1 or self.max_len < 2:
      raise ValueError("need min_response_len >= 1 and max_len >= 2")
    records.check_on_error(self.on_error)

  def fingerprint(self) -> str:
    return hashlib.sha256(repr(dataclasses.astuple(self)).encode()
                          ).hexdigest()[:16]


@dataclasses.dataclass
class EncodedPairs:
  """Ragged tokens of N pairs. Pair i's prompt is
  ``prompt_tok[prompt_off[i]:prompt_off[i+1]]``; its chosen response is
  response ``2i`` and its rejected response ``2i+1`` of ``resp_tok/resp_off``.
  ``index`` is each pair's record number in the source split.
  """

  prompt_tok: np.ndarray
  prompt_off: np.ndarray
  resp_tok: np.ndarray
  resp_off: np.ndarray
  index: np.ndarray
  dr: np.ndarray
  scores: np.ndarray
  group: np.ndarray
  report: records.SkipReport
  num_truncated: int

  def __len__(self) -> int:
    return len(self.index)

  @property
  def prompt_len(self) -> np.ndarray:
    return np.diff(self.prompt_off).astype(np.int32)

  @property
  def resp_len(self) -> np.ndarray:
    return np.diff(self.resp_off).astype(np.int32).reshape(-1, 2)

  def seq_len(self) -> np.ndarray:
    """Longer of the two sequence lengths of each pair, [N]."""
    return self.prompt_len + self.resp_len.max(axis=1)

  def prompt(self, i: int) -> np.ndarray:
    return self.prompt_tok[self.prompt_off[i]:self.prompt_off[i + 1]]

  def response(self, i: int, k: int) -> np.ndarray:
    j = 2 * i + k
    return self.resp_tok[self.resp_off[j]:self.resp_off[j + 1]]

  def fingerprint(self) -> int:
    """63-bit hash of all tokens and offsets (checks iterator restores)."""
    h = hashlib.sha256()
    for a in (self.prompt_tok, self.prompt_off, self.resp_tok, self.resp_off,
              self.index):
      h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _special_id(tokenizer, name: str):
  if name == "<bos>":
    return tokenizer.bos_id
  if name == "<eos>":
    return tokenizer.eos_id
  return tokenizer.token_id(name)


def _tokenize_segments(tokenizer, seg_lists):
  """Token ids of each segment list, text segments batch-encoded once.

  Returns (ids per list, 1 where the list starts with a BOS token else 0).
  """
  texts = [s for segs in seg_lists for kind, s in segs if kind == "text"]
  encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
  cache: dict[str, int | None] = {}
  out, leads = [], []
  for segs in seg_lists:
    ids = []
    for kind, s in segs:
      if kind == "text":
        ids.extend(next(encoded))
      else:
        if s not in cache:
          cache[s] = _special_id(tokenizer, s)
        if cache[s] is not None:
          ids.append(cache[s])
    out.append(ids)
    first = segs[0] if segs else ("text", "")
    leads.append(int(first[0] == "special" and first[1] in _BOS_NAMES
                     and cache.get(first[1]) is not None))
  return out, leads


def _cut_prompt(ids, lead, limit, cfg, src):
  if len(ids) <= limit:
    return ids
  if cfg.prompt_truncation == "error":
    raise records.DataError(src, "prompt", "prompt too long",
                            f"{len(ids)} > {limit} tokens")
  if cfg.prompt_truncation == "keep_start":
    return ids[:limit]
  lead = min(lead, limit - 1)
  return ids[:lead] + ids[len(ids) - (limit - lead):]


def encode_records(recs, tokenizer, cfg: EncodeConfig, *, indices=None,
                   chunk: int = 4096) -> EncodedPairs:
  """Tokenises `PreferenceRecord`s (see module docstring for the rules)."""
  if indices is None:
    indices = range(len(recs))
  p_toks, r_toks, keep = [], [], []
  report, n_trunc = records.SkipReport(), 0
  max_p = cfg.max_prompt_len or cfg.max_len - cfg.min_response_len
  max_r = cfg.max_response_len or cfg.max_len
  tpl = cfg.template
  for start in range(0, len(recs), chunk):
    part = recs[start:start + chunk]
    segs, bad = [], {}
    for j, rec in enumerate(part):
      try:
        segs.append(chat_templates.prompt_segments(
            tpl, rec.prompt, rec.prompt_messages, bos=cfg.add_bos))
      except ValueError as e:  # e.g. turns that do not alternate
        bad[j] = records.DataError(rec.source, "prompt_messages",
                                   "bad dialogue", str(e))
        segs.append([])
      segs.append(chat_templates.response_segments(tpl, rec.chosen,
                                                   eos=cfg.add_eos))
      segs.append(chat_templates.response_segments(tpl, rec.rejected,
                                                   eos=cfg.add_eos))
    ids, leads = _tokenize_segments(tokenizer, segs)
    for j, rec in enumerate(part):
      try:
        if j in bad:
          raise bad[j]
        prompt = _cut_prompt(ids[3 * j], leads[3 * j], max_p, cfg, rec.source)
        budget = min(max_r, cfg.max_len - len(prompt))
        if budget < cfg.min_response_len:
          raise records.DataError(
              rec.source, "prompt", "prompt leaves no room for the response",
              f"{len(prompt)} prompt tokens, max_len {cfg.max_len}")
        resps = []
        for k, field in ((1, "chosen"), (2, "rejected")):
          r = ids[3 * j + k]
          if len(r) > budget:
            if cfg.response_truncation == "error":
              raise records.DataError(rec.source, field, "response too long",
                                      f"{len(r)} > {budget} tokens")
            r, n_trunc = r[:budget], n_trunc + 1
          resps.append(r)
        if resps[0] == resps[1]:
          raise records.DataError(
              rec.source, "chosen/rejected",
              "chosen identical to rejected after truncation")
      except records.DataError as e:
        if cfg.on_error == "raise":
          raise
        report.add(e)
        continue
      p_toks.append(prompt)
      r_toks.extend(resps)
      keep.append(start + j)
  return _pack(recs, indices, keep, p_toks, r_toks, report, n_trunc)


def _ragged(lists):
  off = np.zeros(len(lists) + 1, np.int64)
  np.cumsum([len(x) for x in lists], out=off[1:])
  flat = np.fromiter((t for x in lists for t in x), np.int32, count=off[-1])
  return flat, off


def _pack(recs, indices, keep, p_toks, r_toks, report, n_trunc):
  p_flat, p_off = _ragged(p_toks)
  r_flat, r_off = _ragged(r_toks)
  kept = [recs[i] for i in keep]
  return EncodedPairs(
      prompt_tok=p_flat, prompt_off=p_off, resp_tok=r_flat, resp_off=r_off,
      index=np.asarray([indices[i] for i in keep], np.int64),
      dr=np.asarray([r.dr for r in kept], np.float32),
      scores=np.asarray([[r.score_chosen, r.score_rejected] for r in kept],
                        np.float32).reshape(-1, 2),
      group=np.asarray([r.group for r in kept], np.int32),
      report=report, num_truncated=n_trunc)


def encode_source(source, tokenizer, cfg: EncodeConfig, *,
                  chunk: int = 4096) -> EncodedPairs:
  """Reads a TFDS data source (or any sequence of examples) and encodes it."""
  n = len(source)
  recs = []
  for start in range(0, n, chunk):
    keys = list(range(start, min(start + chunk, n)))
    getter = getattr(source, "__getitems__", None)
    exs = getter(keys) if getter else [source[k] for k in keys]
    recs.extend(records.decode_example(e) for e in exs)
  return encode_records(recs, tokenizer, cfg, chunk=chunk)
