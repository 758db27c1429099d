"""Chat templates for the model families of `cpo_jax.models`, written out.

A template turns a prompt (chat messages) and a response into *segments*:
``("text", s)`` pieces tokenised as text, and ``("special", name)`` pieces
looked up as single special-token ids. Special tokens therefore never come
from text, and the response segments are tokenised on their own, so the
tokens under the loss mask are exactly the response (plus its end-of-turn
token). Tokenising prompt and response separately can differ from
tokenising the concatenated string at the seam by a merge; this is the
usual choice in preference training and is what keeps masks exact.

Templates (``TEMPLATES``):

* ``"raw"``: optional ``bos``, the plain prompt text, response, ``eos``.
* ``"llama3"``: ``<|begin_of_text|>`` then per turn
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``,
  generation header for the assistant; response ends with ``<|eot_id|>``.
  Content is stripped, as the Llama 3 template does.
* ``"mistral"``: ``<s>[INST] {user} [/INST]{assistant}</s>...``; a system
  message is prepended to the first user turn ("{system}\\n\\n{user}").
* ``"qwen2"``: ChatML, ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the
  default system message "You are a helpful assistant." when none is given;
  response ends with ``<|im_end|>``.
"""

from __future__ import annotations

from typing import Sequence

Segment = tuple[str, str]
Messages = Sequence[dict]


def _check_roles(messages: Messages, template: str) -> None:
  if not messages:
    raise ValueError(f"{template}: empty prompt")
  if messages[-1]["role"] != "user":
    raise ValueError(f"{template}: the prompt's last turn must be 'user', "
                     f"got {messages[-1]['role']!r}")


def raw_prompt(prompt: str, messages: Messages, *, bos: bool) -> list[Segment]:
  del messages
  return ([("special", "<bos>")] if bos else []) + [("text", prompt)]


def raw_response(text: str, *, eos: bool) -> list[Segment]:
  return [("text", text)] + ([("special", "<eos>")] if eos else [])


def llama3_prompt(prompt: str, messages: Messages) -> list[Segment]:
  del prompt
  _check_roles(messages, "llama3")
  segs = [("special", "<|begin_of_text|>")]
  for m in list(messages) + [{"role": "assistant", "content": None}]:
    segs += [("special", "<|start_header_id|>"), ("text", m["role"]),
             ("special", "<|end_header_id|>"), ("text", "\n\n")]
    if m["content"] is not None:
      segs += [("text", m["content"].strip()), ("special", "<|eot_id|>")]
  return segs


def llama3_response(text: str) -> list[Segment]:
  return [("text", text.strip()), ("special", "<|eot_id|>")]


def mistral_prompt(prompt: str, messages: Messages) -> list[Segment]:
  del prompt
  _check_roles(messages, "mistral")
  msgs = list(messages)
  if msgs[0]["role"] == "system":
    if len(msgs) < 2 or msgs[1]["role"] != "user":
      raise ValueError("mistral: a system message must precede a user turn")
    merged = msgs[0]["content"] + "\n\n" + msgs[1]["content"]
    msgs = [{"role": "user", "content": merged}] + msgs[2:]
  segs = [("special", "<s>")]
  for i, m in enumerate(msgs):
    want = "user" if i % 2 == 0 else "assistant"
    if m["role"] != want:
      raise ValueError("mistral: turns must alternate user/assistant")
    if want == "user":
      segs.append(("text", f"[INST] {m['content']} [/INST]"))
    else:
      segs += [("text", m["content"]), ("special", "</s>")]
  return segs


def mistral_response(text: str) -> list[Segment]:
  return [("text", text), ("special", "</s>")]


QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."


def qwen2_prompt(prompt: str, messages: Messages) -> list[Segment]:
  del prompt
  _check_roles(messages, "qwen2")
  msgs = list(messages)
  if msgs[0]["role"] != "system":
    msgs = [{"role": "system", "content": QWEN2_DEFAULT_SYSTEM}] + msgs
  segs = []
  for m in msgs:
    segs += [("special", "<|im_start|>"), ("text", f"{m['role']}\n{m['content']}"),
             ("special", "<|im_end|>"), ("text", "\n")]
  return segs + [("special", "<|im_start|>"), ("text", "assistant\n")]


def qwen2_response(text: str) -> list[Segment]:
  return [("text", text), ("special", "<|im_end|>")]


TEMPLATES = ("raw", "llama3", "mistral", "qwen2")


def prompt_segments(template: str, prompt: str, messages: Messages, *,
                    bos: bool = True) -> list[Segment]:
  """Segments of the templated prompt (ends with the assistant header)."""
  if template == "raw":
    return raw_prompt(prompt, messages, bos=bos)
  if not messages:
    messages = [{"role": "user", "content": prompt}]
  fns = {"llama3": llama3_prompt, "mistral": mistral_prompt,
         "qwen2": qwen2_prompt}
  if template not in fns:
    raise ValueError(f"unknown chat template {template!r}; have {TEMPLATES}")
  return fns[template](prompt, messages)


def response_segments(template: str, text: str, *,
                      eos: bool = True) -> list[Segment]:
  """Segments of one response, including its end-of-turn token."""
  if template == "raw":
    return raw_response(text, eos=eos)
  fns = {"llama3": llama3_response, "mistral": mistral_response,
         "qwen2": qwen2_response}
  if template not in fns:
    raise ValueError(f"unknown chat template {template!r}; have {TEMPLATES}")
  return fns[template](text)


def render_text(segments: Sequence[Segment]) -> str:
  """The segments as one string (for reading and for tests)."""
  return "".join(s for _, s in segments)
