"""Which tokens the model sees: jitted atlas-region mask samplers (roi, random,
tube, roi_time) and the region objectives (loss weights by region or system,
adaptive region masking, the visible tokens' weight).

    from roi_mae_jax.masking import samplers
    sampler = samplers.sampler_from_config(config, patch_map)
    masks = sampler.sample_batch(key, batch_size)
"""
