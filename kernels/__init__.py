"""Hand-written accelerator kernels (Pallas) for solq-jax."""
