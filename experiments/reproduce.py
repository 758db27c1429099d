"""Regenerates the six finite-response figures of DESIGN.md section 5 (items 1-6).

Command:  python -m experiments.reproduce --out results/
          (``--quick`` runs a small smoke setting; ``--only fig2,fig5`` a subset)
Each figure script writes a PNG and the CSV/JSON of its numbers into --out;
this command adds ``summary.json``: the key numbers of every figure (all
measured in this run) and the wall-clock time of each script.
No downloads; fixed seeds; CPU is enough (JAX_PLATFORMS=cpu is the default).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cpo_jax.finite import report  # noqa: E402
from experiments import (  # noqa: E402
    fig1_equivalence, fig2_frac_in_U, fig3_zombie, fig4_prop51, fig5_gamma, fig6_audit)

FIGURES = {
    "fig1": fig1_equivalence, "fig2": fig2_frac_in_U, "fig3": fig3_zombie,
    "fig4": fig4_prop51, "fig5": fig5_gamma, "fig6": fig6_audit,
}


def key_numbers(name: str, s: dict) -> dict:
  """The few numbers the README quotes, picked from a figure's summary."""
  if name == "fig1":
    return {k: {m: v[m] for m in ("max_abs_err_vs_delta_star", "frac_in_U",
                                  "sign_agreement_with_delta_star")}
            for k, v in s["runs"].items()}
  if name == "fig2":
    out = {"R_values": s["config"]["bias_fracs"], "frac_violating": s["frac_violating"],
           "closed_form_frac_in_U": s["closed_form_frac_in_U"]}
    out.update({k: v["frac_in_U"]["mean"] for k, v in s["final"].items()})
    return out
  if name == "fig3":
    return {k: {m: [v[m]["start"], v[m]["end"]] for m in (
        "train_loss_biased", "accuracy_rel_viol", "accuracy_abs_viol",
        "expected_reward_biased", "expected_reward")} for k, v in s["runs"].items()}
  if name == "fig4":
    c = s["critique1_training"]
    return {"sup_gap_measured": s["prop51"]["sup_gap_measured"],
            "sup_gap_theory": s["prop51"]["sup_gap_theory_log2_over_beta"],
            "critique1_mean_delta_deterministic": c["deterministic"]["mean_delta"][::5],
            "critique1_mean_delta_bt_population": c["bt_population"]["mean_delta"][::5],
            "critique1_steps": c["deterministic"]["step"][::5]}
  if name == "fig5":
    c = s["critique2_unbounded_cpo_objective"]
    out = {m: {"smallest_gamma_all_viol_fixed": v["smallest_gamma_all_viol_fixed"],
               "smallest_gamma_frac_in_U_below_5pct": v["smallest_gamma_frac_in_U_below_5pct"],
               "max_abs_measured_minus_predicted": v["max_abs_measured_minus_predicted"]}
           for m, v in s["methods"].items()}
    out["critique2_J_at_eps"] = dict(zip(map(str, c["eps"]), c["J_gamma_at_pi_yl_eq_eps"]))
    out["critique2_mean_delta_end"] = {k: v["mean_delta"][-1] for k, v in c["adam_runs"].items()}
    return out
  if name == "fig6":
    st = s["structured"]
    return {"bias_fracs": st["bias_fracs"], "frac_violating_at_beta0": st["frac_violating_at_beta0"],
            "frac_violating_at_beta_0.1": st["frac_violating_at_beta_0.1"],
            "paper_llama3_at_beta_0.1_not_measured":
                s["paper_llama3_8b_instruct_violation_beta_0.1_not_measured"]}
  return {}


def run(out, *, quick: bool = False, only=None, progress: bool = True) -> dict:
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  names = list(FIGURES) if not only else list(only)
  summary, seconds, start = {}, {}, time.time()
  for name in report.progress(names, "reproduce", progress):
    t0 = time.time()
    result = report.to_python(FIGURES[name].run(out, quick=quick, progress=progress))
    seconds[name] = round(time.time() - t0, 2)
    summary[name] = key_numbers(name, result)
  summary["seconds"] = seconds
  summary["seconds_total"] = round(time.time() - start, 2)
  summary["quick"] = quick
  report.save_json(out / "summary.json", summary)
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results")
  parser.add_argument("--quick", action="store_true", help="small smoke setting")
  parser.add_argument("--only", default="", help="comma-separated subset, e.g. fig2,fig5")
  args = parser.parse_args(argv)
  only = [n for n in args.only.split(",") if n] or None
  summary = run(args.out, quick=args.quick, only=only)
  print(f"wrote {args.out}: {', '.join(summary['seconds'])} in "
        f"{summary['seconds_total']:.0f} s")


if __name__ == "__main__":
  main()
