"""Figure 6: reference audit: violation rate of Assumption 3.1 vs beta and bias.

Command:  python -m experiments.fig6_audit --out results/
Left:     references built (make_problem) so that a fraction R in
          {0, 0.1, 0.2, 0.3, 0.4} of prompts violates the assumption at
          beta0 = 1; audited with cpo_jax.diagnostics.reference_audit over
          beta in 10^-2 .. 10^2 (K = 2, N = 2048). At beta0 the audit must
          return R exactly; small beta lets the reward gap dominate (fewer
          violations), large beta tends to frac_ref_prefers_rejected.
Right:    a second, unstructured kind of bias: a noisy reference
          log pi_ref = log_softmax(r + sigma * noise), audited against the
          noise level sigma for several beta.
The paper's 45.5% (Llama-3-8B-Instruct on UltraFeedback-ArmoRM, beta = 0.1)
          is a real-model measurement we cannot reproduce here; it is drawn
          as a reference line only.
Writes:   fig6_audit.png, fig6_audit.csv, fig6_audit.json.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from cpo_jax import diagnostics as dg
from cpo_jax import finite as F
from cpo_jax.finite import report

CONFIG = dict(n_prompts=2048, beta0=1.0, bias_fracs=(0.0, 0.1, 0.2, 0.3, 0.4),
              betas=tuple(np.logspace(-2, 2, 33).round(6)),
              sigmas=tuple(np.linspace(0.0, 4.0, 17).round(4)),
              noise_betas=(0.1, 0.3, 1.0, 3.0), seed=5)
QUICK = dict(CONFIG, n_prompts=256)
PAPER_LLAMA3_VIOLATION_AT_BETA_0_1 = 0.455  # quoted from the paper, not measured here


def run(out, *, quick: bool = False, progress: bool = True) -> dict:
  del progress  # everything here is a few vectorised evaluations
  cfg = QUICK if quick else CONFIG
  out = pathlib.Path(out)
  key = jax.random.key(cfg["seed"])
  betas = jnp.asarray(cfg["betas"], jnp.float32)

  def audit(bias_frac):
    pb = F.make_problem(key, n_prompts=cfg["n_prompts"], bias_frac=bias_frac,
                        beta=cfg["beta0"])
    a = dg.reference_audit(F.pair_deltas(pb.ref_logprobs, pb), betas=betas,
                           dr=F.reward_gap(pb))
    return a["frac_violating"], a["frac_ref_prefers_rejected"]

  viol, prefers = jax.jit(jax.vmap(audit))(jnp.asarray(cfg["bias_fracs"], jnp.float32))
  at_beta0 = jnp.argmin(jnp.abs(betas - cfg["beta0"]))

  base = F.make_problem(key, n_prompts=cfg["n_prompts"], bias_frac=0.0, beta=cfg["beta0"])
  noise = jax.random.normal(jax.random.fold_in(key, 1), base.rewards.shape)
  dr = F.reward_gap(base)

  def noisy_audit(sigma):
    ref = jax.nn.log_softmax(base.rewards + sigma * noise, axis=-1)
    a = dg.reference_audit(F.pair_deltas(ref, base),
                           betas=jnp.asarray(cfg["noise_betas"], jnp.float32), dr=dr)
    return a["frac_violating"], a["frac_ref_prefers_rejected"]

  sig = jnp.asarray(cfg["sigmas"], jnp.float32)
  noisy_viol, noisy_prefers = jax.jit(jax.vmap(noisy_audit))(sig)
  summary = {
      "config": cfg,
      "structured": {"bias_fracs": cfg["bias_fracs"], "betas": betas,
                     "frac_violating": viol, "frac_ref_prefers_rejected": prefers,
                     "frac_violating_at_beta0": viol[:, at_beta0],
                     "frac_violating_at_beta_0.1": viol[:, jnp.argmin(jnp.abs(betas - 0.1))]},
      "noisy": {"sigmas": sig, "betas": cfg["noise_betas"], "frac_violating": noisy_viol,
                "frac_ref_prefers_rejected": noisy_prefers},
      "paper_llama3_8b_instruct_violation_beta_0.1_not_measured":
          PAPER_LLAMA3_VIOLATION_AT_BETA_0_1,
  }
  cols = {"beta": np.asarray(betas)}
  for i, r in enumerate(cfg["bias_fracs"]):
    cols[f"frac_violating_R{r:g}"] = np.asarray(viol[i])
  report.save_csv(out / "fig6_audit.csv", cols)
  ncols = {"sigma": np.asarray(sig)}
  for j, b in enumerate(cfg["noise_betas"]):
    ncols[f"frac_violating_beta{b:g}"] = np.asarray(noisy_viol[:, j])
  ncols["frac_ref_prefers_rejected"] = np.asarray(noisy_prefers)
  report.save_csv(out / "fig6_audit_noisy.csv", ncols)
  report.save_json(out / "fig6_audit.json", summary)
  fig = Figure(figsize=(11, 4), layout="constrained")
  ax1, ax2 = fig.subplots(1, 2)
  for i, r in enumerate(cfg["bias_fracs"]):
    ax1.plot(betas, 100 * np.asarray(viol[i]), label=f"R={r:g} at beta0={cfg['beta0']:g}")
  ax1.axhline(100 * PAPER_LLAMA3_VIOLATION_AT_BETA_0_1, color="k", ls=":", lw=1,
              label="paper: Llama-3-8B-Instruct, beta=0.1 (not measured here)")
  ax1.axvline(0.1, color="grey", lw=0.5)
  ax1.set_xscale("log")
  ax1.set_xlabel("beta")
  ax1.set_ylabel("% pairs violating Assumption 3.1")
  ax1.legend(fontsize=7)
  for j, b in enumerate(cfg["noise_betas"]):
    ax2.plot(sig, 100 * np.asarray(noisy_viol[:, j]), label=f"beta={b:g}")
  ax2.plot(sig, 100 * np.asarray(noisy_prefers), "k--", label="ref prefers y_l (beta->inf)")
  ax2.set_xlabel("reference noise sigma (log pi_ref = log_softmax(r + sigma eps))")
  ax2.set_ylabel("% pairs violating Assumption 3.1")
  ax2.legend(fontsize=7)
  report.save_figure(fig, out / "fig6_audit.png")
  return report.to_python(summary)


def main(argv=None):
  report.figure_main(run, __doc__, argv)


if __name__ == "__main__":
  main()
