"""papo_jax: Perception-Aware Policy Optimization for vision-language models in JAX."""

__version__ = "0.1.0"
