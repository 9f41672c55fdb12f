"""solq-jax: SOLQ (Segmenting Objects by Learning Queries) in JAX/Flax."""

__version__ = '0.1.0'
