"""Figure 2 analogue: fraction of pairs in the undesirable space U over training.

Command:  python -m experiments.fig2_frac_in_U --out results/
Setting:  N = 512 prompts, K = 2 responses, beta = 1, a fraction R in
          {0.2, 0.3, 0.4} of prompts violating Assumption 3.1, 3 seeds
          (vmapped), 2000 Adam steps (cosine decay from lr 0.05).
          Row 1: tabular policy, Bradley–Terry population labels (weights
          sigmoid(dr), 1 - sigmoid(dr): the infinite-data limit).
          Row 2: shared-parameter (feature) policy, ONE Bradley–Terry-sampled
          label per pair (like a real preference dataset).
Methods:  every registered CPO variant, DPO, IPO, SimPO (gamma = 0.5 where a
          margin applies), policy-gradient RLHF with the true reward and with
          a BT reward model fitted on the same labels, and the closed-form RLHF
          optimum (dashed).
Paper:    DPO plateaus near 25% of pairs in U, CPO below 5% (on an LM).
Writes:   fig2_frac_in_U.png, fig2_frac_in_U.csv (curves), fig2_frac_in_U.json.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from cpo_jax import finite as F
from cpo_jax.finite import methods as M
from cpo_jax.finite import report

CONFIG = dict(n_prompts=512, n_responses=2, n_features=8, beta=1.0,
              bias_fracs=(0.2, 0.3, 0.4), seeds=3, steps=2000, log_every=50,
              lr=0.05, seed=0, methods=M.METHODS,
              settings=(("tabular", "bt_population"), ("feature", "bt_sampled")))
QUICK = dict(CONFIG, n_prompts=128, seeds=1, steps=300, log_every=50,
             methods=("dpo", "cpo"), settings=(("tabular", "bt_population"),))


def make_problems(cfg, key):
  """Problems and labels stacked over (R, seed): leading axis R * seeds."""
  n_r, n_s = len(cfg["bias_fracs"]), cfg["seeds"]
  rs = jnp.repeat(jnp.asarray(cfg["bias_fracs"], jnp.float32), n_s)
  keys = jax.random.split(key, n_r * n_s)
  make = lambda k, r: F.make_problem(
      k, n_prompts=cfg["n_prompts"], n_responses=cfg["n_responses"],
      n_features=cfg["n_features"], bias_frac=r, beta=cfg["beta"])
  return jax.vmap(make)(keys, rs), keys


def run(out, *, quick: bool = False, progress: bool = True) -> dict:
  cfg = QUICK if quick else CONFIG
  out = pathlib.Path(out)
  n_r, n_s, beta = len(cfg["bias_fracs"]), cfg["seeds"], cfg["beta"]
  problems, keys = make_problems(cfg, jax.random.key(cfg["seed"]))
  closed = jax.vmap(lambda p: F.evaluate(F.rlhf_closed_form(p, beta=beta), p))(problems)
  curves, summary = {}, {"config": {k: v for k, v in cfg.items()}, "final": {}}
  summary["closed_form_frac_in_U"] = np.asarray(closed["frac_in_U"]).reshape(n_r, n_s).mean(1)
  summary["frac_violating"] = np.asarray(closed["frac_violating"]).reshape(n_r, n_s).mean(1)
  jobs = [(s, m) for s in cfg["settings"] for m in cfg["methods"]]
  for (policy, labels), method in report.progress(jobs, "fig2", progress):
    data = jax.vmap(lambda p, k: F.make_labels(labels, p, jax.random.fold_in(k, 1)))(
        problems, keys)
    _, hist = M.run_batched(method, problems, data, keys, beta=beta, policy=policy,
                            steps=cfg["steps"], lr=cfg["lr"], log_every=cfg["log_every"])
    hist = jax.tree.map(lambda a: np.asarray(a).reshape(n_r, n_s, -1), hist)
    curves[(policy, labels, method)] = hist
    summary["final"][f"{policy}/{labels}/{method}"] = {
        k: {"mean": hist[k][:, :, -1].mean(1), "std": hist[k][:, :, -1].std(1)}
        for k in ("frac_in_U", "frac_in_U_viol", "accuracy_abs", "expected_reward")}
  _write(out, cfg, curves, summary)
  return summary


def _write(out, cfg, curves, summary):
  rows = {k: [] for k in ("policy", "labels", "method", "R", "step", "frac_in_U_mean",
                          "frac_in_U_std", "accuracy_abs_mean", "expected_reward_mean")}
  for (policy, labels, method), h in curves.items():
    for i, r in enumerate(cfg["bias_fracs"]):
      for t, step in enumerate(h["step"][i, 0]):
        for key, val in (("policy", policy), ("labels", labels), ("method", method),
                         ("R", r), ("step", int(step)),
                         ("frac_in_U_mean", h["frac_in_U"][i, :, t].mean()),
                         ("frac_in_U_std", h["frac_in_U"][i, :, t].std()),
                         ("accuracy_abs_mean", h["accuracy_abs"][i, :, t].mean()),
                         ("expected_reward_mean", h["expected_reward"][i, :, t].mean())):
          rows[key].append(val)
  report.save_csv(out / "fig2_frac_in_U.csv", rows)
  report.save_json(out / "fig2_frac_in_U.json", summary)
  fig = Figure(figsize=(4.2 * len(cfg["bias_fracs"]), 3.4 * len(cfg["settings"])),
               layout="constrained")
  axes = fig.subplots(len(cfg["settings"]), len(cfg["bias_fracs"]), squeeze=False)
  for row, (policy, labels) in enumerate(cfg["settings"]):
    for col, r in enumerate(cfg["bias_fracs"]):
      ax = axes[row, col]
      for method in cfg["methods"]:
        h = curves[(policy, labels, method)]
        style = "--" if method.startswith("rlhf") else "-"
        ax.plot(h["step"][col, 0], 100 * h["frac_in_U"][col].mean(0), style,
                label=method, lw=1.4)
      ax.axhline(100 * summary["closed_form_frac_in_U"][col], color="k", ls=":",
                 label="RLHF closed form")
      ax.set_title(f"{policy} policy, {labels} labels, R={r}", fontsize=9)
      ax.set_xlabel("step")
      ax.set_ylabel("% canonical pairs in U")
  axes[0, -1].legend(fontsize=7, ncol=2)
  report.save_figure(fig, out / "fig2_frac_in_U.png")


def main(argv=None):
  report.figure_main(run, __doc__, argv)


if __name__ == "__main__":
  main()
