"""Throughput of the preference-data pipeline, in pairs per second.

  python -m experiments.bench_data                        # synthetic "add"
  python -m experiments.bench_data --task reverse --n 50000 --batch-size 128
  python -m experiments.bench_data --tokenizer path/to/tokenizer.json \
      --template llama3

Prints three numbers: preparing the array_record dataset (TFDS builder),
reading + tokenising every pair once (`encode_split`), and the batch
iterator (shuffle, gather, bucket padding, masks) run for --epochs epochs.
The iterator figure is what a training loop sees per step; on the 2-core
dev machine it is far above what a small LM trains at. Nothing is
downloaded; the dataset is written to a fresh temporary directory.
"""

import argparse
import shutil
import tempfile
import time

import tensorflow_datasets as tfds

from cpo_jax import data as D


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--task", default="add", choices=sorted(D.TASKS))
  p.add_argument("--n", type=int, default=20000, help="train pairs")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--max-len", type=int, default=32)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--sort-window", type=int, default=0)
  p.add_argument("--tokenizer", default=None, help="local tokenizer.json")
  p.add_argument("--template", default="raw", choices=D.TEMPLATES)
  args = p.parse_args(argv)
  tfds.disable_progress_bar()

  data_dir = tempfile.mkdtemp(prefix="bench_data_")
  tok = D.HFTokenizer(args.tokenizer) if args.tokenizer else D.ByteTokenizer()

  try:
    t0 = time.perf_counter()
    builder = D.build_synthetic(data_dir, task=args.task, n_train=args.n,
                                n_test=16)
    t1 = time.perf_counter()
    pairs = D.encode_split(builder, "train", tok, D.EncodeConfig(
        template=args.template, max_len=args.max_len))
    t2 = time.perf_counter()
    it = D.PairIterator(pairs, D.BatchConfig(
        batch_size=args.batch_size, num_epochs=args.epochs,
        sort_window=args.sort_window), pad_id=tok.pad_id)
    n_pairs = sum(len(b["index"]) for b in it)
    t3 = time.perf_counter()
  finally:
    shutil.rmtree(data_dir, ignore_errors=True)

  print(f"data: synthetic/{args.task}, {len(pairs)} pairs, tokenizer "
        f"{tok.fingerprint}, template {args.template}, max_len {args.max_len}")
  print(f"prepare (TFDS -> array_record): {args.n / (t1 - t0):10.0f} pairs/s "
        f"({t1 - t0:.2f} s for train+sft+test, done once)")
  print(f"read + tokenise (data_source):  {len(pairs) / (t2 - t1):10.0f} pairs/s "
        f"({t2 - t1:.2f} s, once per run)")
  print(f"batch iterator, B={args.batch_size}:        {n_pairs / (t3 - t2):10.0f} "
        f"pairs/s ({n_pairs} pairs in {t3 - t2:.2f} s)")


if __name__ == "__main__":
  main()
