"""Figure 5: CPO's gamma threshold, and critique 2 (unbounded exact objective).

Command:  python -m experiments.fig5_gamma --out results/
Setting:  N = 512 prompts, K = 2, beta = 1, R = 0.3, tabular policy,
          Bradley–Terry population labels (so every loss has a finite
          minimiser), 2000 Adam steps, gamma swept over 10^-3 .. 10^1 (vmapped)
          for cpo (Eq. 17), cpo_smooth and cpo_easy (official code).
Measured: fraction of violating pairs (delta_ref <= -dr/beta) that end with
          delta > 0, and fraction of all pairs in U, against gamma.
Predicted (dashed), per pair from the library losses themselves: the
          population loss is convex in delta, so training ends with delta > 0
          iff its derivative at delta = 0 is negative (computed with jax.grad
          of the registered loss on both orderings, weights sigmoid(+-dr)).
          Dotted: the "fixed-margin" reading of Eq. 17 (target
          delta_ref + Omega / beta > 0), which ignores the flipped labels.
Critique 2 (DESIGN.md section 2): J_gamma(pi) = E_pi[r] - beta KL(pi||pi_ref)
          + gamma E[delta] has no maximiser for gamma > 0 in a finite response
          space: evaluated at pi(y_l) = eps -> 0 it grows like gamma log(1/eps),
          and Adam on it (64 prompts, 5000 steps) drives delta up without bound,
          while gamma = 0 converges to the RLHF optimum.
Writes:   fig5_gamma.png, fig5_gamma.csv, fig5_gamma.json.
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
from cpo_jax.finite import methods as M
from cpo_jax.finite import report

CONFIG = dict(n_prompts=512, beta=1.0, bias_frac=0.3, steps=2000, lr=0.05, seed=4,
              gammas=tuple(np.logspace(-3, 1, 21).round(6)),
              methods=("cpo", "cpo_smooth", "cpo_easy"),
              critique_prompts=64, critique_steps=5000, critique_gamma=0.5)
QUICK = dict(CONFIG, n_prompts=64, steps=300, gammas=(0.001, 0.03, 1.0, 10.0),
             methods=("cpo",), critique_steps=500)


def predicted_positive(method, problem, beta, gamma):
  """[P] 1 where the BT-population loss has negative slope at delta = 0."""
  ref = F.pair_values(problem.ref_logprobs, problem)            # [P, 2] (better, worse)
  p = jax.nn.sigmoid(F.reward_gap(problem))
  hp = M.default_hparams(method, beta, gamma)

  def pop_loss(delta):                                           # delta [P]
    logps = jnp.stack([delta, jnp.zeros_like(delta)], axis=-1)
    fwd = L.get_loss(method).fn(logps, ref, **hp)[0]
    bwd = L.get_loss(method).fn(logps[:, ::-1], ref[:, ::-1], **hp)[0]
    return jnp.sum(p * fwd + (1 - p) * bwd)

  zeros = jnp.zeros_like(p)
  return (jax.grad(pop_loss)(zeros) < 0).astype(jnp.float32)


def critique_unbounded(cfg, key):
  """Numbers showing J_gamma = E r - beta KL + gamma E[delta] is unbounded."""
  beta, gamma = cfg["beta"], cfg["critique_gamma"]
  eps = jnp.asarray([1e-1, 1e-2, 1e-4, 1e-8, 1e-16, 1e-32], jnp.float32)
  log_eps = jnp.log(eps)
  lp = jnp.stack([jnp.log1p(-eps), log_eps], axis=-1)            # [E, 2] (y_w, y_l)
  ref = jnp.log(jnp.full_like(lp, 0.5))
  r = jnp.broadcast_to(jnp.asarray([1.0, 0.0]), lp.shape)
  j = dg.kl_regularized_objective(lp, ref, r, beta=beta) + gamma * (lp[:, 0] - lp[:, 1])
  out = {"eps": eps, "J_gamma_at_pi_yl_eq_eps": j, "gamma": gamma, "beta": beta}
  problem = F.make_problem(key, n_prompts=cfg["critique_prompts"], bias_frac=0.3, beta=beta)
  runs = {}
  for g in (0.0, gamma):
    def objective(params, k, g=g):
      lp = F.logprobs("tabular", params, problem)
      return -(jnp.mean(dg.kl_regularized_objective(
          lp, problem.ref_logprobs, problem.rewards, beta=beta))
               + g * jnp.mean(F.pair_deltas(lp, problem)))
    rep = lambda params, objective=objective: {
        "mean_delta": jnp.mean(F.pair_deltas(F.logprobs("tabular", params, problem), problem)),
        "J": -objective(params, None)}
    _, hist = jax.jit(lambda p: F.optimize(
        objective, p, key, steps=cfg["critique_steps"], lr=cfg["lr"],
        log_every=cfg["critique_steps"] // 10, schedule="constant", report=rep))(
            F.init_params("tabular", problem))
    runs[f"gamma={g:g}"] = hist
  out["adam_runs"] = runs
  out["mean_delta_star_rlhf"] = jnp.mean(F.pair_deltas(
      F.rlhf_closed_form(problem, beta=beta), problem))
  return out


def run(out, *, quick: bool = False, progress: bool = True) -> dict:
  cfg = QUICK if quick else CONFIG
  out, beta = pathlib.Path(out), cfg["beta"]
  key = jax.random.key(cfg["seed"])
  problem = F.make_problem(key, n_prompts=cfg["n_prompts"], bias_frac=cfg["bias_frac"],
                           beta=beta)
  data = F.bt_population_labels(problem)
  gammas = jnp.asarray(cfg["gammas"], jnp.float32)
  delta_ref = F.pair_deltas(problem.ref_logprobs, problem)
  viol = dg.violates_assumption(delta_ref, F.reward_gap(problem), beta=beta)
  viol = viol.astype(jnp.float32)
  ref = F.pair_values(problem.ref_logprobs, problem)
  omega_per_gamma = 1.0 / jnp.exp(ref[:, 0]) + 1.0 / jnp.exp(ref[:, 1])
  fixed_margin_gamma_min = -beta * delta_ref / omega_per_gamma     # Eq. 17, delta_ref+Omega/beta>0
  cols = {"gamma": np.asarray(gammas)}
  summary = {"config": cfg, "frac_violating": jnp.mean(viol), "methods": {}}
  for method in report.progress(cfg["methods"], "fig5", progress):
    run_one = lambda g: M.run_method(method, problem, data, key, beta=beta, gamma=g,
                                     steps=cfg["steps"], lr=cfg["lr"],
                                     log_every=cfg["steps"])
    lp, hist = jax.vmap(run_one)(gammas)
    delta = jax.vmap(lambda l: F.pair_deltas(l, problem))(lp)     # [G, P]
    measured = jnp.sum((delta > 0) * viol[None], 1) / jnp.sum(viol)
    pred = jax.jit(jax.vmap(lambda g: predicted_positive(method, problem, beta, g)))(gammas)
    predicted = jnp.sum(pred * viol[None], 1) / jnp.sum(viol)
    cols[f"{method}_viol_fixed_measured"] = measured
    cols[f"{method}_viol_fixed_predicted"] = predicted
    cols[f"{method}_frac_in_U"] = hist["frac_in_U"][:, -1]
    summary["methods"][method] = {
        "viol_fixed_measured": measured, "viol_fixed_predicted": predicted,
        "frac_in_U": hist["frac_in_U"][:, -1],
        "max_abs_measured_minus_predicted": jnp.max(jnp.abs(measured - predicted)),
        "smallest_gamma_all_viol_fixed": _first(gammas, measured >= 1.0),
        "smallest_gamma_frac_in_U_below_5pct": _first(gammas, hist["frac_in_U"][:, -1] < 0.05)}
  cols["cpo_viol_fixed_fixed_margin_reading"] = jax.vmap(
      lambda g: jnp.sum((g > fixed_margin_gamma_min) * viol) / jnp.sum(viol))(gammas)
  summary["critique2_unbounded_cpo_objective"] = critique_unbounded(cfg, key)
  report.save_csv(out / "fig5_gamma.csv", cols)
  report.save_json(out / "fig5_gamma.json", summary)
  _plot(out, cfg, cols, summary)
  return report.to_python(summary)


def _first(gammas, mask):
  """Smallest gamma where mask holds (NaN if never)."""
  return jnp.where(jnp.any(mask), gammas[jnp.argmax(mask)], jnp.nan)


def _plot(out, cfg, cols, summary):
  fig = Figure(figsize=(15, 4), layout="constrained")
  ax1, ax2, ax3 = fig.subplots(1, 3)
  for i, method in enumerate(cfg["methods"]):
    c = f"C{i}"
    ax1.plot(cols["gamma"], 100 * np.asarray(cols[f"{method}_viol_fixed_measured"]), "o-",
             color=c, label=f"{method} measured")
    ax1.plot(cols["gamma"], 100 * np.asarray(cols[f"{method}_viol_fixed_predicted"]), "--",
             color=c, label=f"{method} predicted (slope at delta=0)")
    ax2.plot(cols["gamma"], 100 * np.asarray(cols[f"{method}_frac_in_U"]), "o-", color=c,
             label=method)
  ax1.plot(cols["gamma"], 100 * np.asarray(cols["cpo_viol_fixed_fixed_margin_reading"]), "k:",
           label="cpo fixed-margin reading")
  ax1.set_xscale("log")
  ax1.set_xlabel("gamma")
  ax1.set_ylabel("% violating pairs ending with delta > 0")
  ax1.legend(fontsize=7)
  ax2.set_xscale("log")
  ax2.set_xlabel("gamma")
  ax2.set_ylabel("% pairs in U at the end")
  ax2.axhline(5, color="grey", ls=":", lw=1)
  ax2.legend(fontsize=7)
  crit = summary["critique2_unbounded_cpo_objective"]
  for name, h in crit["adam_runs"].items():
    ax3.plot(np.asarray(h["step"]), np.asarray(h["mean_delta"]), "o-", label=name)
  ax3.axhline(float(crit["mean_delta_star_rlhf"]), color="k", ls=":", label="RLHF optimum")
  ax3.set_xlabel("Adam step on E r - beta KL + gamma E[delta]")
  ax3.set_ylabel("mean delta")
  ax3.set_title("critique 2: unbounded for gamma > 0", fontsize=9)
  ax3.legend(fontsize=7)
  report.save_figure(fig, out / "fig5_gamma.png")


def main(argv=None):
  report.figure_main(run, __doc__, argv)


if __name__ == "__main__":
  main()
