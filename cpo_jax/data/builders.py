"""TFDS builders writing array_record files, read back with `tfds.data_source`.

No TensorFlow is needed: `GeneratorBasedBuilder(file_format="array_record")`
serialises examples with TFDS's own protobuf code, and
`tfds.data_source` decodes them with NumPy (checked: `tensorflow` is never
imported). Two TFDS paths that do need extra packages are avoided:
`dataset_info_from_configs` (reads metadata files next to the builder's
code; `DatasetInfo` is built directly instead) and the checksums lookup via
`code_path` (imports `importlib_resources`; overridden, nothing downloads).
TFDS writes into an ``incomplete.*`` directory and renames it when done, so
a prepared dataset appears atomically.

Two builders, both with the flat features of `FEATURES`:

* `SyntheticPreferences`: one config per (task, sizes, seed, bias, labels),
  splits ``train``, ``test`` and ``sft`` (see `synthetic`).
* `LocalPreferences`: one config per set of local files + options; the
  config name hashes the file contents, so editing a file gives a new
  dataset instead of silently reusing the old one. Skipped records (under
  ``on_error="skip"``) are counted in ``info.metadata["skipped"]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from cpo_jax.data import readers, records, synthetic

FEATURES = dict(
    prompt=tfds.features.Text(),
    chosen=tfds.features.Text(),
    rejected=tfds.features.Text(),
    prompt_messages=tfds.features.Text(),  # JSON list of {role, content}
    score_chosen=np.float32,
    score_rejected=np.float32,
    dr=np.float32,
    group=np.int32,
    source=tfds.features.Text(),
)


def _info(builder, description):
  return tfds.core.DatasetInfo(
      builder=builder, description=description,
      features=tfds.features.FeaturesDict(dict(FEATURES)),
      metadata=tfds.core.MetadataDict(), disable_shuffling=True)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared base: no code-path lookup (it needs `importlib_resources`)."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS looks for a checksums file next to the builder's code; these
    # builders download nothing, and the lookup imports an optional package.
    return None


def _short_hash(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(repr(p).encode())
  return h.hexdigest()[:12]


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  task: str = "add"
  n_train: int = 4096
  n_test: int = 512
  seed: int = 0
  ref_bias: float = 0.3
  labels: str = "bt"
  bt_scale: float = 4.0
  p_correct: float = 0.5


class SyntheticPreferences(_Builder):
  """Synthetic preference pairs with a ground-truth reward (`synthetic`)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [SyntheticConfig(name="add_default", task="add"),
                     SyntheticConfig(name="reverse_default", task="reverse")]

  def _info(self):
    return _info(self, "Synthetic LM preference pairs with r*(x, y).")

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    sizes = {"train": c.n_train, "test": c.n_test, "sft": c.n_train}
    return {s: self._generate_examples(s, n) for s, n in sizes.items()}

  def _generate_examples(self, split, n):
    c = self.builder_config
    recs = synthetic.make_records(
        c.task, split, n, seed=c.seed, ref_bias=c.ref_bias, labels=c.labels,
        bt_scale=c.bt_scale, p_correct=c.p_correct)
    for i, rec in enumerate(recs):
      yield i, rec.to_example()


@dataclasses.dataclass(eq=False)
class LocalConfig(tfds.core.BuilderConfig):
  """files: split -> tuple of paths. style: see `readers.STYLES`."""

  files: tuple = ()
  style: str = "auto"
  on_error: str = "raise"


class LocalPreferences(_Builder):
  """Preference pairs from local JSONL/JSON/Parquet files (`readers`)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return _info(self, "Preference pairs read from local files.")

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    report, per_split = records.SkipReport(), {}
    for split, paths in c.files:
      recs = []
      for path in paths:
        recs += records.collect(readers.read_preference_file(path, c.style),
                                c.on_error, report)
      per_split[split] = recs
    self.info.metadata["skipped"] = report.to_dict()
    if report.total:
      logging.warning("LocalPreferences(%s): %s", c.name, report.summary())
    return {s: self._generate_examples(r) for s, r in per_split.items()}

  def _generate_examples(self, recs):
    for i, rec in enumerate(recs):
      yield i, rec.to_example()


def _prepare(builder):
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder


def build_synthetic(data_dir, *, task: str = "add", n_train: int = 4096,
                    n_test: int = 512, seed: int = 0, ref_bias: float = 0.3,
                    labels: str = "bt", bt_scale: float = 4.0,
                    p_correct: float = 0.5) -> SyntheticPreferences:
  """Prepares (or reuses) a synthetic dataset under ``data_dir``."""
  if task not in synthetic.TASKS:
    raise ValueError(f"unknown task {task!r}; have {sorted(synthetic.TASKS)}")
  kw = dict(task=task, n_train=n_train, n_test=n_test, seed=seed,
            ref_bias=ref_bias, labels=labels, bt_scale=bt_scale,
            p_correct=p_correct)
  config = SyntheticConfig(name=f"{task}_{_short_hash(sorted(kw.items()))}",
                           **kw)
  return _prepare(SyntheticPreferences(config=config, data_dir=str(data_dir),
                                       file_format="array_record"))


def _file_digest(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def build_local(data_dir, files, *, style: str = "auto",
                on_error: str = "raise") -> LocalPreferences:
  """Prepares (or reuses) a dataset from local files.

  files: a path, a list of paths (all ``train``) or {split: path(s)}.
  on_error: "raise" (first bad record raises `records.DataError`) or "skip"
    (bad records are counted in ``builder.info.metadata["skipped"]`` and a
    warning is logged).
  """
  records.check_on_error(on_error)
  if isinstance(files, (str, pathlib.Path)):
    files = [files]
  if not isinstance(files, dict):
    files = {"train": files}
  files = tuple(sorted(
      (split, tuple(str(pathlib.Path(p).resolve()) for p in (
          [ps] if isinstance(ps, (str, pathlib.Path)) else ps)))
      for split, ps in files.items()))
  digests = [(s, [(p, _file_digest(p)) for p in ps]) for s, ps in files]
  name = "local_" + _short_hash(digests, style, on_error)
  config = LocalConfig(name=name, files=files, style=style, on_error=on_error)
  return _prepare(LocalPreferences(config=config, data_dir=str(data_dir),
                                   file_format="array_record"))


def data_source(builder, split: str):
  """The TFDS random-access data source of one split (NumPy, no TF).

  Read by name, ``tfds.data_source("<builder>/<config>:<version>")``, which
  also works in a process that never built the dataset.
  """
  name = f"{builder.name}/{builder.builder_config.name}:{builder.version}"
  return tfds.data_source(name, split=split, data_dir=builder.data_dir_root)


def skip_report(builder) -> dict:
  """What `build_local` skipped: {"total", "counts", "examples"}."""
  return dict(builder.info.metadata.get(
      "skipped", {"total": 0, "counts": {}, "examples": []}))


def dataset_fingerprint(builder, split: str) -> str:
  """Names the data: builder, config, version, split and record count."""
  n = builder.info.splits[split].num_examples
  return f"{builder.name}/{builder.builder_config.name}/{builder.version}/{split}/{n}"
