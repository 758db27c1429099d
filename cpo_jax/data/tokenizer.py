"""Tokenisers: a built-in byte-level one and HF `tokenizers` from a local file.

Both expose the same small interface (`Tokenizer`): ``encode_batch`` of
strings to lists of int ids *without* special tokens added implicitly,
``decode``, ``vocab_size``, ``pad_id``/``bos_id``/``eos_id``, ``token_id``
of a special token by name, and a ``fingerprint`` naming the exact
vocabulary (used as a cache key). Nothing is downloaded: the HF tokeniser
is read from a ``tokenizer.json`` on disk.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Protocol, Sequence


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int | None
  fingerprint: str

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...

  def token_id(self, token: str) -> int:
    ...


class ByteTokenizer:
  """UTF-8 bytes shifted by the number of special tokens.

  Ids: 0 = <pad>, 1 = <bos>, 2 = <eos>, byte b -> b + 3; vocab_size 259.
  Special tokens are only ever added by the encoder/chat template, never by
  text: a text containing "<eos>" is encoded as its bytes.
  """

  SPECIALS = ("<pad>", "<bos>", "<eos>")
  OFFSET = len(SPECIALS)
  vocab_size = 256 + OFFSET
  pad_id, bos_id, eos_id = 0, 1, 2
  fingerprint = "byte-v1"

  def encode_batch(self, texts):
    off = self.OFFSET
    return [[b + off for b in t.encode("utf-8")] for t in texts]

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def decode(self, ids) -> str:
    data = bytes(int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET)
    return data.decode("utf-8", errors="replace")

  def token_id(self, token: str) -> int:
    if token not in self.SPECIALS:
      raise KeyError(f"byte tokenizer has no special token {token!r}")
    return self.SPECIALS.index(token)


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` read from a local tokenizer.json.

  ``encode_batch`` never adds the file's post-processor specials (BOS etc.):
  the encoder adds BOS/EOS explicitly so that the response tokens under the
  loss mask are exactly the response.
  pad/bos/eos: token strings (looked up in the vocabulary) or None.
  """

  def __init__(self, path, *, pad: str | None = None, bos: str | None = None,
               eos: str | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    raw = path.read_bytes()
    self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    self.path = str(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self.token_id(bos) if bos else None
    self.eos_id = self.token_id(eos) if eos else None
    if pad:
      self.pad_id = self.token_id(pad)
    else:  # padding is always masked out; any id works, eos is customary
      self.pad_id = self.eos_id if self.eos_id is not None else 0
    self.fingerprint = "hf-" + hashlib.sha256(
        raw + repr((pad, bos, eos)).encode()).hexdigest()[:16]

  def encode_batch(self, texts):
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids for e in encs]

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_id(self, token: str) -> int:
    tid = self._tok.token_to_id(token)
    if tid is None:
      raise KeyError(f"{self.path}: no token {token!r} in the vocabulary")
    return tid
