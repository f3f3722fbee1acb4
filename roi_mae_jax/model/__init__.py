"""The 4D patch masked autoencoder: `mae` (encoder, decoder, sizes), `attention`
(dense, cuDNN/Pallas flash kernels, chosen per platform) and `cpu/` (the only
CPU-tuned code: fused layers and scanned slices, used when the mesh is on CPU).

    from roi_mae_jax.model import mae
    model = mae.MaskedAutoencoder(spec, config.model, rngs=nnx.Rngs(0))
"""
