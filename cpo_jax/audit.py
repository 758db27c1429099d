"""Reference audit (DESIGN.md section 4): is Assumption 3.1 plausible for this data?

For a reference policy and a preference split, computes delta_ref (summed
and length-averaged log-probs), `frac_ref_prefers_rejected`, the delta_ref
histograms and, where reward gaps dr are known, `frac_violating` =
mean[delta_ref <= -dr/beta] for a range of beta. Writes `audit.json`,
`audit.txt` and `audit.png` (histograms + violation rate vs beta).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from matplotlib.figure import Figure

from cpo_jax import atomic
from cpo_jax import diagnostics, inputs
from cpo_jax import sharding as shd

DEFAULT_BETAS = (0.01, 0.03, 0.1, 0.3, 1.0, 2.5, 10.0)


def reference_deltas(config, reference: str, split: str, batch_size: int) -> dict:
  """delta_ref (sum and mean reductions), dr and group per pair of `split`."""
  from cpo_jax import train  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh(config.mesh)
  _, graphdef, params = train.model_from_source(reference, config, mesh)
  ins = inputs.Inputs(config.data)
  def fn(params, batch):
    lp, count = train.sequence_logps(graphdef, params, batch, config.train.kernel_impl)
    return dict(lp=lp, count=count, valid=batch["valid"], dr=batch["dr"], group=batch["group"])

  fn = jax.jit(fn, out_shardings=NamedSharding(mesh, P()))  # global arrays on every host
  parts = []
  with shd.use_mesh(mesh):
    for batch in ins.eval_iterator(batch_size, split):
      o = jax.device_get(fn(params, train.device_batch(batch, mesh)))
      ok = o["valid"]
      lp, mean = o["lp"], o["lp"] / np.maximum(o["count"], 1.0)
      parts.append(dict(delta_ref_sum=(lp[:, 0] - lp[:, 1])[ok],
                        delta_ref_mean=(mean[:, 0] - mean[:, 1])[ok],
                        dr=o["dr"][ok], group=o["group"][ok]))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def audit(deltas: dict, betas=DEFAULT_BETAS) -> dict:
  """`diagnostics.reference_audit` for both reductions, as plain Python numbers."""
  dr = deltas["dr"]
  known = np.isfinite(dr)
  out = {"num_pairs": int(len(dr)), "num_with_dr": int(known.sum()), "betas": list(betas)}
  for red in ("sum", "mean"):
    d = deltas[f"delta_ref_{red}"]
    res = diagnostics.reference_audit(d, betas=np.asarray(betas, np.float32),
                                      dr=np.where(known, dr, 0.0) if known.any() else None,
                                      where=known.astype(np.float32) if known.any() else None)
    entry = {"frac_ref_prefers_rejected": float(np.mean(d < 0)),
             "delta_ref_hist": np.asarray(res["delta_ref_hist"]).tolist(),
             "bins": np.asarray(res["bins"]).tolist(),
             "delta_ref_quantiles": np.quantile(d, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist()}
    if known.any():
      entry["frac_violating"] = np.asarray(res["frac_violating"]).tolist()
    out[red] = entry
  return out


def report_text(res: dict) -> str:
  lines = [f"reference audit: {res['num_pairs']} pairs, {res['num_with_dr']} with a known dr"]
  for red in ("sum", "mean"):
    e = res[red]
    lines.append(f"[{red} log-probs] frac_ref_prefers_rejected = "
                 f"{e['frac_ref_prefers_rejected']:.3f}; delta_ref quantiles 5/25/50/75/95% = "
                 + ", ".join(f"{q:.3g}" for q in e["delta_ref_quantiles"]))
    if "frac_violating" in e:
      lines.append("  beta:            " + " ".join(f"{b:>7g}" for b in res["betas"]))
      lines.append("  frac_violating:  " + " ".join(f"{v:7.3f}" for v in e["frac_violating"]))
  return "\n".join(lines)


def write(res: dict, out_dir) -> pathlib.Path:
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  atomic.write_json(out / "audit.json", res, indent=1)
  atomic.write_text(out / "audit.txt", report_text(res) + "\n")
  fig = Figure(figsize=(10, 3.5))
  axes = fig.subplots(1, 3)
  for ax, red in zip(axes, ("sum", "mean")):
    e = res[red]
    b = np.asarray(e["bins"])
    ax.bar(b[:-1], e["delta_ref_hist"], width=np.diff(b), align="edge")
    ax.axvline(0, color="k", lw=0.8)
    ax.set(title=f"delta_ref ({red} log-probs)", xlabel="delta_ref", ylabel="pairs")
  for red in ("sum", "mean"):
    if "frac_violating" in res[red]:
      axes[2].semilogx(res["betas"], res[red]["frac_violating"], "o-", label=red)
  axes[2].set(title="Assumption 3.1 violated", xlabel="beta", ylabel="fraction of pairs")
  axes[2].legend()
  fig.tight_layout()
  atomic.save_figure(fig, out / "audit.png", dpi=120)
  return out
