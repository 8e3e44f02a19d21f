"""ctxext_jax: extend the context window of decoder language models in JAX."""

__version__ = "0.1.0"
