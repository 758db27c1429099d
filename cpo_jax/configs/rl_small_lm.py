"""Online RLHF (RLOO / PPO) on the small-LM synthetic task, from the biased SFT reference.

Command:  cpo-jax rl --config=cpo_jax/configs/rl_small_lm.py:rloo --workdir=/tmp/sl/rloo \\
              --config.init_from=/tmp/sl/runs/sft
          (the SFT reference: cpo-jax train --config=cpo_jax/configs/small_lm.py:sft ...)
Hardware: 2 CPU cores; experiments/rlhf_vs_dpo.py runs it with DPO and CPO and
          reports measured times and numbers (README "RLHF vs DPO").
Result:   the policy maximises E[r*] - beta KL(pi || pi_ref) with the synthetic
          task's ground-truth reward; evaluation logs the same axes as the
          preference runs (absolute accuracy, frac in U, r* of greedy generations)
          plus the sampled KL to the reference.

`arg`: "rloo" (REINFORCE leave-one-out, no critic), "ppo" (critic + GAE), or
either with "_rm" ("rloo_rm") to optimise a trained reward model given by
`--config.rl.reward=rm:<rm workdir>` instead of the ground truth.
Fields shared with preference training (seed, model, init_from, mesh, data,
optim, train) mean what `cpo_jax/configs/default.py` says.
"""

from cpo_jax.configs import small_lm

_UNUSED = {"data": ("batch_size", "shuffle", "num_epochs", "sort_window"),
           "optim": ("grad_accum",)}


def get_config(arg: str | None = "rloo"):
  c = small_lm.get_config("sft")
  del c["loss"]
  for group, fields in _UNUSED.items():
    for f in fields:
      del c[group][f]
  arg = arg or "rloo"
  algo = arg.removesuffix("_rm")
  c.data.train_split = "train"  # Prompts are drawn from this split (the responses are ignored).
  c.data.eval_split = "train"   # Pair metrics / U are measured on the training pairs, as in small_lm.
  c.optim.update(lr=3e-4, warmup_steps=10, min_lr_ratio=0.1, clip_norm=1.0)  # lr: higher final RL objective than 1e-4 (README)
  c.train.update(steps=300, log_every=10, eval_every=50, ckpt_every=100, gen_samples=256,
                 gen_max_new_tokens=10, gen_temperature=0.0)

  c.rl = r = c.__class__()
  r.algo = algo                 # "rloo" or "ppo".
  r.reward = "rm:" if arg.endswith("_rm") else "ground_truth"  # "ground_truth" (synthetic r*) or "rm:<reward-model workdir>".
  r.beta = 0.1                  # KL coefficient (same beta as the DPO/CPO runs of small_lm).
  r.kl_estimator = "k1"         # Per-token KL estimator in the reward: k1 | k2 | k3 (only k1 has optimum pi_ref exp(r/beta)/Z).
  r.prompts_per_step = 32       # Prompts per iteration.
  r.samples_per_prompt = 4      # Responses sampled per prompt (RLOO's K >= 2; PPO uses them as more rollouts).
  r.max_new_tokens = 10         # Response length limit (sampling stops a row at eos).
  r.ppo_epochs = 2              # PPO: passes over each rollout batch.
  r.minibatches = 2             # PPO: minibatches per pass (rollout rows must divide by it).
  r.clip_eps = 0.2              # PPO: policy ratio clip.
  r.vf_coef = 0.5               # PPO: value-loss weight.
  r.vf_clip = 0.2               # PPO: value clip around the rollout's values.
  r.gamma = 1.0                 # PPO: discount.
  r.lam = 0.95                  # PPO: GAE lambda.
  r.whiten_advantages = True    # PPO: normalise advantages over the rollout batch.
  r.value_from = ""             # PPO critic init: "" = policy init backbone + zero head, or an `rm` workdir.
  r.eval_kl_prompts = 64        # Evaluation: prompts sampled (temperature 1) to estimate KL(pi || pi_ref).
  return c
