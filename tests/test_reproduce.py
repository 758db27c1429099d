"""The reproduction command on its small (--quick) setting: files and key numbers.

All six figures at the quick setting are executed by tests/test_notebook.py;
here figures 4-6 run through ``experiments.reproduce`` and its CLI and their
key numbers are checked.
"""

import json
import math

import numpy as np
import pytest

from experiments import reproduce


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
  out = tmp_path_factory.mktemp("results")
  s = reproduce.run(out, quick=True, only=["fig4", "fig5"], progress=False)
  return out, s


def test_files_written(summary):
  out, s = summary
  for stem in ("fig4_prop51", "fig5_gamma"):
    assert (out / f"{stem}.png").stat().st_size > 0
    assert (out / f"{stem}.json").exists() and (out / f"{stem}.csv").exists()
  on_disk = json.loads((out / "summary.json").read_text())
  assert set(on_disk["seconds"]) == {"fig4", "fig5"}


def test_prop51_gap_is_log2_over_beta(summary):
  """sup |(1/beta) L_DPO - hinge| = log(2)/beta (grid resolution: rtol 5e-2)."""
  s = summary[1]["fig4"]
  np.testing.assert_allclose(s["sup_gap_measured"], s["sup_gap_theory"], rtol=5e-2)


def test_critique1_one_sided_dpo_keeps_moving(summary):
  s = summary[1]["fig4"]
  det, bt = np.asarray(s["critique1_mean_delta_deterministic"]), np.asarray(
      s["critique1_mean_delta_bt_population"])
  assert np.all(np.diff(det) > 0)                  # no finite minimiser
  assert abs(bt[-1] - bt[-2]) < 1e-2               # BT labels: converged


def test_gamma_threshold_and_critique2(summary):
  s = summary[1]["fig5"]
  cpo = s["cpo"]
  assert cpo["max_abs_measured_minus_predicted"] <= 0.05
  assert 0.001 < cpo["smallest_gamma_all_viol_fixed"] <= 10.0   # a threshold exists
  j = list(s["critique2_J_at_eps"].values())
  assert all(b > a for a, b in zip(j, j[1:]))      # J_gamma grows as pi(y_l) -> 0
  ends = s["critique2_mean_delta_end"]
  assert ends["gamma=0.5"] > 10 * abs(ends["gamma=0"]) + 10


def test_cli_and_audit_recovers_the_constructed_bias(tmp_path):
  reproduce.main(["--out", str(tmp_path), "--quick", "--only", "fig6"])
  s = json.loads((tmp_path / "summary.json").read_text())
  assert s["quick"] is True and math.isfinite(s["seconds_total"])
  assert (tmp_path / "fig6_audit.png").stat().st_size > 0
  a = s["fig6"]
  n = 256  # QUICK n_prompts
  np.testing.assert_allclose(a["frac_violating_at_beta0"], a["bias_fracs"], atol=1.0 / n)
  assert a["paper_llama3_at_beta_0.1_not_measured"] == 0.455
