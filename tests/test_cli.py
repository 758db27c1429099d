"""`cpo-jax` train / eval / audit end to end on a tiny model, in process."""

from __future__ import annotations

import json

import pytest

from cpo_jax import cli, writers
from train_helpers import cli_overrides


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def test_usage_errors(capsys, tmp_path):
  assert cli.main(["cpo-jax"]) == 2
  assert cli.main(["cpo-jax", "fit"]) == 2
  assert cli.main(["cpo-jax", "train", f"--workdir={tmp_path}"]) == 2  # no --config
  assert cli.main(["cpo-jax", "train", "--config=default.py"]) == 2  # no --workdir
  assert cli.main(["cpo-jax", "train", "--config=default.py", "--config.no_such=1",
                   f"--workdir={tmp_path}"]) == 2
  assert cli.main(["cpo-jax", "rl", "--config=rl_small_lm.py:rloo"]) == 2  # no --workdir
  assert cli.main(["cpo-jax", "rm", "--config=rm_small_lm.py"]) == 2
  err = capsys.readouterr().err
  assert "usage: cpo-jax {train,eval,audit,rm,rl}" in err
  assert "cpo-jax rl: --workdir is required" in err and "cpo-jax rm: --workdir is required" in err


def test_train_eval_audit(capsys, data_dir, tmp_path):
  work = tmp_path / "run"
  flags = cli_overrides(data_dir, steps=3, ckpt_every=2) + [
      "--config.loss.name=cpo_smooth", "--config.data.eval_split=test"]
  assert cli.main(["cpo-jax", "train", f"--workdir={work}", *flags]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["step"] == 3 and 0.0 <= out["eval"]["in_U"] <= 1.0
  recs = writers.read_jsonl(work / "metrics.jsonl")
  assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2, 3]
  assert [r["step"] for r in recs if r["split"] == "eval"] == [3]

  assert cli.main(["cpo-jax", "eval", f"--workdir={work}", *flags]) == 0
  ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert ev["step"] == 3
  # Same checkpoint, same held-out split: eval reproduces the end-of-training numbers.
  assert ev["loss"] == pytest.approx(out["eval"]["loss"], rel=1e-5)

  # A changed model refuses to resume, with the exit code for config errors.
  assert cli.main(["cpo-jax", "train", f"--workdir={work}", *flags,
                   "--config.model.d_model=48"]) == 2
  assert "d_model: saved 32, now 48" in capsys.readouterr().err

  aud = tmp_path / "audit"
  assert cli.main(["cpo-jax", "audit", f"--reference={work}", f"--out={aud}",
                   "--betas=0.1,1,10", *flags]) == 0
  text = capsys.readouterr().out
  assert "frac_ref_prefers_rejected" in text and "frac_violating" in text
  res = json.loads((aud / "audit.json").read_text())
  assert res["num_pairs"] == 64 and res["num_with_dr"] == 64
  for red in ("sum", "mean"):
    assert len(res[red]["frac_violating"]) == 3
    assert all(0.0 <= v <= 1.0 for v in res[red]["frac_violating"])
    assert sum(res[red]["delta_ref_hist"]) == 64
  assert (aud / "audit.png").stat().st_size > 0


@pytest.mark.parametrize("spec,loss,beta,lr", [
    ("llama3_8b_armorm.py:cpo_smooth", "cpo_smooth", 2.5, 1e-6),
    ("llama3_8b_armorm.py:dpo", "dpo", 0.01, 3e-7),
    ("llama3_8b_armorm.py:simpo", "simpo", 10.0, 1e-6),
    ("small_lm.py:cpo_clip", "cpo_clip", 0.1, 1e-3),
])
def test_shipped_configs_parse_with_overrides(spec, loss, beta, lr):
  args = ["prog"] + cli._resolve_config([f"--config={spec}", "--config.train.steps=7"])
  fv = cli._flags("train", args)
  fv(args)
  c = fv.config
  assert (c.loss.name, c.loss.beta, c.optim.lr, c.train.steps) == (loss, beta, lr, 7)
  if spec.startswith("llama3"):
    assert c.data.batch_size == 128 and c.data.num_epochs == 1 and c.data.template == "llama3"
    assert c.model.d_model == 4096 and c.init_from.startswith("hf:")
