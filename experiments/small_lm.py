"""Small-LM experiment: zombie alignment and CPO on a real (tiny) transformer.

Command:  python -m experiments.small_lm --out results/small_lm
Setting:  synthetic ``reverse`` task (byte tokens, "rev:abc=" -> "cba"), 1024
          training prompts, 40% of them "misaligned": their SFT demonstration is
          the *worse* response. Stage 1 fine-tunes a 2-layer d=64 decoder from
          scratch on those demonstrations (cpo_jax/configs/small_lm.py:sft),
          which memorises them: the reference prefers the rejected response on
          the misaligned training pairs. Stage 2 trains DPO, the CPO variants
          (paper Eq. 17 `cpo`, official-code `cpo_smooth`, `cpo_easy`,
          `cpo_clip`) and SimPO from that reference on the same Bradley–Terry
          labelled pairs (same order, same steps, same lr).
Measured: every `eval_every` steps on the *training* pairs (U is defined
          there): absolute / relative accuracy and fraction in U, overall and
          on the misaligned group; ground-truth reward r*(x, y) of greedy
          generations for 256 training prompts. The train loss is logged every
          10 steps. The reference itself is evaluated once (step 0).
Writes:   small_lm.json (config, audit, summary), small_lm_curves.csv,
          small_lm.png, audit/ (reference audit), runs/<stage>/ (checkpoints,
          metrics.jsonl, TensorBoard events).
Runtime:  see the README (measured on 2 shared CPU cores). Re-running resumes
          finished stages from their checkpoints.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
from matplotlib.figure import Figure

from cpo_jax import atomic
from cpo_jax import audit, train, writers
from cpo_jax.configs import small_lm

LOSSES = ("dpo", "cpo", "cpo_smooth", "cpo_easy", "cpo_clip", "simpo")
STEPS = dict(sft=800, pref=300, eval_every=50)
QUICK = dict(sft=60, pref=20, eval_every=10)
CURVE_KEYS = ("loss", "in_U", "accuracy_absolute", "accuracy_relative", "in_U/misaligned",
              "accuracy_absolute/misaligned", "accuracy_relative/misaligned", "gen_reward",
              "gen_reward/misaligned", "gen_reward/aligned", "gen_exact")


def stage_config(stage: str, out: pathlib.Path, data_dir: str, steps: dict):
  c = small_lm.get_config(stage)
  c.data.dir = data_dir
  c.train.eval_every = steps["eval_every"] if stage != "sft" else 0
  if stage == "sft":
    c.train.steps = steps["sft"]
    c.train.gen_samples = 0
  else:
    c.train.steps = steps["pref"]
    c.init_from = str(out / "runs" / "sft")
    c.data.eval_split = "train"  # U, accuracies and generations on the training prompts
  return c


def run(out, *, quick: bool = False, losses=LOSSES, data_dir: str = "/tmp/cpo_jax_data") -> dict:
  out = pathlib.Path(out).absolute()
  steps = QUICK if quick else STEPS
  t_start = time.time()
  timings = {}
  sft_cfg = stage_config("sft", out, data_dir, steps)
  t0 = time.time()
  sft_final = train.train(sft_cfg, str(out / "runs" / "sft"))
  timings["sft"] = time.time() - t0

  ref_cfg = stage_config("dpo", out, data_dir, steps)
  deltas = audit.reference_deltas(ref_cfg, ref_cfg.init_from, "train", 128)
  aud = audit.audit(deltas, betas=audit.DEFAULT_BETAS)
  audit.write(aud, out / "audit")
  by_group = {name: {"pairs": int((deltas["group"] == g).sum()),
                     "frac_ref_prefers_rejected": float(np.mean(deltas["delta_ref_sum"][
                         deltas["group"] == g] < 0))} for g, name in ((0, "aligned"), (1, "misaligned"))}
  reference = train.evaluate_workdir(ref_cfg, ref_cfg.init_from)  # policy = reference

  summary, curves = {}, []
  for loss in losses:
    cfg = stage_config(loss, out, data_dir, steps)
    workdir = out / "runs" / loss
    t0 = time.time()
    final = train.train(cfg, str(workdir))
    timings[loss] = time.time() - t0
    recs = writers.read_jsonl(workdir / "metrics.jsonl")
    train_recs = [r for r in recs if r["split"] == "train"]
    summary[loss] = {
        "train_loss_first": train_recs[0]["loss"], "train_loss_last": train_recs[-1]["loss"],
        "first_logged_step": train_recs[0]["step"],
        "eval": final["eval"]}
    curves += [dict(method=loss, split="eval", step=0, **{k: reference.get(k) for k in CURVE_KEYS})]
    curves += [dict(method=loss, split=r["split"], step=r["step"],
                    **{k: r.get(k) for k in CURVE_KEYS}) for r in recs]
  result = {"config": {"steps": steps, "losses": list(losses),
                       "small_lm": small_lm.get_config("dpo").to_dict(),
                       "loss_hparams": small_lm.LOSS_OVERRIDES},
            "sft_final": sft_final.get("eval"), "audit": aud, "audit_by_group": by_group,
            "reference_eval": reference, "summary": summary,
            "timings_s": dict(timings, total=time.time() - t_start)}
  out.mkdir(parents=True, exist_ok=True)
  atomic.write_json(out / "small_lm.json", result, indent=1, default=float)
  atomic.write_csv_rows(out / "small_lm_curves.csv", curves, ["method", "split", "step", *CURVE_KEYS])
  _figure(curves, losses, out / "small_lm.png")
  print(table(result))
  return result


def _figure(curves, losses, path):
  panels = (("train", "loss", "train loss (each method's own, log scale)"),
            ("eval", "in_U/misaligned", "fraction in U (misaligned pairs)"),
            ("eval", "accuracy_absolute/misaligned", "absolute acc. (misaligned pairs)"),
            ("eval", "accuracy_relative", "relative (TRL) acc., all pairs"),
            ("eval", "gen_reward/misaligned", "r* of greedy generations, misaligned"),
            ("eval", "gen_reward", "r* of greedy generations, all"))
  fig = Figure(figsize=(14, 7))
  for ax, (split, key, title) in zip(fig.subplots(2, 3).ravel(), panels):
    for loss in losses:
      pts = [(r["step"], r[key]) for r in curves
             if r["method"] == loss and r["split"] == split and isinstance(r[key], float)]
      if pts:
        ax.plot(*zip(*pts), label=loss, marker="." if split == "eval" else None)
    ax.set(title=title, xlabel="step", yscale="log" if key == "loss" else "linear")
  fig.axes[0].legend(fontsize=8)
  fig.tight_layout()
  atomic.save_figure(fig, path, dpi=110)


def table(result) -> str:
  ref = result["reference_eval"]
  cols = ("train loss first->last", "acc_abs", "acc_abs mis.", "acc_rel", "in_U", "in_U mis.",
          "r* gen", "r* gen mis.", "exact gen")
  rows = [("reference (SFT)", "-", ref["accuracy_absolute"], ref["accuracy_absolute/misaligned"],
           ref["accuracy_relative"], ref["in_U"], ref["in_U/misaligned"], ref["gen_reward"],
           ref["gen_reward/misaligned"], ref["gen_exact"])]
  for loss, s in result["summary"].items():
    e = s["eval"]
    rows.append((loss, f"{s['train_loss_first']:.3f}->{s['train_loss_last']:.3f}",
                 e["accuracy_absolute"], e["accuracy_absolute/misaligned"], e["accuracy_relative"],
                 e["in_U"], e["in_U/misaligned"], e["gen_reward"], e["gen_reward/misaligned"],
                 e["gen_exact"]))
  fmt = lambda v: v if isinstance(v, str) else f"{v:.3f}"
  lines = ["| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
  lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="results/small_lm")
  p.add_argument("--data_dir", default="/tmp/cpo_jax_data")
  p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
  p.add_argument("--losses", default=",".join(LOSSES))
  a = p.parse_args()
  run(a.out, quick=a.quick, losses=tuple(a.losses.split(",")), data_dir=a.data_dir)


if __name__ == "__main__":
  main()
