"""The small-LM experiment (DESIGN.md section 5): a biased SFT reference, then DPO / CPO / SimPO.

Command:  python -m experiments.small_lm --out results/small_lm   (runs every stage)
  or one stage: cpo-jax train --config=cpo_jax/configs/small_lm.py:sft --workdir=/tmp/sl/sft
                cpo-jax train --config=cpo_jax/configs/small_lm.py:dpo --workdir=/tmp/sl/dpo \\
                    --config.init_from=/tmp/sl/sft
Hardware: 2 CPU cores; the whole experiment takes minutes (see experiments/small_lm.py).
Result:   (measured, README "Small-LM experiment") the SFT reference prefers the
          rejected response on 80% of the "misaligned" pairs; every method's loss
          falls while the ground-truth reward of greedy generations falls too
          (DPO: -0.23 -> -0.53). DPO passes through U (29% of misaligned pairs at
          step 50) and leaves it by step 300; CPO variants lower the early peak
          (17-22%) and end at the same ~1%.

`arg` picks the stage: "sft" (NLL on the biased demonstrations of the sft
split) or a loss name ("dpo", "cpo", "cpo_smooth", "cpo_easy", "cpo_clip",
"simpo", "ipo", "hinge"). "cpo*" is Constrained PO (2605.20834).
"""

from cpo_jax.configs import default

# Per-loss hyper-parameters: the official code's defaults where it has them
# (cpo_smooth gamma 0.5 / tau 2 / alpha 1), SimPO's paper values scaled to
# byte-level length-averaged log-probs.
LOSS_OVERRIDES = {
    "dpo": dict(beta=0.1),
    "ipo": dict(beta=0.1),
    "hinge": dict(beta=0.1),
    "cpo": dict(beta=0.1, gamma=0.5),
    "cpo_smooth": dict(beta=0.1, gamma=0.5, tau=2.0, alpha=1.0),
    "cpo_easy": dict(beta=0.1, gamma=0.05),
    "cpo_clip": dict(beta=0.1),
    "simpo": dict(beta=2.0, gamma=0.5),
}


def get_config(arg: str | None = "dpo"):
  c = default.get_config()
  stage = arg or "dpo"
  c.model.update(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=192,
                 vocab_size=259, max_len=32)
  c.data.update(source="synthetic", task="reverse", n_train=1024, n_test=256, ref_bias=0.4,
                labels="bt", bt_scale=4.0, p_correct=0.5, max_len=32, batch_size=32)
  c.train.update(log_every=10, eval_every=100, ckpt_every=200, eval_batch_size=128,
                 gen_samples=256, gen_max_new_tokens=10, gen_temperature=0.0, progress=False)
  c.optim.update(warmup_steps=20, min_lr_ratio=0.1, clip_norm=1.0)
  c.loss.name = stage
  if stage == "sft":
    c.data.train_split = "sft"
    c.train.steps = 1500
    c.optim.lr = 3e-3
  else:
    c.train.steps = 400
    c.optim.lr = 1e-3
    c.loss.update(LOSS_OVERRIDES.get(stage, {}))
  return c
