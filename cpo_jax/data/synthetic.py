"""Synthetic LM preference tasks with a programmatic ground-truth reward.

These are the embedded default data for the small-LM experiments: short
byte strings (prompt + response <= 32 bytes), a checkable reward r*(x, y),
Bradley–Terry or deterministic labels, and a controllable *reference bias*.

Tasks (`TASKS`):

* ``"add"``: prompt ``"37+485="``, answer the decimal sum.
  ``r*(x, y) = -log(1 + |y - (a + b)|)``; 0 for the right answer; output that
  is not an integer scores ``UNPARSEABLE``.
* ``"reverse"``: prompt ``"rev:hello="``, answer ``"olleh"``.
  ``r*(x, y) = -levenshtein(y, reversed) / len(reversed)``.

Reference bias. Each prompt is put, with probability ``ref_bias``, in the
"misaligned" group (``group = 1``). The ``sft`` split holds, index by index,
the prompts of the ``train`` split with one demonstration in ``chosen``
(``rejected`` holds the other response, for the record): the better
response for group 0, the *worse* one for group 1. A reference fine-tuned on
``sft`` therefore prefers the rejected response on the misaligned pairs,
which is exactly what violates Assumption 3.1 (DESIGN.md §2).

Labels. ``"deterministic"``: chosen is the higher-reward response.
``"bt"``: chosen is response a with probability
``sigmoid(bt_scale * (r*(a) - r*(b)))``; ``dr = r*(chosen) - r*(rejected)``
is then negative on the pairs whose label was flipped.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from typing import Callable

import numpy as np

from cpo_jax.data.records import PreferenceRecord

UNPARSEABLE = -8.0
MAX_BYTES = 32
_SPLIT_CODES = {"train": 0, "test": 1, "sft": 0}
_INT = re.compile(r"^\s*-?\d{1,12}\s*$")


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insert/delete/substitute, unit costs)."""
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, start=1):
    cur = [i]
    for j, cb in enumerate(b, start=1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


@dataclasses.dataclass(frozen=True)
class Task:
  """A prompt sampler, its correct answer, wrong answers and the reward."""

  name: str
  sample_prompt: Callable[[np.random.Generator], str]
  answer: Callable[[str], str]
  corrupt: Callable[[str, str, np.random.Generator], str]
  reward: Callable[[str, str], float]


# --- add -------------------------------------------------------------------
def _add_prompt(rng):
  a, b = rng.integers(0, 1000, size=2)
  return f"{a}+{b}="


def _add_answer(prompt):
  a, b = prompt.rstrip("=").split("+")
  return str(int(a) + int(b))


def _add_corrupt(prompt, answer, rng):
  del prompt
  kind = rng.integers(0, 3)
  value = int(answer)
  if kind == 0:  # small arithmetic slip
    return str(max(value + int(rng.choice([-3, -2, -1, 1, 2, 3])), 0))
  if kind == 1:  # carry error
    return str(max(value + int(rng.choice([-100, -10, 10, 100])), 0))
  return str(int(rng.integers(0, 2000)))  # a guess


def add_reward(prompt: str, response: str) -> float:
  if not _INT.match(response):
    return UNPARSEABLE
  err = abs(int(response) - int(_add_answer(prompt)))
  return -math.log1p(err)


# --- reverse ---------------------------------------------------------------
def _rev_prompt(rng):
  n = int(rng.integers(3, 9))
  s = "".join(rng.choice(list(string.ascii_lowercase), size=n))
  return f"rev:{s}="


def _rev_answer(prompt):
  return prompt[len("rev:"):-1][::-1]


def _rev_corrupt(prompt, answer, rng):
  kind = rng.integers(0, 4)
  chars = list(answer)
  if kind == 0:  # copy instead of reversing
    out = prompt[len("rev:"):-1]
    if out != answer:
      return out
  if kind <= 1:  # swap two neighbours
    i = int(rng.integers(0, len(chars) - 1))
    chars[i], chars[i + 1] = chars[i + 1], chars[i]
  elif kind == 2:  # substitute one character
    i = int(rng.integers(0, len(chars)))
    chars[i] = string.ascii_lowercase[(ord(chars[i]) - 96) % 26]
  else:  # drop one character
    del chars[int(rng.integers(0, len(chars)))]
  return "".join(chars)


def reverse_reward(prompt: str, response: str) -> float:
  target = _rev_answer(prompt)
  return -levenshtein(response.strip(), target) / max(len(target), 1)


TASKS = {
    "add": Task("add", _add_prompt, _add_answer, _add_corrupt, add_reward),
    "reverse": Task("reverse", _rev_prompt, _rev_answer, _rev_corrupt,
                    reverse_reward),
}


def ground_truth_reward(task: str, prompt: str, response: str) -> float:
  """r*(x, y) of a task: what a trainer uses to score generated text."""
  return TASKS[task].reward(prompt, response)


def score_batch(task: str, prompts, responses) -> np.ndarray:
  """Vectorised `ground_truth_reward` over lists of strings -> float32 [N]."""
  fn = TASKS[task].reward
  return np.asarray([fn(p, r) for p, r in zip(prompts, responses)],
                    np.float32)


def _two_responses(task: Task, prompt: str, rng, p_correct: float):
  """A better and a worse response with different rewards (better first)."""
  answer = task.answer(prompt)
  for _ in range(16):
    a = answer if rng.random() < p_correct else task.corrupt(prompt, answer, rng)
    b = task.corrupt(prompt, answer, rng)
    ra, rb = task.reward(prompt, a), task.reward(prompt, b)
    if a != b and ra != rb and a.strip() and b.strip():
      return (a, ra, b, rb) if ra > rb else (b, rb, a, ra)
  return answer, 0.0, answer + answer[-1], task.reward(prompt, answer + answer[-1])


def make_records(task: str, split: str, n: int, *, seed: int = 0,
                 ref_bias: float = 0.3, labels: str = "bt",
                 bt_scale: float = 4.0, p_correct: float = 0.5):
  """The ``n`` records of one split of a synthetic task (a pure function).

  Record i depends only on (seed, split, i). ``sft`` shares its prompts and
  groups with ``train`` (same i, same stream) and holds demonstrations.
  """
  if labels not in ("bt", "deterministic"):
    raise ValueError(f"labels must be 'bt' or 'deterministic', got {labels!r}")
  if split not in _SPLIT_CODES:
    raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}")
  if not 0.0 <= ref_bias <= 1.0:
    raise ValueError(f"ref_bias must be in [0, 1], got {ref_bias}")
  t = TASKS[task]
  out = []
  for i in range(n):
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
    prompt = t.sample_prompt(rng)
    good, r_good, bad, r_bad = _two_responses(t, prompt, rng, p_correct)
    group = int(rng.random() < ref_bias)
    p_good = 1.0 / (1.0 + math.exp(-bt_scale * (r_good - r_bad)))
    flip = labels == "bt" and rng.random() >= p_good
    if split == "sft":
      demo, other = (bad, good) if group else (good, bad)
      rd, ro = (r_bad, r_good) if group else (r_good, r_bad)
    else:
      demo, other = (bad, good) if flip else (good, bad)
      rd, ro = (r_bad, r_good) if flip else (r_good, r_bad)
    assert len((prompt + demo).encode()) <= MAX_BYTES
    out.append(PreferenceRecord(
        prompt=prompt, chosen=demo, rejected=other,
        source=f"synthetic:{task}:{split}:{i}", score_chosen=rd,
        score_rejected=ro, dr=rd - ro, group=group))
  return out
