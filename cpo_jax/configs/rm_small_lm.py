"""Bradley–Terry reward model on the small-LM synthetic pairs.

Command:  cpo-jax rm --config=cpo_jax/configs/rm_small_lm.py --workdir=/tmp/sl/rm \\
              --config.init_from=/tmp/sl/runs/sft
Hardware: 2 CPU cores, about a minute.
Result:   held-out `accuracy` (agreement with the Bradley–Terry labels, which
          are noisy by construction) and `accuracy_gt` (agreement with the sign
          of the true reward gap); see the README for measured values.

The model is the small_lm decoder with a scalar head
(`cpo_jax.reward_model.ScalarHeadModel`); `init_from` gives its backbone
("" = random init). Fields shared with preference training mean what
`cpo_jax/configs/default.py` says.
"""

from cpo_jax.configs import small_lm


def get_config(arg: str | None = None):
  del arg
  c = small_lm.get_config("sft")
  del c["loss"]
  del c.optim["grad_accum"]
  for f in ("gen_samples", "gen_max_new_tokens", "gen_temperature"):
    del c.train[f]
  c.data.update(train_split="train", eval_split="test", batch_size=32)
  c.optim.update(lr=1e-3, warmup_steps=20)
  c.train.update(steps=300, log_every=10, eval_every=100, ckpt_every=100)

  c.rm = r = c.__class__()
  r.margin = 0.0                # Constant margin m in softplus(m - (r_w - r_l)).
  r.margin_dr_scale = 0.0       # Adds scale * dr (known true reward gap, synthetic data) to the margin.
  return c
