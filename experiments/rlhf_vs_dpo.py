"""RLHF vs DPO and CPO from the same biased reference, on the small-LM synthetic task.

Command:  python -m experiments.rlhf_vs_dpo --out results/rlhf_vs_dpo
Setting:  the small-LM experiment's task and reference (experiments/small_lm.py):
          ``reverse`` task, 1024 training prompts, 40% "misaligned" (their SFT
          demonstration is the worse response), a 2-layer d=64 decoder SFT-ed on
          those demonstrations. From that reference, on the same prompts:
          DPO and CPO (`cpo_smooth`, the official code's variant) on the
          Bradley–Terry labelled pairs (cpo_jax/configs/small_lm.py), and
          online RLHF with the synthetic task's ground-truth reward r*(x, y):
          RLOO and PPO (cpo_jax/configs/rl_small_lm.py), and RLOO against a
          Bradley–Terry reward model trained on the same labelled pairs
          ("rloo_rm", cpo_jax/configs/rm_small_lm.py), all at beta = 0.1.
Measured: on the training pairs, for every method with one function
          (`rollout.policy_report`): r* of greedy generations (256 prompts),
          absolute accuracy and fraction in U (all / misaligned pairs), the
          sampled KL(pi || pi_ref) (k1, 64 prompts at temperature 1), and the
          fraction of Assumption-3.1-violating pairs (delta_ref <= -dr/beta)
          on which the policy prefers y_l ("inherits bias"). The closed-form
          RLHF optimum's pair metrics (delta* = delta_ref + dr/beta) are the
          paper's prediction for RLHF.
Writes:   rlhf_vs_dpo.json (config, final reports, reward-model eval, timings), rlhf_vs_dpo_curves.csv,
          rlhf_vs_dpo.png, runs/<stage>/ (checkpoints, metrics.jsonl, TensorBoard).
          Re-running resumes finished stages; pointing --out at a small_lm output
          directory reuses its sft/dpo/cpo_smooth runs.
Runtime:  measured on 2 shared CPU cores: see the README "RLHF vs DPO" section.
"""

from __future__ import annotations

import argparse
import pathlib
import time

from matplotlib.figure import Figure

from cpo_jax import atomic
from cpo_jax import inputs, reward_model, rollout, train, train_rlhf, writers
from cpo_jax import sharding as shd
from cpo_jax.configs import rl_small_lm, rm_small_lm
from cpo_jax.configs import small_lm as small_lm_config
from experiments import small_lm

PREF = ("dpo", "cpo_smooth")
RL = ("rloo", "ppo", "rloo_rm")
STEPS = dict(sft=800, pref=300, rm=300, rl=300, eval_every=50)
QUICK = dict(sft=40, pref=10, rm=10, rl=6, eval_every=5)
CURVE_KEYS = ("gen_reward", "gen_reward/misaligned", "accuracy_absolute",
              "accuracy_absolute/misaligned", "in_U", "in_U/misaligned", "kl_k1", "score")
TABLE = (("r* gen", "gen_reward"), ("r* gen mis.", "gen_reward/misaligned"),
         ("exact", "gen_exact"), ("acc_abs", "accuracy_absolute"),
         ("acc_abs mis.", "accuracy_absolute/misaligned"), ("in_U", "in_U"),
         ("in_U mis.", "in_U/misaligned"), ("KL(pi||ref)", "kl_k1"),
         ("delta<0 on violating", "inherits_bias"))


def rm_config(out: pathlib.Path, data_dir: str, steps: dict):
  c = rm_small_lm.get_config()
  c.data.dir = data_dir
  c.init_from = str(out / "runs" / "sft")
  c.train.update(steps=steps["rm"], eval_every=0, ckpt_every=steps["rm"])
  return c


def rl_config(algo: str, out: pathlib.Path, data_dir: str, steps: dict):
  c = rl_small_lm.get_config(algo)
  c.data.dir = data_dir
  c.init_from = str(out / "runs" / "sft")
  if algo.endswith("_rm"):
    c.rl.reward = f"rm:{out / 'runs' / 'rm'}"
  c.train.update(steps=steps["rl"], eval_every=steps["eval_every"], ckpt_every=steps["rl"])
  return c


def run(out, *, quick: bool = False, pref=PREF, rl=RL, data_dir: str = "/tmp/cpo_jax_data"):
  out = pathlib.Path(out).absolute()
  steps = QUICK if quick else STEPS
  t_start, timings, finals = time.time(), {}, {}
  for stage in ("sft",) + tuple(pref):
    t0 = time.time()
    train.train(small_lm.stage_config(stage, out, data_dir, steps), str(out / "runs" / stage))
    timings[stage] = time.time() - t0
  rm_eval = None
  if any(a.endswith("_rm") for a in rl):
    t0 = time.time()
    rm_eval = reward_model.train_rm(rm_config(out, data_dir, steps), str(out / "runs" / "rm"))
    timings["rm"] = time.time() - t0
  for algo in rl:
    t0 = time.time()
    finals[algo] = train_rlhf.train_rl(rl_config(algo, out, data_dir, steps),
                                       str(out / "runs" / algo))["eval"]
    timings[algo] = time.time() - t0
  # The same report for the reference and the preference-trained policies.
  t0 = time.time()
  cfg = rl_config("rloo", out, data_dir, steps)
  mesh, ins = shd.make_mesh(cfg.mesh), inputs.Inputs(cfg.data)
  _, graphdef, ref = train.model_from_source(cfg.init_from, cfg, mesh)
  report = lambda params: rollout.policy_report(
      cfg, mesh, graphdef, params, ref, ins, beta=cfg.rl.beta, step=steps["rl"],
      kl_prompts=cfg.rl.eval_kl_prompts, kl_max_new_tokens=cfg.rl.max_new_tokens)
  reports = {"reference (SFT)": report(ref)}
  for loss in pref:
    reports[loss] = report(train.model_from_source(str(out / "runs" / loss), cfg, mesh)[2])
  reports.update(finals)
  timings["reports"] = time.time() - t0
  curves = _curves(out, pref, rl, reports["reference (SFT)"])
  result = {"steps": steps, "beta": cfg.rl.beta, "pref_losses": list(pref), "rl": list(rl),
            "rl_config": cfg.rl.to_dict(), "rl_optim": cfg.optim.to_dict(),
            "pref_hparams": {k: small_lm_config.LOSS_OVERRIDES[k] for k in pref},
            "reward_model_eval": rm_eval and rm_eval["eval"],
            "reports": reports, "timings_s": dict(timings, total=time.time() - t_start)}
  out.mkdir(parents=True, exist_ok=True)
  atomic.write_json(out / "rlhf_vs_dpo.json", result, indent=1, default=float)
  atomic.write_csv_rows(out / "rlhf_vs_dpo_curves.csv", curves, ["method", "split", "step", *CURVE_KEYS])
  _figure(curves, reports, tuple(pref) + tuple(rl), out / "rlhf_vs_dpo.png")
  print(table(result))
  return result


