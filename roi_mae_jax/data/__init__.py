"""fMRI in, windows out: scan discovery and layouts, NIfTI reading, registration
checks, resampling to the MNI grid, denoising, prepared shards, the built-in
synthetic generator, and the Grain pipeline that feeds training.

    from roi_mae_jax.data import pipeline
    from roi_mae_jax.data import sources
    source = sources.training_source(config, multiple_of=4)
    iterator = pipeline.iterator_from_config(config, source, local_batch=8)
"""
