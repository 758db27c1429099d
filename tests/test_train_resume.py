"""Pre-emption: SIGKILL + restart reproduces the uninterrupted run; SIGTERM saves.

The runs are real `cpo-jax train` subprocesses (same 8 simulated devices as
the test process, inherited through XLA_FLAGS).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cpo_jax import checkpoint as ckpt_lib
from cpo_jax import train, writers
from train_helpers import REPO, cli_overrides, tiny_config

STEPS = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def _launch(workdir, data_dir, **train_flags):
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "cpo_jax.cli", "train", f"--workdir={workdir}",
         *cli_overrides(data_dir, **train_flags)]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait_for_steps(proc, path, n, timeout=300):
  """Polls the metrics file until it has `n` train records (or the process ends)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if len([r for r in writers.read_jsonl(path) if r["split"] == "train"]) >= n:
      return
    time.sleep(0.01)
  out = proc.stdout.read() if proc.poll() is not None else ""
  raise AssertionError(f"run did not reach {n} logged steps (rc={proc.poll()}):\n{out[-3000:]}")


def _train_losses(path):
  return {r["step"]: r for r in writers.read_jsonl(path) if r["split"] == "train"}


def test_sigkill_and_restart_reproduce_uninterrupted_run(data_dir, tmp_path):
  ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
  config = tiny_config(data_dir, steps=STEPS, ckpt_every=4)
  train.train(config, str(ref_dir))
  proc = _launch(run_dir, data_dir, steps=STEPS, ckpt_every=4)
  _wait_for_steps(proc, run_dir / "metrics.jsonl", 10)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  killed_at = ckpt_lib.Checkpointer(run_dir, read_only=True).latest_step()
  assert killed_at is not None and 4 <= killed_at < STEPS, killed_at  # a save may be in flight
  proc = _launch(run_dir, data_dir, steps=STEPS, ckpt_every=4)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  want, got = _train_losses(ref_dir / "metrics.jsonl"), _train_losses(run_dir / "metrics.jsonl")
  steps = [r["step"] for r in writers.read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
  assert steps == list(range(1, STEPS + 1))  # resumed lines replace, never duplicate
  for step in range(1, STEPS + 1):
    for key in ("loss", "grad_norm", "delta", "delta_ref", "in_U", "accuracy_absolute", "lr"):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-6, atol=1e-7,
                                 err_msg=f"step {step} {key} (killed after {killed_at})")


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
  proc = _launch(tmp_path, data_dir, steps=10_000, ckpt_every=100_000)
  _wait_for_steps(proc, tmp_path / "metrics.jsonl", 5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert "SIGTERM: saved step" in out
  saved = ckpt_lib.Checkpointer(tmp_path, read_only=True).latest_step()
  logged = max(_train_losses(tmp_path / "metrics.jsonl"))
  assert saved is not None and 5 <= saved < 10_000
  assert saved == logged  # the final save is the last step that ran
