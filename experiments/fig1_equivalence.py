"""Figure 1: conditional equivalence of DPO and RLHF on a finite response set.

Command:  python -m experiments.fig1_equivalence --out results/
Setting:  N = 512 prompts, K = 2, beta = 1, R = 0.3, tabular policy, 3000
          Adam steps. Methods on the same pairs: the closed-form RLHF optimum
          delta* = delta_ref + dr / beta; DPO with Bradley–Terry population
          labels (weights sigmoid(dr), 1 - sigmoid(dr)); DPO with 64 BT-sampled
          labels per pair; DPO with deterministic labels (always the better
          response: ordered pairs); policy-gradient RLHF with the true reward
          and with a BT reward model fitted on the 64 sampled labels.
Left:     delta after training against delta*. Right: the (delta_ref, dr) plane
          with the Thm. 3.5 boundary delta_ref = -dr / beta, each pair coloured
          by the sign of its final DPO (BT population) delta.
Writes:   fig1_equivalence.png, fig1_equivalence.csv (per pair),
          fig1_equivalence.json (errors, sign agreement).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from cpo_jax import diagnostics as dg
from cpo_jax import finite as F
from cpo_jax.finite import methods as M
from cpo_jax.finite import report

CONFIG = dict(n_prompts=512, beta=1.0, bias_frac=0.3, n_labels=64, steps=3000,
              lr=0.05, seed=1)
RUNS = (("dpo", "bt_population"), ("dpo", "bt_sampled"), ("dpo", "deterministic"),
        ("rlhf_pg", "bt_sampled"), ("rlhf_pg_rm", "bt_sampled"))
CONFIG["runs"] = RUNS
QUICK = dict(CONFIG, n_prompts=64, steps=600,
             runs=(("dpo", "bt_population"), ("dpo", "deterministic")))


def run(out, *, quick: bool = False, progress: bool = True) -> dict:
  cfg = QUICK if quick else CONFIG
  out, beta = pathlib.Path(out), cfg["beta"]
  key = jax.random.key(cfg["seed"])
  problem = F.make_problem(key, n_prompts=cfg["n_prompts"], bias_frac=cfg["bias_frac"],
                           beta=beta)
  delta_ref = F.pair_deltas(problem.ref_logprobs, problem)
  dr = F.reward_gap(problem)
  d_star = dg.delta_star(delta_ref, dr, beta=beta)
  d_closed = F.pair_deltas(F.rlhf_closed_form(problem, beta=beta), problem)
  cols = {"delta_ref": delta_ref, "dr": dr, "delta_star": d_star,
          "violates": dg.violates_assumption(delta_ref, dr, beta=beta).astype(int)}
  summary = {"config": cfg, "closed_form_max_abs_err_vs_delta_star":
             jnp.max(jnp.abs(d_closed - d_star)), "runs": {}}
  for method, labels in report.progress(cfg["runs"], "fig1", progress):
    data = F.make_labels(labels, problem, jax.random.fold_in(key, 7),
                         n_labels=cfg["n_labels"])
    lp, hist = M.run_method(method, problem, data, jax.random.fold_in(key, 3),
                            beta=beta, steps=cfg["steps"], lr=cfg["lr"],
                            log_every=cfg["steps"] // 10)
    delta = F.pair_deltas(lp, problem)
    name = f"{method}/{labels}"
    cols[f"delta_{method}_{labels}"] = delta
    err = jnp.abs(delta - d_star)
    summary["runs"][name] = {
        "max_abs_err_vs_delta_star": jnp.max(err),
        "median_abs_err_vs_delta_star": jnp.median(err),
        "sign_agreement_with_delta_star": jnp.mean(jnp.sign(delta) == jnp.sign(d_star)),
        "frac_in_U": hist["frac_in_U"][-1],
        "frac_delta_negative_on_violating": 1 - dg.absolute_accuracy(
            delta, where=cols["violates"]),
        "train_loss_first_last": jnp.stack([hist["train_loss"][0], hist["train_loss"][-1]]),
    }
    if method == "dpo" and labels == "bt_sampled":  # DPO's exact finite-sample optimum: logit(p_hat) / beta
      p_hat = data.weight[: delta.shape[0]]
      finite = (p_hat > 0) & (p_hat < 1)
      target = delta_ref + jnp.log(p_hat / (1 - p_hat)) / beta
      summary["runs"][name]["max_abs_err_vs_empirical_optimum_where_finite"] = jnp.max(
          jnp.where(finite, jnp.abs(delta - target), 0.0))
      summary["runs"][name]["frac_pairs_one_sided_labels"] = 1 - jnp.mean(finite)
  report.save_csv(out / "fig1_equivalence.csv", cols)
  report.save_json(out / "fig1_equivalence.json", summary)
  _plot(out, cols, beta)
  return report.to_python(summary)


def _plot(out, cols, beta):
  fig = Figure(figsize=(11, 4.4), layout="constrained")
  ax1, ax2 = fig.subplots(1, 2)
  lim = float(np.percentile(np.abs(cols["delta_star"]), 99)) + 1
  for name, marker in (("dpo_bt_population", "o"), ("rlhf_pg_bt_sampled", "x"),
                       ("rlhf_pg_rm_bt_sampled", "+"), ("dpo_deterministic", ".")):
    if f"delta_{name}" not in cols:
      continue
    ax1.scatter(cols["delta_star"], np.clip(cols[f"delta_{name}"], -3 * lim, 3 * lim),
                s=9, marker=marker, alpha=0.6, label=name.replace("_", " "))
  ax1.plot([-lim, lim], [-lim, lim], "k:", lw=1)
  ax1.axhline(0, color="grey", lw=0.5)
  ax1.axvline(0, color="grey", lw=0.5)
  ax1.set_xlabel("closed-form RLHF  delta* = delta_ref + dr/beta")
  ax1.set_ylabel("delta after training (clipped for display)")
  ax1.legend(fontsize=7)
  neg = np.asarray(cols["delta_dpo_bt_population"]) < 0
  dref, dr = np.asarray(cols["delta_ref"]), np.asarray(cols["dr"])
  ax2.scatter(dref[~neg], dr[~neg], s=9, c="tab:green", label="DPO ends with delta > 0")
  ax2.scatter(dref[neg], dr[neg], s=9, c="tab:red", label="DPO ends with delta < 0 (in U)")
  grid = np.linspace(0, dr.max(), 50)
  ax2.plot(-grid / beta, grid, "k--", label="Thm 3.5 boundary delta_ref = -dr/beta")
  ax2.set_xlabel("delta_ref")
  ax2.set_ylabel("dr = r(y_w) - r(y_l)")
  ax2.legend(fontsize=7)
  report.save_figure(fig, out / "fig1_equivalence.png")


def main(argv=None):
  report.figure_main(run, __doc__, argv)


if __name__ == "__main__":
  main()
