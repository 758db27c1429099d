"""Defaults for every training run; each field is commented once, here.

Command:  cpo-jax train --config=cpo_jax/configs/default.py --workdir=/tmp/cpo_default
Hardware: CPU, a few seconds.
Result:   20 DPO steps of a randomly initialised 2-layer byte model on the
          synthetic ``add`` task (a smoke test: the reference is the random
          init, so nothing interesting is learnt).
"""

import ml_collections

from cpo_jax.models import configs as model_configs
from cpo_jax.sharding import mesh_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is unused here; derived configs use it to pick a loss."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0                      # Seed of the policy init (without init_from) and eval sampling.
  c.model = model_configs.tiny()  # Model shapes/dtypes (cpo_jax.models.configs); mixed precision = param_dtype float32 + dtype bfloat16.
  c.init_from = ""                # Policy init: "" random (seed), "hf:<dir>" HF safetensors, or "<workdir>" of an earlier run (its latest params).
  c.reference_from = ""           # Frozen reference: "" = same source as init_from (the usual DPO setting).
  c.multihost = False             # Call jax.distributed.initialize() (also done when JAX_COORDINATOR_ADDRESS is set).
  c.mesh = mesh_config(data=-1, fsdp=1, tensor=1)  # Device mesh sizes; one axis may be -1 (all remaining devices).

  c.data = d = ml_collections.ConfigDict()
  d.source = "synthetic"          # "synthetic" (cpo_jax.data.build_synthetic) or "local" (build_local of files).
  d.dir = "/tmp/cpo_jax_data"     # TFDS data_dir where datasets are prepared (reused when present).
  d.task = "add"                  # Synthetic task: "add" or "reverse".
  d.n_train = 1024                # Synthetic train pairs (the sft split has the same prompts).
  d.n_test = 256                  # Synthetic held-out pairs.
  d.data_seed = 0                 # Seed of the synthetic dataset.
  d.ref_bias = 0.3                # Synthetic: fraction of prompts whose SFT demo is the worse response.
  d.labels = "bt"                 # Synthetic labels: "bt" (Bradley-Terry sampled) or "deterministic".
  d.bt_scale = 4.0                # Synthetic: Bradley-Terry temperature on r*.
  d.p_correct = 0.5               # Synthetic: probability the better response is the exact answer.
  d.files = ml_collections.ConfigDict(dict(train="", test=""))  # Local: split -> file (JSONL/JSON/Parquet); "" = no such split.
  d.style = "auto"                # Local: record style (cpo_jax.data.readers.STYLES).
  d.tokenizer = "byte"            # "byte" (ByteTokenizer) or a tokenizer.json path / model dir (HFTokenizer).
  d.pad_token = ""                # HF tokenizer: pad token string ("" = eos).
  d.bos_token = ""                # HF tokenizer: bos token string ("" = none).
  d.eos_token = ""                # HF tokenizer: eos token string ("" = none).
  d.template = "raw"              # Chat template (cpo_jax.data.TEMPLATES).
  d.max_len = 40                  # Max prompt + response tokens per sequence.
  d.max_prompt_len = 0            # Prompt truncation length (0 = max_len - 1).
  d.train_split = "train"         # Split trained on ("sft" for the SFT stage of synthetic data).
  d.eval_split = "test"           # Held-out split for evaluation ("" = none).
  d.batch_size = 32               # Global pairs per optimiser step (all hosts, all micro-batches).
  d.shuffle = True                # Shuffle pairs every epoch.
  d.num_epochs = 0                # Epochs (0 = unlimited; train.steps decides).
  d.sort_window = 0               # Group by length within windows of this many batches (0 = off).

  c.loss = l = ml_collections.ConfigDict()
  l.name = "dpo"                  # A cpo_jax.losses name (dpo, ipo, hinge, simpo, cpo, cpo_smooth, cpo_easy, cpo_clip) or "sft" (NLL of the chosen response).
  l.logp_reduction = ""           # "sum" | "mean" sequence log-probs; "" = the loss's registry default.
  l.beta = 0.1                    # KL coefficient / reward scale (all preference losses).
  l.gamma = 0.5                   # simpo / cpo / cpo_smooth / cpo_easy margin parameter.
  l.tau = 2.0                     # cpo_smooth softplus sharpness.
  l.alpha = 1.0                   # cpo_smooth margin divisor.
  l.label_smoothing = 0.0         # dpo label smoothing eps.
  l.smoothing = "cdpo"            # dpo smoothing kind: "cdpo" or "robust".

  c.optim = o = ml_collections.ConfigDict()
  o.lr = 1e-3                     # Peak learning rate.
  o.warmup_steps = 2              # Linear warm-up from 0 to lr.
  o.min_lr_ratio = 0.1            # Cosine decays to lr * min_lr_ratio at train.steps.
  o.weight_decay = 0.0            # AdamW decoupled weight decay.
  o.b1 = 0.9                      # Adam beta1.
  o.b2 = 0.999                    # Adam beta2.
  o.eps = 1e-8                    # Adam epsilon.
  o.clip_norm = 1.0               # Global gradient-norm clipping (0 = off).
  o.grad_accum = 1                # Micro-batches per step; batch_size must divide by it. Equals the large-batch step.

  c.train = t = ml_collections.ConfigDict()
  t.steps = 20                    # Optimiser steps in total (a resumed run continues to this).
  t.log_every = 1                 # Write metrics every this many steps.
  t.eval_every = 0                # Evaluate on the held-out split every this many steps (0 = only at the end).
  t.eval_batch_size = 64          # Pairs per evaluation batch.
  t.ckpt_every = 10               # Save a checkpoint every this many steps (and at the end / on SIGTERM).
  t.max_to_keep = 2               # Checkpoints kept.
  t.kernel_impl = "auto"          # Log-prob kernel implementation (cpo_jax.kernels.IMPLS).
  t.progress = True               # tqdm progress bar with loss and throughput.
  t.tensorboard = True            # Write TensorBoard event files under <workdir>/tb.
  t.gen_samples = 0               # Evaluation: prompts sampled for ground-truth quality (synthetic only; 0 = off).
  t.gen_max_new_tokens = 8        # Evaluation: tokens sampled per prompt.
  t.gen_temperature = 1.0         # Evaluation: sampling temperature (0 = greedy).
  return c
