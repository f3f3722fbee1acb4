"""Pretraining: the default config as values, building the model and its
sharded state, the jitted train step, the loop, and Orbax checkpoints with
their integrity seals.

    from roi_mae_jax.training import loop
    from roi_mae_jax.training import train_step
    setup = train_step.TrainSetup.from_config(config, mesh)
    state = loop.train(config, workdir, setup, iterator)
"""
