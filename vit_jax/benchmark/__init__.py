"""`python -m vit_jax.benchmark`: speed measurements (input pipeline; model modes to come)."""
