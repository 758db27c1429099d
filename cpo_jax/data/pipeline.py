"""One-call pipeline: prepared TFDS split -> encoded pairs -> batch iterator."""

from __future__ import annotations

import logging

from cpo_jax.data import batching, builders, encode


def encode_split(builder, split: str, tokenizer,
                 cfg: encode.EncodeConfig) -> encode.EncodedPairs:
  """Reads one split through `tfds` (array_record, no TF) and tokenises it.

  Pairs refused by the length rules raise, or with ``cfg.on_error="skip"``
  are counted in ``result.report`` (and logged).
  """
  pairs = encode.encode_source(builders.data_source(builder, split),
                               tokenizer, cfg)
  if pairs.report.total:
    logging.warning("%s/%s: %s", builder.builder_config.name, split,
                    pairs.report.summary())
  return pairs


def pair_iterator(builder, split: str, tokenizer, encode_cfg: encode.EncodeConfig,
                  batch_cfg: batching.BatchConfig, *,
                  extras=None) -> batching.PairIterator:
  """`encode_split` then a `batching.PairIterator` over the result."""
  pairs = encode_split(builder, split, tokenizer, encode_cfg)
  return batching.PairIterator(pairs, batch_cfg, pad_id=tokenizer.pad_id,
                               extras=extras)
