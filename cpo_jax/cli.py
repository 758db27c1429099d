"""`cpo-jax` command line: train, eval, audit.

    cpo-jax train --config=cpo_jax/configs/small_lm.py:dpo --workdir=/tmp/run \\
        --config.optim.lr=1e-3
    cpo-jax eval  --config=cpo_jax/configs/small_lm.py:dpo --workdir=/tmp/run
    cpo-jax audit --config=cpo_jax/configs/small_lm.py:dpo --reference=/tmp/sft \\
        --out=/tmp/audit --betas=0.1,1,2.5

`--config` takes a config file (a path, or a file name under
`cpo_jax/configs/`) with an optional `:arg`; any field is overridden by
`--config.<field>=<value>`. "cpo" here is *Constrained* Preference
Optimization (arXiv 2605.20834), not TRL's Contrastive PO.
Exit codes: 0 done (also after a SIGTERM save), 2 usage / config mismatch,
3 non-finite loss.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

COMMANDS = {
    "train": "train (resumes from --workdir if it holds a checkpoint)",
    "eval": "evaluate the latest checkpoint in --workdir on the held-out split",
    "audit": "audit a reference: delta_ref histograms and Assumption 3.1 violation vs beta",
    "rm": "train a Bradley-Terry reward model (resumes from --workdir)",
    "rl": "online RLHF, RLOO or PPO, against r* or a reward model (resumes from --workdir)",
}
_CONFIG_DIR = pathlib.Path(__file__).parent / "configs"


def _resolve_config(argv: list[str]) -> list[str]:
  """Lets `--config=small_lm.py:dpo` name a file shipped in cpo_jax/configs."""
  out = []
  for a in argv:
    if a.startswith("--config="):
      path, sep, arg = a[len("--config="):].partition(":")
      if not pathlib.Path(path).exists():
        for cand in (_CONFIG_DIR / path, _CONFIG_DIR / f"{path}.py"):
          if cand.exists():
            a = f"--config={cand}{sep}{arg}"
            break
    out.append(a)
  return out


def _flags(cmd: str, argv: list[str] | None = None) -> flags.FlagValues:
  """Flags of one subcommand. `argv` (program name first) is where config_flags
  finds the `--config.x=` overrides; None means sys.argv."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file[:arg]", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)", flag_values=fv)
  if cmd == "eval":
    flags.DEFINE_string("split", "", "split to evaluate (default config.data.eval_split)",
                        flag_values=fv)
  if cmd == "audit":
    flags.DEFINE_string("reference", None, "reference source: hf:<dir>, a run workdir, or '' "
                        "(default: config.reference_from or config.init_from)", flag_values=fv)
    flags.DEFINE_string("split", "train", "split to audit", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory for audit.{txt,json,png}", flag_values=fv)
    flags.DEFINE_string("betas", "0.01,0.03,0.1,0.3,1,2.5,10", "comma-separated betas",
                        flag_values=fv)
  return fv


def _usage() -> str:
  return "usage: cpo-jax {train,eval,audit,rm,rl} --config=FILE[:ARG] [--config.x=v ...] ...\n" + \
      "\n".join(f"  {k:6s} {v}" for k, v in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(_usage(), file=sys.stderr)
    return 2
  cmd = argv[1]
  args = [argv[0]] + _resolve_config(argv[2:])
  fv = _flags(cmd, args)
  try:
    fv(args)
  except (flags.Error, AttributeError, KeyError) as e:  # unknown flag / config field
    print(f"cpo-jax {cmd}: {e}\n{_usage()}", file=sys.stderr)
    return 2
  config = fv.config
  if config is None:
    print(f"cpo-jax {cmd}: --config is required\n{_usage()}", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("cpo_jax").setLevel(logging.INFO)  # library info; Orbax/absl stay quiet
  if cmd in ("train", "eval", "rm", "rl") and not fv.workdir:
    print(f"cpo-jax {cmd}: --workdir is required", file=sys.stderr)
    return 2
  from cpo_jax import audit, checkpoint, train  # pylint: disable=g-import-not-at-top
  from cpo_jax import reward_model, train_rlhf  # pylint: disable=g-import-not-at-top
  try:
    if cmd == "train":
      out = train.train(config, fv.workdir)
      print(json.dumps({k: v for k, v in out.items()}, default=float))
    elif cmd in ("rm", "rl"):
      run = reward_model.train_rm if cmd == "rm" else train_rlhf.train_rl
      print(json.dumps(run(config, fv.workdir), default=float))
    elif cmd == "eval":
      out = train.evaluate_workdir(config, fv.workdir, split=fv.split or None)
      print(json.dumps(out))
    else:
      ref = fv.reference if fv.reference is not None else (
          config.reference_from or config.init_from)
      res = audit.audit(audit.reference_deltas(config, ref, fv.split, config.train.eval_batch_size),
                        [float(b) for b in fv.betas.split(",")])
      print(audit.report_text(res))
      if fv.out:
        print(f"wrote {audit.write(res, fv.out)}")
  except train.NonFiniteError as e:
    print(f"cpo-jax {cmd}: {e}", file=sys.stderr)
    return 3
  except (checkpoint.ConfigMismatchError, FileNotFoundError) as e:
    print(f"cpo-jax {cmd}: error: {e}", file=sys.stderr)
    return 2
  return 0


def entry_point() -> None:
  sys.exit(main())


if __name__ == "__main__":
  entry_point()
