"""What a pretrained encoder is worth: loading it, subject features and
read-outs (layers, reconstruction), linear probes and end-to-end fine-tuning
on subject splits, paired statistics, the masking comparison and its
pretraining curve.

    from roi_mae_jax.downstream import evaluation
    from roi_mae_jax.downstream import pretrained
    pre = pretrained.load_pretrained("runs/demo")
    results, _ = evaluation.probe_encoder(config, pre, source)
"""