def _curves(out, pref, rl, ref_report):
  """Eval records of every run (all records of RL runs), each starting from the reference."""
  rows = []
  for method in tuple(pref) + tuple(rl):
    rows.append(dict(method=method, split="eval", step=0, **{k: ref_report.get(k)
                                                             for k in CURVE_KEYS}))
    for r in writers.read_jsonl(out / "runs" / method / "metrics.jsonl"):
      if r["split"] == "eval" or method in rl:
        rows.append(dict(method=method, split=r["split"], step=r["step"],
                         **{k: r.get(k) for k in CURVE_KEYS}))
  return rows


def _figure(curves, reports, methods, path):
  panels = (("eval", "gen_reward", "r* of greedy generations (all prompts)"),
            ("eval", "accuracy_absolute/misaligned", "absolute accuracy, misaligned pairs"),
            ("eval", "in_U/misaligned", "fraction in U, misaligned pairs"),
            ("train", "score", "RL: mean training reward of samples (r*, or RM score)"))
  fig = Figure(figsize=(16, 8))
  axes = fig.subplots(2, 3).ravel()
  ref = reports["reference (SFT)"]
  color = dict({"reference (SFT)": "k"}, **{m: f"C{i}" for i, m in enumerate(methods)})
  for ax, (split, key, title) in zip(axes, panels):
    for m in methods:
      pts = [(r["step"], r[key]) for r in curves if r["method"] == m and r["split"] == split
             and isinstance(r[key], float)]
      if pts:
        ax.plot(*zip(*pts), label=m, color=color[m], marker="." if split == "eval" else None)
    if key in ref:
      ax.axhline(ref[key], color="k", ls=":", label="reference")
    ax.set(title=title, xlabel="step (DPO/CPO: optimiser step; RL: iteration)")
  axes[0].legend(fontsize=8)
  ax = axes[4]
  for name, rep in reports.items():
    ax.scatter(rep["kl_k1"], rep["gen_reward"], label=name, color=color[name])
    ax.annotate(name, (rep["kl_k1"], rep["gen_reward"]), fontsize=8)
  ax.set(title="final: r* of greedy generations vs KL(pi || pi_ref)", xlabel="KL (k1, nats)",
         ylabel="r*")
  ax = axes[5]
  names = list(reports)
  ax.bar(range(len(names)), [reports[n]["inherits_bias"] for n in names], color="tab:red")
  ax.axhline(1.0, color="k", ls=":", label="closed-form RLHF optimum")
  ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
  ax.set(title="violating pairs on which pi prefers y_l", ylim=(0, 1.05))
  ax.legend(fontsize=8)
  fig.tight_layout()
  atomic.save_figure(fig, path, dpi=100)


def table(result) -> str:
  reps = result["reports"]
  ref = reps["reference (SFT)"]
  lines = ["| method | " + " | ".join(c for c, _ in TABLE) + " |", "|" + "---|" * (len(TABLE) + 1)]
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  for name, rep in reps.items():
    lines.append(f"| {name} | " + " | ".join(fmt(rep.get(k)) for _, k in TABLE) + " |")
  opt = {"accuracy_absolute": ref.get("optimum/accuracy_absolute"),
         "accuracy_absolute/misaligned": ref.get("optimum/accuracy_absolute/misaligned"),
         "in_U": ref.get("optimum/in_U"), "in_U/misaligned": ref.get("optimum/in_U/misaligned"),
         "inherits_bias": 1.0}
  lines.append("| RLHF optimum (closed form, prediction) | " +
               " | ".join(fmt(opt.get(k)) for _, k in TABLE) + " |")
  lines.append(f"\nAssumption 3.1 violated (beta={result['beta']}) on "
               f"{ref['violating']:.3f} of the training pairs; timings (s): "
               + ", ".join(f"{k} {v:.0f}" for k, v in result["timings_s"].items()))
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="results/rlhf_vs_dpo")
  p.add_argument("--data_dir", default="/tmp/cpo_jax_data")
  p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
  p.add_argument("--pref", default=",".join(PREF), help="preference losses (small_lm configs)")
  p.add_argument("--rl", default=",".join(RL),
                 help="RL runs: rloo, ppo (ground-truth r*), rloo_rm, ppo_rm (trained RM)")
  a = p.parse_args()
  run(a.out, quick=a.quick, pref=tuple(filter(None, a.pref.split(","))),
      rl=tuple(filter(None, a.rl.split(","))), data_dir=a.data_dir)


if __name__ == "__main__":
  main()
