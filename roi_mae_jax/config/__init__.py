"""Config blocks and the one place every config value is checked.

    from roi_mae_jax.config import blocks
    from roi_mae_jax.config import validation
    config.mask = blocks.mask(strategy="roi", ratio=0.5)
    validation.validate(config)                     # one InputError naming each bad key

`validation` imports nothing of the package but `errors`: the tables its rules
name (patches.ASSIGNMENTS, features.POOLS, ...) are looked up when a rule runs,
so any layer may check a value without an import cycle.
"""
