"""Orbax checkpointing of the policy, optimiser and data-iterator state.

Layout of `<workdir>/checkpoints/<step>/` (one Orbax `CheckpointManager`
step, written to a temporary directory and renamed when complete, so a
killed save never leaves a half checkpoint that restore would pick up):

  params     policy parameters (pure dict of arrays, sharded restore)
  opt_state  optax state
  data       the `PairIterator.get_state()` dict (JSON)
  meta       {"model": model config, "reference": where the reference came from}

The frozen reference is never saved: it is reloaded from its source
(`config.reference_from`) on every start, and `meta.reference` makes a
resume with another reference fail instead of silently mixing two.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import threading

import jax
import orbax.checkpoint as ocp

_FIELDS_IGNORED = ("remat",)  # compute-only fields a resume may change


class ConfigMismatchError(ValueError):
  """The workdir holds a run with another model config or reference."""


def _jsonable(d):
  return json.loads(json.dumps(d))


def check_meta(saved: dict, model_cfg: dict, reference: str, where: str) -> None:
  """Refuses a resume whose model config or reference differs from the saved run."""
  now = _jsonable(model_cfg)
  diffs = [f"{k}: saved {saved['model'].get(k)!r}, now {now.get(k)!r}"
           for k in sorted(set(now) | set(saved["model"]))
           if k not in _FIELDS_IGNORED and saved["model"].get(k) != now.get(k)]
  if diffs:
    raise ConfigMismatchError(
        f"{where} holds a checkpoint of a different model; refusing to resume. "
        f"Changed model fields: {'; '.join(diffs)}. Use a new workdir, or restore "
        "the original model config.")
  if saved.get("reference") != reference:
    raise ConfigMismatchError(
        f"{where} was trained against reference {saved.get('reference')!r}, now "
        f"{reference!r}; refusing to resume with another reference.")


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """`CheckpointManager` for one run directory (resume by default)."""

  def __init__(self, workdir, *, max_to_keep: int = 2, read_only: bool = False):
    self.dir = pathlib.Path(workdir).absolute() / "checkpoints"
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                        read_only=read_only)
    self.mgr = ocp.CheckpointManager(self.dir, options=opts)

  def latest_step(self) -> int | None:
    return self.mgr.latest_step()

  def meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def save(self, step: int, params, opt_state, data_state: dict, meta: dict, *,
           force: bool = False) -> None:
    data_state = {k: int(v) for k, v in data_state.items()}
    self.mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(_jsonable(meta))),
        force=force)

  def save_final(self, step: int, params, opt_state, data_state: dict, meta: dict) -> None:
    """Saves `step` (end of run, end of data, SIGTERM) unless it is already saved; waits."""
    if self.latest_step() != step:
      self.save(step, params, opt_state, data_state, meta, force=True)
    self.wait()

  def restore_params(self, abstract_params, shardings, step: int | None = None):
    """Only the policy parameters (e.g. to start DPO from an SFT run)."""
    step = self.latest_step() if step is None else step
    args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(abstract_params, shardings)))
    return self.mgr.restore(step, args=args)["params"]

  def restore(self, step: int, params, param_shardings, opt_state, opt_shardings):
    """(params, opt_state, data_state) of `step`, placed with the given shardings."""
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params, param_shardings)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_state, opt_shardings)),
        data=ocp.args.JsonRestore())
    out = self.mgr.restore(step, args=args)
    return out["params"], out["opt_state"], out["data"]

  def wait(self) -> None:
    self.mgr.wait_until_finished()

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()


@contextlib.contextmanager
def sigterm_flag():
  """Pre-emption: yields a dict whose "set" turns True when SIGTERM arrives.

  The training loops poll it between steps, save the current step and
  return. Installed only in the main thread (signal handlers cannot be set
  elsewhere); the previous handler is restored on exit.
  """
  flag = {"set": False}
  old = None
  if threading.current_thread() is threading.main_thread():
    old = signal.signal(signal.SIGTERM, lambda *_: flag.update(set=True))
  try:
    yield flag
  finally:
    if old is not None:
      signal.signal(signal.SIGTERM, old)
