"""Pair batches, deterministic order, resume, host slicing, ref-log-prob cache."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cpo_jax import data as D
from cpo_jax.data import batching, ref_cache

tfds.disable_progress_bar()
TOK = D.ByteTokenizer()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return D.build_synthetic(tmp_path_factory.mktemp("syn"), task="reverse",
                           n_train=203, n_test=20, seed=5)


@pytest.fixture(scope="module")
def pairs(built):
  return D.encode_split(built, "train", TOK, D.EncodeConfig(max_len=32))


def _it(pairs, **kw):
  return D.PairIterator(pairs, D.BatchConfig(**{"batch_size": 8, **kw}),
                        pad_id=TOK.pad_id)


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_format_and_masks(built, pairs, side):
  src = D.data_source(built, "train")
  batch = next(_it(pairs, padding_side=side, buckets=(16, 24, 32)))
  b, two, length = batch["tokens"].shape
  assert (b, two) == (8, 2) and length in (16, 24, 32)
  assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == bool
  for row in range(b):
    ex = src[int(batch["index"][row])]
    for k, field in enumerate(("chosen", "rejected")):
      toks, mask = batch["tokens"][row, k], batch["loss_mask"][row, k]
      attn, pos = batch["attention_mask"][row, k], batch["positions"][row, k]
      # the tokens under the mask are exactly the response (+ EOS)
      assert list(toks[mask]) == TOK.encode(ex[field].decode()) + [TOK.eos_id]
      real = toks[attn]
      assert list(real) == [TOK.bos_id] + TOK.encode((ex["prompt"] + ex[field]).decode()) + [TOK.eos_id]
      assert (toks[~attn] == TOK.pad_id).all() and not (mask & ~attn).any()
      np.testing.assert_array_equal(pos[attn], np.arange(attn.sum()))
      assert attn[0 if side == "right" else -1]
    assert batch["dr"][row] == pytest.approx(ex["score_chosen"] - ex["score_rejected"], abs=1e-6)
  assert batch["prompt_len"].shape == (8,) and batch["response_len"].shape == (8, 2)
  assert batch["valid"].all()


def test_epochs_cover_every_pair_once(pairs):
  it = _it(pairs, num_epochs=2, drop_remainder=False, seed=1)
  batches = list(it)
  per_epoch = -(-len(pairs) // 8)
  assert len(batches) == 2 * per_epoch
  for e in range(2):
    chunk = batches[e * per_epoch:(e + 1) * per_epoch]
    idx = np.concatenate([bt["index"][bt["valid"]] for bt in chunk])
    assert sorted(idx) == sorted(pairs.index)
  assert (~batches[per_epoch - 1]["valid"]).sum() == per_epoch * 8 - len(pairs)
  e0 = np.concatenate([bt["index"] for bt in batches[:3]])
  e1 = np.concatenate([bt["index"] for bt in batches[per_epoch:per_epoch + 3]])
  assert not np.array_equal(e0, e1)  # reshuffled each epoch
  first = next(_it(pairs, seed=2))["index"]
  assert not np.array_equal(first, batches[0]["index"])
  _same(next(_it(pairs, seed=1)), batches[0])  # same seed, same batch


@pytest.mark.parametrize("k", [3, 25, 26])  # mid-epoch and across the boundary
def test_resume_after_k_batches(pairs, k, tmp_path):
  ref = _it(pairs, sort_window=4, seed=7)
  full = [next(ref) for _ in range(k + 4)]
  it = _it(pairs, sort_window=4, seed=7)
  for _ in range(k):
    next(it)
  state = it.get_state()
  assert all(isinstance(v, np.ndarray) and v.dtype == np.int64 for v in state.values())
  np.savez(tmp_path / "state.npz", **state)  # any array-pytree store works
  restored = dict(np.load(tmp_path / "state.npz"))
  fresh = _it(pairs, sort_window=4, seed=7)
  fresh.set_state(restored)
  for want in full[k:]:
    _same(next(fresh), want)


def test_state_saved_with_orbax(pairs, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  it = _it(pairs)
  for _ in range(5):
    next(it)
  state = it.get_state()
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "it", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "it")
  want = next(it)
  fresh = _it(pairs)
  fresh.set_state(restored)
  _same(next(fresh), want)


def test_state_from_other_run_refused(pairs):
  state = _it(pairs, seed=1).get_state()
  with pytest.raises(ValueError, match="seed"):
    _it(pairs, seed=2).set_state(state)
  with pytest.raises(ValueError, match="batch_size"):
    _it(pairs, seed=1, batch_size=4).set_state(state)


def test_per_host_slices_make_the_global_batch(pairs):
  kw = dict(batch_size=8, seed=3, buckets=tuple(range(4, 33)))
  whole = _it(pairs, **kw)
  hosts = [_it(pairs, process_index=h, process_count=2, **kw) for h in range(2)]
  for _ in range(25):
    g = next(whole)
    parts = [next(h) for h in hosts]
    assert parts[0]["tokens"].shape[0] == 4
    for key in ("index", "tokens", "loss_mask", "positions"):
      # same bucket on every host, even when one host's pairs are shorter
      np.testing.assert_array_equal(
          np.concatenate([p[key] for p in parts]), g[key])


def test_sort_window_reduces_padding(pairs):
  def waste(it):
    return np.mean([1 - bt["attention_mask"].mean() for bt in it])
  plain = waste(_it(pairs, num_epochs=1, buckets=tuple(range(1, 33))))
  grouped = waste(_it(pairs, num_epochs=1, buckets=tuple(range(1, 33)),
                      sort_window=8))
  assert grouped < plain
  assert batching.default_buckets(100) == (16, 32, 64, 100)


def test_ref_cache_round_trip_and_refusal(built, pairs, tmp_path):
  key = D.CacheKey(reference="ckpt-step-100", tokenizer=TOK.fingerprint,
                   data=D.dataset_fingerprint(built, "train"),
                   encoding=D.EncodeConfig(max_len=32).fingerprint())
  n = len(D.data_source(built, "train"))
  fake = lambda bt: -bt["response_len"].astype(np.float32)  # stands in for the model
  it = _it(pairs, shuffle=False, num_epochs=1, drop_remainder=False)
  logps = ref_cache.compute(it, fake, n)
  np.testing.assert_array_equal(logps[pairs.index], -pairs.resp_len)
  path = ref_cache.cache_path(built.data_dir, "train")
  ref_cache.save(path, key, {"logps": logps})
  assert os.listdir(path.parent) == ["train.npz"]  # no temp file left behind
  got = ref_cache.load(path, key)["logps"]
  np.testing.assert_array_equal(got, logps)
  for field in ("reference", "tokenizer", "data", "encoding"):
    changed = D.CacheKey(**{**key.__dict__, field: "other"})
    with pytest.raises(D.StaleCacheError, match=field):
      ref_cache.load(path, changed)
  batch = next(D.PairIterator(pairs, D.BatchConfig(batch_size=8), pad_id=0,
                              extras={"ref_logps": got}))
  np.testing.assert_array_equal(batch["ref_logps"], -batch["response_len"])


def test_fingerprint_path_sees_content_changes(tmp_path):
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "w.bin").write_bytes(b"1234")
  before = ref_cache.fingerprint_path(tmp_path / "ckpt")
  assert before == ref_cache.fingerprint_path(tmp_path / "ckpt")
  (tmp_path / "ckpt" / "w.bin").write_bytes(b"1235")
  assert ref_cache.fingerprint_path(tmp_path / "ckpt") != before


def test_prompt_batch_for_generation(pairs):
  ids = np.arange(5)
  pb = batching.make_prompt_batch(pairs, ids, pad_id=TOK.pad_id)
  for row in ids:
    real = pb["tokens"][row][pb["attention_mask"][row]]
    np.testing.assert_array_equal(real, pairs.prompt(row))
    assert pb["attention_mask"][row, -1]  # left padded: prompt ends at -1
    np.testing.assert_array_equal(pb["positions"][row][pb["attention_mask"][row]],
                                  np.arange(len(real)))
