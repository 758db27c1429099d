"""Tokenisers, chat templates, masks and truncation."""

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from cpo_jax import data as D
from cpo_jax.data import chat_templates as ct
from cpo_jax.data.records import PreferenceRecord

SPECIALS = ["<pad>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "<|im_start|>",
            "<|im_end|>"]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
  """A tiny byte-level BPE trained here and saved as tokenizer.json."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ["the quick brown fox jumps over the lazy dog",
            "user assistant system hello world", "[INST] [/INST] 12+34=46"] * 20
  tok.train_from_iterator(corpus, trainer)
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.save(str(path))
  return D.HFTokenizer(path, pad="<pad>", bos="<|begin_of_text|>",
                       eos="<|eot_id|>")


def _rec(prompt, chosen, rejected, messages=(), source="f.jsonl:line 7"):
  return PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected,
                          source=source, prompt_messages=tuple(messages))


def test_byte_tokenizer_round_trip():
  tok = D.ByteTokenizer()
  ids = tok.encode("héllo <eos>")
  assert min(ids) >= 3 and tok.decode(ids) == "héllo <eos>"
  assert len(ids) == len("héllo <eos>".encode())
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)


def test_hf_tokenizer_from_local_file(hf_tok, tmp_path):
  text = "the quick brown fox 12+34=46 ünïcode"
  assert hf_tok.decode(hf_tok.encode(text)) == text
  assert hf_tok.token_id("<|eot_id|>") == hf_tok.eos_id
  assert hf_tok.pad_id == SPECIALS.index("<pad>")
  with pytest.raises(KeyError, match="no token"):
    hf_tok.token_id("<missing>")
  other = D.HFTokenizer(hf_tok.path, pad="<pad>", bos="<s>", eos="</s>")
  assert other.fingerprint != hf_tok.fingerprint


GOLDEN = {
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
               "Be kind.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
               "Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
               "Hello!<|eot_id|>"),
    "mistral": ("<s>[INST] Be kind.\n\nHi there [/INST]", "Hello!</s>"),
    "qwen2": ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n"
              "Hi there<|im_end|>\n<|im_start|>assistant\n",
              "Hello!<|im_end|>"),
}


@pytest.mark.parametrize("template", sorted(GOLDEN))
def test_chat_templates_golden_and_mask_exact(hf_tok, template):
  msgs = [{"role": "system", "content": "Be kind."},
          {"role": "user", "content": "Hi there"}]
  want_prompt, want_resp = GOLDEN[template]
  assert ct.render_text(ct.prompt_segments(template, "", msgs)) == want_prompt
  assert ct.render_text(ct.response_segments(template, "Hello!")) == want_resp
  pairs = D.encode_records([_rec("", "Hello!", "Bye.", msgs)], hf_tok,
                           D.EncodeConfig(template=template, max_len=128))
  # the tokens under the loss mask are exactly the response + end of turn
  assert hf_tok.decode(pairs.response(0, 0)) == want_resp
  assert hf_tok.decode(pairs.prompt(0)) == want_prompt
  specials = [hf_tok.token_id(s) for s in SPECIALS]
  assert sum(t in specials for t in pairs.response(0, 1)) == 1


def test_keep_end_keeps_begin_of_text_and_assistant_header(hf_tok):
  msgs = [{"role": "user", "content": "the quick brown fox " * 8}]
  pairs = D.encode_records([_rec("", "Hi", "Yo", msgs)], hf_tok, D.EncodeConfig(
      template="llama3", max_len=64, max_prompt_len=12))
  p = pairs.prompt(0)
  assert len(p) == 12 and p[0] == hf_tok.token_id("<|begin_of_text|>")
  assert hf_tok.decode(p[1:]).endswith(
      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
  assert p[1] != hf_tok.token_id("<|start_header_id|>")


def test_qwen_default_system_and_mistral_alternation(hf_tok):
  segs = ct.prompt_segments("qwen2", "hi", ())
  assert ct.render_text(segs).startswith(
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
  bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
  with pytest.raises(D.DataError, match="line 7: field 'prompt_messages'"):
    D.encode_records([_rec("", "x", "y", bad)], hf_tok,
                     D.EncodeConfig(template="mistral"))


def test_specials_never_come_from_text():
  tok = D.ByteTokenizer()
  pairs = D.encode_records([_rec("<bos>", "<eos>", "x")], tok, D.EncodeConfig())
  assert list(pairs.prompt(0)) == [tok.bos_id] + tok.encode("<bos>")
  assert list(pairs.response(0, 0)) == tok.encode("<eos>") + [tok.eos_id]


def _enc(recs, **kw):
  return D.encode_records(recs, D.ByteTokenizer(), D.EncodeConfig(**kw))


def test_prompt_truncation_modes():
  rec = _rec("abcdefghij", "XY", "Z")
  tok = D.ByteTokenizer()
  end = _enc([rec], max_len=32, max_prompt_len=5)
  assert tok.decode(end.prompt(0)) == "ghij" and end.prompt(0)[0] == tok.bos_id
  start = _enc([rec], max_len=32, max_prompt_len=5, prompt_truncation="keep_start")
  assert tok.decode(start.prompt(0)) == "abcd"
  with pytest.raises(D.DataError, match="line 7: field 'prompt': prompt too long"):
    _enc([rec], max_len=32, max_prompt_len=5, prompt_truncation="error")


def test_response_truncation_and_no_room():
  tok = D.ByteTokenizer()
  pairs = _enc([_rec("p", "abcdef", "abcxyz")], max_len=8)  # bos p | 6 left
  assert tok.decode(pairs.response(0, 0)) == "abcdef" and pairs.num_truncated == 2
  assert len(pairs.response(0, 0)) == 6 and pairs.seq_len()[0] == 8
  with pytest.raises(D.DataError, match="field 'chosen': response too long"):
    _enc([_rec("p", "abcdef", "abcxyz")], max_len=8, response_truncation="error")
  with pytest.raises(D.DataError, match="identical to rejected after truncation"):
    _enc([_rec("p", "abcdef", "abcdeg")], max_len=6)
  long_prompt = _rec("x" * 20, "a", "b")
  with pytest.raises(D.DataError, match="line 7: field 'prompt': prompt leaves no room"):
    _enc([long_prompt], max_len=16, prompt_truncation="error", max_prompt_len=40,
         min_response_len=2)
  # a max_prompt_len above max_len - min_response_len leaves no room either
  with pytest.raises(D.DataError, match="prompt leaves no room"):
    _enc([long_prompt], max_len=16, prompt_truncation="keep_start",
         max_prompt_len=15, min_response_len=3)
  # by default the prompt is cut so that the response always has room
  fit = _enc([long_prompt], max_len=16, min_response_len=3)
  assert len(fit.prompt(0)) == 13 and len(fit.response(0, 0)) == 2


def test_encode_skip_reports_counts():
  recs = [_rec("ok", "a", "b", source="f:line 1"),
          _rec("x" * 40, "a", "b", source="f:line 2"),
          _rec("p", "samesame1", "samesame2", source="f:line 3"),
          _rec("ok", "c", "d", source="f:line 4")]
  pairs = _enc(recs, max_len=10, prompt_truncation="error", on_error="skip")
  assert list(pairs.index) == [0, 3]
  assert pairs.report.counts == {"prompt too long": 1,
                                 "chosen identical to rejected after truncation": 1}
  assert "skipped 2 records" in pairs.report.summary()
