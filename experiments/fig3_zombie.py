"""Figure 3: "zombie alignment": the loss falls, ground truth does not follow.

Command:  python -m experiments.fig3_zombie --out results/
Setting:  N = 512 prompts, K = 4 responses, all 6 pairs per prompt, beta = 1,
          R = 0.4 of prompts with a reference that violates Assumption 3.1,
          tabular policy, 2000 Adam steps. Three label sets on the same pairs:
          Bradley–Terry population weights (the infinite-data limit), one
          BT-sampled label per pair, deterministic (ordered pairs, the better
          response always chosen). Methods: DPO, CPO (Eq. 17),
          cpo_smooth (official code), RLHF by policy gradient (true reward).
Rows:     relative change of the training loss on the biased prompts (RLHF:
          minus its objective);
          relative ("TRL") and absolute accuracy on the violating pairs; true
          expected reward on the biased prompts and overall.
Writes:   fig3_zombie.png, fig3_zombie.csv (curves), fig3_zombie.json.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from matplotlib.figure import Figure

from cpo_jax import finite as F
from cpo_jax.finite import methods as M
from cpo_jax.finite import report

CONFIG = dict(n_prompts=512, n_responses=4, beta=1.0, bias_frac=0.4, steps=2000,
              log_every=50, lr=0.05, seed=2, methods=("dpo", "cpo", "cpo_smooth", "rlhf_pg"),
              labels=("bt_population", "bt_sampled", "deterministic"))
QUICK = dict(CONFIG, n_prompts=64, steps=300, methods=("dpo", "cpo_smooth"),
             labels=("bt_population",))
ROWS = (("train_loss_biased", "(L_t - L_0)/|L_0|, biased prompts"),
        ("accuracy_rel_viol", "relative acc. (violating pairs)"),
        ("accuracy_abs_viol", "absolute acc. (violating pairs)"),
        ("expected_reward_biased", "E_pi[r], biased prompts"),
        ("expected_reward", "E_pi[r], all prompts"))


def run(out, *, quick: bool = False, progress: bool = True) -> dict:
  cfg = QUICK if quick else CONFIG
  out, beta = pathlib.Path(out), cfg["beta"]
  key = jax.random.key(cfg["seed"])
  problem = F.make_problem(key, n_prompts=cfg["n_prompts"], n_responses=cfg["n_responses"],
                           bias_frac=cfg["bias_frac"], beta=beta, pairs="all")
  closed = F.evaluate(F.rlhf_closed_form(problem, beta=beta), problem)
  curves, summary = {}, {"config": cfg, "rlhf_closed_form": closed, "runs": {}}
  jobs = [(lab, m) for lab in cfg["labels"] for m in cfg["methods"]]
  for labels, method in report.progress(jobs, "fig3", progress):
    data = F.make_labels(labels, problem, jax.random.fold_in(key, 5))
    _, hist = M.run_method(method, problem, data, jax.random.fold_in(key, 6), beta=beta,
                           steps=cfg["steps"], lr=cfg["lr"], log_every=cfg["log_every"])
    hist = jax.tree.map(np.asarray, hist)
    curves[(labels, method)] = hist
    summary["runs"][f"{labels}/{method}"] = {
        k: {"start": hist[k][0], "end": hist[k][-1], "min": hist[k].min(), "max": hist[k].max()}
        for k, _ in ROWS + (("frac_in_U", ""), ("accuracy_abs", ""), ("kl", ""),
                            ("objective", ""))}
  cols = {k: [] for k in ("labels", "method", "step") + tuple(k for k, _ in ROWS)}
  for (labels, method), h in curves.items():
    for t in range(len(h["step"])):
      cols["labels"].append(labels)
      cols["method"].append(method)
      cols["step"].append(int(h["step"][t]))
      for k, _ in ROWS:
        cols[k].append(float(h[k][t]))
  report.save_csv(out / "fig3_zombie.csv", cols)
  report.save_json(out / "fig3_zombie.json", summary)
  fig = Figure(figsize=(4.2 * len(cfg["labels"]), 2.6 * len(ROWS)), layout="constrained")
  axes = fig.subplots(len(ROWS), len(cfg["labels"]), squeeze=False, sharex=True)
  for c, labels in enumerate(cfg["labels"]):
    for r, (k, title) in enumerate(ROWS):
      ax = axes[r, c]
      for method in cfg["methods"]:
        h = curves[(labels, method)]
        y = h[k] if r else (h[k] - h[k][0]) / np.abs(h[k][0])
        ax.plot(h["step"], y, "--" if method.startswith("rlhf") else "-", label=method,
                lw=2.5 if method == "dpo" else 1.4)
      if k.startswith("expected_reward"):
        ax.axhline(float(closed[k]), color="k", ls=":", lw=1, label="RLHF closed form")
      ax.set_title(f"{title} — {labels} labels", fontsize=8)
    axes[-1, c].set_xlabel("step")
  axes[0, 0].legend(fontsize=7)
  report.save_figure(fig, out / "fig3_zombie.png")
  return report.to_python(summary)


def main(argv=None):
  report.figure_main(run, __doc__, argv)


if __name__ == "__main__":
  main()
