"""MNI space and its pieces: grids, the AAL3 atlas on any grid, brain patches
and their regions, token layouts, NIfTI maps.

    from roi_mae_jax.brain import atlas
    from roi_mae_jax.brain import grids
    from roi_mae_jax.brain import patches
    grid = grids.mni_grid(4.0)                      # MNI box at 4 mm
    on_grid = atlas.atlas_on_grid(grid)             # AAL3 regions on that grid
"""
