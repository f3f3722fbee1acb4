"""Benchmarks that print figures; run as `python -m roi_mae_jax.bench PART`."""
