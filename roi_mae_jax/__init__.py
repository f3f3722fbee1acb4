"""roi_mae_jax: region-aware (AAL3) masked-autoencoder pretraining for 4D fMRI.

Modules: `grids` (MNI grids), `atlas` (AAL3 on any grid), `patches` (brain
patches and their regions), `masking` (jitted mask samplers), `main` (CLI).
"""

from roi_mae_jax import platforms as _platforms

__version__ = "0.1.0"

# Installed TPU/CUDA plugins stay quiet on hosts without the hardware.
_platforms.use_cpu_without_accelerators()
