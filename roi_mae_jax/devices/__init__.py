"""Devices and processes: the mesh and shardings, multi-process start-up, and
the platform switches (CPU-only paths live behind `platforms`).

    from roi_mae_jax.devices import sharding
    mesh = sharding.mesh_from_config(config.mesh)
"""
