"""Figure 4: Prop. 5.1 (DPO -> margin ranking as beta -> inf) and critique 1.

Command:  python -m experiments.fig4_prop51 --out results/
Left:     (1/beta) L_DPO(delta) from cpo_jax.losses.dpo against the hinge
          max(0, delta_ref - delta) for beta in {0.3, 1, 3, 10, 30}, with
          delta_ref = -2 (a reference that prefers y_l): DPO's target margin is
          delta_ref, a negative number. Measured sup-gap per beta (theory:
          log(2) / beta, attained at delta = delta_ref).
Right:    critique 1 (DESIGN.md section 2): on ordered pairs (deterministic
          labels) the one-sided DPO loss softplus(-beta (delta - delta_ref)) has
          no finite minimiser. Tabular DPO with a constant learning rate on 64
          prompts for 20000 steps: the mean margin keeps growing (Adam rescales
          the vanishing gradient, so about linearly in t, until the float32
          gradient underflows to 0 near beta t ~ 100) while the loss keeps
          falling; with Bradley–Terry population labels the same run converges
          to delta_ref + dr / beta.
Writes:   fig4_prop51.png, fig4_prop51.csv (curves), fig4_prop51.json.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from cpo_jax import diagnostics as dg
from cpo_jax import finite as F
from cpo_jax import losses as L
from cpo_jax.finite import report

CONFIG = dict(betas=(0.3, 1.0, 3.0, 10.0, 30.0), delta_ref=-2.0, n_grid=2001,
              n_prompts=64, beta=1.0, steps=20000, log_every=1000, lr=0.05, seed=3)
QUICK = dict(CONFIG, steps=2000, log_every=200)


def scaled_dpo_curves(betas, delta_ref, grid):
  """[S, G] (1/beta) L_DPO at delta = grid, reference margin delta_ref."""
  zeros = jnp.zeros_like(grid)
  logps = jnp.stack([grid, zeros], axis=-1)
  ref = jnp.stack([jnp.full_like(grid, delta_ref), zeros], axis=-1)
  return jax.vmap(lambda b: L.dpo(logps, ref, beta=b)[0] / b)(jnp.asarray(betas))


def one_sided_loss_table(beta, ts):
  """Loss and d loss / d delta of one ordered pair at delta - delta_ref = t."""
  def loss(t):
    return L.dpo(jnp.stack([t, 0.0])[None], jnp.zeros((1, 2)), beta=beta)[0][0]
  ts = jnp.asarray(ts, jnp.float32)
  return {"t": ts, "loss": jax.vmap(loss)(ts), "grad": jax.vmap(jax.grad(loss))(ts)}


def run(out, *, quick: bool = False, progress: bool = True) -> dict:
  cfg = QUICK if quick else CONFIG
  out = pathlib.Path(out)
  grid = jnp.linspace(-8.0, 6.0, cfg["n_grid"])
  scaled = scaled_dpo_curves(cfg["betas"], cfg["delta_ref"], grid)
  hinge = jnp.maximum(0.0, cfg["delta_ref"] - grid)
  gap = jnp.max(jnp.abs(scaled - hinge[None]), axis=1)
  summary = {"config": cfg, "prop51": {
      "betas": cfg["betas"], "sup_gap_measured": gap,
      "sup_gap_theory_log2_over_beta": np.log(2.0) / np.asarray(cfg["betas"])}}
  summary["critique1_one_sided_loss"] = one_sided_loss_table(
      cfg["beta"], [0.0, 1.0, 10.0, 30.0, 100.0])
  key = jax.random.key(cfg["seed"])
  problem = F.make_problem(key, n_prompts=cfg["n_prompts"], bias_frac=0.3, beta=cfg["beta"])
  d_star = dg.delta_star(F.pair_deltas(problem.ref_logprobs, problem),
                         F.reward_gap(problem), beta=cfg["beta"])
  runs = {}
  for labels in report.progress(("deterministic", "bt_population"), "fig4", progress):
    data = F.make_labels(labels, problem)
    params = F.init_params("tabular", problem)
    objective = lambda p, k, d=data: F.preference_loss(
        "dpo", F.logprobs("tabular", p, problem), problem, d, {"beta": cfg["beta"]})
    report_fn = lambda p, d=data: {
        "mean_delta": jnp.mean(F.pair_deltas(F.logprobs("tabular", p, problem), problem)),
        "max_abs_err_vs_delta_star": jnp.max(jnp.abs(
            F.pair_deltas(F.logprobs("tabular", p, problem), problem) - d_star)),
        "loss": objective(p, None, d)}
    _, hist = jax.jit(lambda p: F.optimize(
        objective, p, key, steps=cfg["steps"], lr=cfg["lr"], log_every=cfg["log_every"],
        schedule="constant", report=report_fn))(params)
    runs[labels] = jax.tree.map(np.asarray, hist)
  summary["critique1_training"] = runs
  report.save_csv(out / "fig4_prop51.csv", {
      "delta": np.tile(np.asarray(grid), len(cfg["betas"])),
      "beta": np.repeat(cfg["betas"], len(grid)),
      "scaled_dpo_loss": np.asarray(scaled).reshape(-1),
      "hinge": np.tile(np.asarray(hinge), len(cfg["betas"]))})
  report.save_json(out / "fig4_prop51.json", summary)
  fig = Figure(figsize=(11, 4), layout="constrained")
  ax1, ax2 = fig.subplots(1, 2)
  for b, curve in zip(cfg["betas"], np.asarray(scaled)):
    ax1.plot(grid, curve, label=f"(1/beta) L_DPO, beta={b:g}")
  ax1.plot(grid, hinge, "k--", lw=2, label="max(0, delta_ref - delta)")
  ax1.axvline(cfg["delta_ref"], color="grey", lw=0.5)
  ax1.axvline(0.0, color="red", lw=0.5)
  ax1.set_xlabel(f"delta (delta_ref = {cfg['delta_ref']:g})")
  ax1.set_ylim(-0.2, 6)
  ax1.legend(fontsize=7)
  for labels, h in runs.items():
    ax2.plot(h["step"][1:], h["mean_delta"][1:], "o-", label=f"mean delta, {labels} labels")
  ax2.axhline(float(jnp.mean(d_star)), color="k", ls=":", label="mean delta* (RLHF)")
  ax2.set_xscale("log")
  ax2.set_xlabel("step (constant lr)")
  ax2.set_ylabel("mean delta over pairs")
  ax2.legend(fontsize=7)
  report.save_figure(fig, out / "fig4_prop51.png")
  return report.to_python(summary)


def main(argv=None):
  report.figure_main(run, __doc__, argv)


if __name__ == "__main__":
  main()
