"""Long-context evaluation: perplexity by length, passkey, needle grids, reports and plots."""

from ctxext_jax.evals.scoring import make_scorer
from ctxext_jax.evals.suite import EvalOptions, long_eval_subset, run_suite

__all__ = ["EvalOptions", "long_eval_subset", "make_scorer", "run_suite"]
