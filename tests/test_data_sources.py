"""TFDS builders (synthetic + local files) and bad-input handling."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from cpo_jax import data as D
from cpo_jax.data import builders, records, synthetic

tfds.disable_progress_bar()


def _read(builder, split="train"):
  src = D.data_source(builder, split)
  return [records.decode_example(src[i]) for i in range(len(src))]


# --------------------------------------------------------------- synthetic
@pytest.mark.parametrize("task", sorted(synthetic.TASKS))
def test_synthetic_builder_rewards_and_bias(tmp_path, task):
  b = D.build_synthetic(tmp_path, task=task, n_train=400, n_test=50,
                        ref_bias=0.3, labels="deterministic", seed=1)
  train, sft = _read(b, "train"), _read(b, "sft")
  assert len(train) == len(sft) == 400 and len(_read(b, "test")) == 50
  for rec in train:
    assert len((rec.prompt + max(rec.chosen, rec.rejected, key=len)).encode()) <= 32
    r_w = D.ground_truth_reward(task, rec.prompt, rec.chosen)
    r_l = D.ground_truth_reward(task, rec.prompt, rec.rejected)
    assert rec.score_chosen == pytest.approx(r_w, abs=1e-6)
    assert rec.dr == pytest.approx(r_w - r_l, abs=1e-6)
    assert rec.dr > 0  # deterministic labels: chosen is better
  groups = np.array([r.group for r in train])
  assert 0.2 < groups.mean() < 0.4
  for tr, sf in zip(train, sft):  # sft: same prompts; group 1 taught the worse
    assert sf.prompt == tr.prompt and sf.group == tr.group
    assert (sf.dr < 0) == bool(sf.group)
  assert {tr.prompt for tr in train} != {r.prompt for r in _read(b, "test")}


def test_synthetic_bradley_terry_labels_and_determinism():
  recs = synthetic.make_records("add", "train", 3000, seed=3, labels="bt",
                                bt_scale=1.0)
  dr = np.array([r.dr for r in recs])
  # P(label flipped) = sigmoid(-|dr|) on average
  expected = np.mean(1 / (1 + np.exp(np.abs(dr))))
  assert abs((dr < 0).mean() - expected) < 0.03
  again = synthetic.make_records("add", "train", 50, seed=3, labels="bt",
                                 bt_scale=1.0)
  assert again == recs[:50]
  other = synthetic.make_records("add", "train", 50, seed=4, labels="bt")
  assert other != recs[:50]


def test_ground_truth_reward_values():
  assert D.ground_truth_reward("add", "2+3=", "5") == 0.0
  assert D.ground_truth_reward("add", "2+3=", "7") == pytest.approx(-math.log(3))
  assert D.ground_truth_reward("add", "2+3=", "five") == synthetic.UNPARSEABLE
  assert D.ground_truth_reward("reverse", "rev:abc=", "cba") == 0.0
  assert D.ground_truth_reward("reverse", "rev:abc=", "cb") == pytest.approx(-1 / 3)
  np.testing.assert_allclose(
      D.score_batch("add", ["1+1=", "1+1="], ["2", "3"]), [0.0, -math.log(2)])


# ------------------------------------------------------------- local files
def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


PAIRS = [{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No.",
          "score_chosen": 8.5, "score_rejected": 2.0},
         {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]


def test_local_pairs_jsonl(tmp_path):
  b = D.build_local(tmp_path / "ds", _jsonl(tmp_path / "p.jsonl", PAIRS))
  got = _read(b)
  assert [(r.prompt, r.chosen, r.rejected) for r in got] == [
      ("Say hi", "Hi!", "No."), ("2+2?", "4", "5")]
  assert got[0].score_chosen == 8.5 and got[0].score_rejected == 2.0
  assert math.isnan(got[1].score_chosen) and math.isnan(got[0].dr)
  assert got[1].source.endswith("p.jsonl:line 2")
  assert D.skip_report(b)["total"] == 0


def test_local_chat_json_ultrafeedback_style(tmp_path):
  rows = [{"prompt": "Name a colour",
           "chosen": [{"role": "user", "content": "Name a colour"},
                      {"role": "assistant", "content": "Blue."}],
           "rejected": [{"role": "user", "content": "Name a colour"},
                        {"role": "assistant", "content": "Seven."}],
           "score_chosen": 9.0, "score_rejected": 3.0},
          {"prompt": "unused when turns are shared",
           "chosen": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Hey."}],
           "rejected": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hello"},
                        {"role": "assistant", "content": "Greetings, friend."}]}]
  path = tmp_path / "uf.json"
  path.write_text(json.dumps(rows))
  got = _read(D.build_local(tmp_path / "ds", {"train": path, "test": path}))
  assert got[0].prompt_messages == ({"role": "user", "content": "Name a colour"},)
  assert (got[0].chosen, got[0].rejected, got[0].score_chosen) == ("Blue.", "Seven.", 9.0)
  assert [m["role"] for m in got[1].prompt_messages] == ["system", "user"]
  assert got[1].rejected == "Greetings, friend."
  assert got[1].source.endswith("uf.json:record 1")


def test_local_parquet_armorm_scores(tmp_path):
  rows = [{"prompt": "Q1", "all_generated_responses": ["a", "b", "c"],
           "all_rm_scores": [0.1, 0.7, 0.3],
           "chosen": [{"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "b"}],
           "rejected": [{"role": "user", "content": "Q1"},
                        {"role": "assistant", "content": "a"}]}]
  path = tmp_path / "armorm.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  (rec,) = _read(D.build_local(tmp_path / "ds", path))
  assert (rec.chosen, rec.rejected) == ("b", "a")
  assert rec.score_chosen == pytest.approx(0.7)
  assert rec.score_rejected == pytest.approx(0.1)


def test_local_hh_shared_prefix(tmp_path):
  prompt = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant:"
  rows = [{"chosen": prompt + " Why did the chicken...",
           "rejected": prompt + " No."}]
  (rec,) = _read(D.build_local(tmp_path / "ds", _jsonl(tmp_path / "hh.jsonl", rows)))
  assert rec.prompt == prompt
  assert (rec.chosen, rec.rejected) == (" Why did the chicken...", " No.")
  assert rec.prompt_messages == (
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Tell a joke"})


def test_changed_file_gives_new_dataset(tmp_path):
  path = _jsonl(tmp_path / "p.jsonl", PAIRS)
  b1 = D.build_local(tmp_path / "ds", path)
  _jsonl(path, PAIRS[:1])
  b2 = D.build_local(tmp_path / "ds", path)
  assert b1.data_dir != b2.data_dir and len(_read(b2)) == 1


# --------------------------------------------------------------- bad input
GOOD = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
BAD_LINES = {
    "malformed JSON": (b'{"prompt": "p", "chosen": "a",\n', "(line)"),
    "missing field": (b'{"prompt": "p", "chosen": "a"}\n', "rejected"),
    "empty text": (b'{"prompt": "p", "chosen": "  ", "rejected": "b"}\n', "chosen"),
    "chosen identical to rejected":
        (b'{"prompt": "p", "chosen": "a", "rejected": "a"}\n', "chosen/rejected"),
    "non-UTF-8 bytes": (b'{"prompt": "p\xff\xfe", "chosen": "a", "rejected": "b"}\n',
                        "prompt"),
    "wrong type": (b'{"prompt": "p", "chosen": 3, "rejected": "b"}\n', "chosen"),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_raises_with_file_line_field(tmp_path, reason):
  line, field = BAD_LINES[reason]
  path = tmp_path / "bad.jsonl"
  path.write_bytes(GOOD + line + GOOD)
  with pytest.raises(D.DataError) as err:
    D.build_local(tmp_path / "ds", path)
  assert err.value.reason == reason and err.value.field == field
  assert err.value.source == f"{path}:line 2"
  assert "bad.jsonl:line 2" in str(err.value) and repr(field) in str(err.value)


def test_bad_lines_skipped_and_counted(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(GOOD + b"".join(l for l, _ in BAD_LINES.values()) + GOOD)
  b = D.build_local(tmp_path / "ds", path, on_error="skip")
  rep = D.skip_report(b)
  assert rep["total"] == len(BAD_LINES)
  assert rep["counts"] == {r: 1 for r in BAD_LINES}
  assert len(_read(b)) == 2
  assert any("bad.jsonl:line 3" in e for e in rep["examples"])


def test_bad_parquet_bytes_and_chat_turns(tmp_path):
  path = tmp_path / "b.parquet"
  pq.write_table(pa.table({"prompt": pa.array([b"ok", b"\xc3("], pa.binary()),
                           "chosen": ["a", "a"], "rejected": ["b", "b"]}), path)
  with pytest.raises(D.DataError, match=r"b.parquet:record 1: field 'prompt'"):
    D.build_local(tmp_path / "ds", path)
  rows = [{"chosen": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "q"},
                        {"role": "robot", "content": "b"}]}]
  with pytest.raises(D.DataError, match=r"line 1: field 'rejected\[1\].role'"):
    D.build_local(tmp_path / "ds", _jsonl(tmp_path / "c.jsonl", rows))
  hh = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"}]
  with pytest.raises(D.DataError, match="shared|prompt prefix"):
    D.build_local(tmp_path / "ds", _jsonl(tmp_path / "h.jsonl", hh))


def test_unknown_options_refused(tmp_path):
  with pytest.raises(ValueError, match="on_error"):
    D.build_local(tmp_path, _jsonl(tmp_path / "p.jsonl", PAIRS), on_error="ignore")
  (tmp_path / "p.csv").write_text("prompt,chosen,rejected\n")
  with pytest.raises(ValueError, match="unknown file type"):
    D.build_local(tmp_path / "ds", tmp_path / "p.csv")
  assert builders.dataset_fingerprint(
      D.build_local(tmp_path / "ds", tmp_path / "p.jsonl"), "train").endswith("/train/2")
