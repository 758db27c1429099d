"""Preference data: TFDS builders, tokenisation and pair batching.

Pipeline::

    builder = build_synthetic(data_dir, task="add")        # or build_local
    tok = ByteTokenizer()                                  # or HFTokenizer
    it = pair_iterator(builder, "train", tok,
                       EncodeConfig(max_len=32), BatchConfig(batch_size=64))
    batch = next(it); state = it.get_state()               # Orbax-saveable

Datasets are array_record files written by TFDS builders and read back with
`tfds.data_source` (NumPy only; TensorFlow is never imported).

Batch format (host NumPy arrays; B = host-local batch, L = bucket length;
axis 1 is the pair axis: index 0 = chosen y_w, 1 = rejected y_l):

=================  ===============  =========================================
key                shape / dtype    meaning
=================  ===============  =========================================
tokens             [B,2,L] int32    prompt + response, padded with pad_id
loss_mask          [B,2,L] bool     True on response tokens only (incl. EOS /
                                    end-of-turn); the log-prob of tokens[t]
                                    comes from logits at t-1, so use
                                    targets = tokens[..., 1:], mask =
                                    loss_mask[..., 1:]
attention_mask     [B,2,L] bool     True on real (non-pad) tokens
positions          [B,2,L] int32    0.. over real tokens (left or right pad),
                                    0 on pads
prompt_len         [B] int32        prompt tokens (shared by both sequences)
response_len       [B,2] int32      response tokens of chosen / rejected
dr                 [B] float32      r*(x,y_w) - r*(x,y_l); NaN when unknown
scores             [B,2] float32    per-response scores (synthetic: r*;
                                    files: e.g. ArmoRM); NaN when unknown
group              [B] int32        synthetic: 1 = prompt the biased reference
                                    was taught to get wrong; files: 0
index              [B] int64        record number in the split (cache key)
valid              [B] bool         False on padding rows of a last partial
                                    batch (drop_remainder=False)
<extras>           [B,...]          e.g. ref_logps [B,2] from `ref_cache`
=================  ===============  =========================================

L is the smallest bucket (`BatchConfig.buckets`) holding the longest
sequence of the *global* batch, so all hosts agree and a jitted step
compiles once per bucket. Synthetic data's ``sft`` split (same prompts as
``train``) trains the biased reference: use ``tokens[:, 0]`` and
``loss_mask[:, 0]``. `make_prompt_batch` gives left-padded prompts for
sampling; score samples with `ground_truth_reward(task, prompt, text)`.

Bad input is never dropped silently: it raises `DataError` (file, line or
record, field) or, with ``on_error="skip"``, is counted in a `SkipReport`
(`builders.skip_report(builder)`; `EncodedPairs.report`).
"""

from cpo_jax.data.batching import (BatchConfig, PairIterator, default_buckets,
                                   make_prompt_batch)
from cpo_jax.data.builders import (build_local, build_synthetic, data_source,
                                   dataset_fingerprint, skip_report)
from cpo_jax.data.chat_templates import TEMPLATES
from cpo_jax.data.encode import EncodeConfig, EncodedPairs, encode_records
from cpo_jax.data.pipeline import encode_split, pair_iterator
from cpo_jax.data.records import DataError, PreferenceRecord, SkipReport
from cpo_jax.data.ref_cache import CacheKey, StaleCacheError
from cpo_jax.data.synthetic import TASKS, ground_truth_reward, score_batch
from cpo_jax.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = [
    "BatchConfig", "ByteTokenizer", "CacheKey", "DataError", "EncodeConfig",
    "EncodedPairs", "HFTokenizer", "PairIterator", "PreferenceRecord",
    "SkipReport", "StaleCacheError", "TASKS", "TEMPLATES", "build_local",
    "build_synthetic", "data_source", "dataset_fingerprint", "default_buckets",
    "encode_records", "encode_split", "ground_truth_reward", "make_prompt_batch",
    "pair_iterator",
    "score_batch", "skip_report",
]
