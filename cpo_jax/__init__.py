"""cpo_jax: DPO, RLHF and Constrained Preference Optimization in JAX.

Implements arXiv 2605.20834 ("Conditional Equivalence of DPO and RLHF").
"CPO" in this library always means *Constrained* Preference Optimization,
never TRL's *Contrastive* Preference Optimization.
"""

__version__ = "0.1.0"
