"""Why the classifier decides: integrated gradients in JAX, aggregated to AAL3
regions, hemispheres and systems; reconstruction error by region; what each
layer keeps of every region's signal (recovery, synthetic data).

    from roi_mae_jax.explain import regions
    result = regions.explain(config, pre, source)
"""
