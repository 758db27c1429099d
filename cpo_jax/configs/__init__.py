"""Training configs: `.py` files whose `get_config(arg)` returns a ConfigDict.

Use one with the CLI: ``cpo-jax train --config=cpo_jax/configs/small_lm.py:dpo
--config.optim.lr=1e-3 --workdir=/tmp/run``. `default.get_config()` documents
every field once; the other files only change values.
"""
