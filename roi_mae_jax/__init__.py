"""roi_mae_jax: region-aware (AAL3) masked-autoencoder pretraining for 4D fMRI.

Subpackages, in the order the data flows through them:

    brain/       MNI grids, the AAL3 atlas, brain patches, NIfTI maps
    data/        scans in, prepared shards, synthetic subjects, the Grain pipeline
    masking/     atlas-region mask samplers and region objectives
    model/       the 4D patch masked autoencoder (attention kernels; cpu/ paths)
    training/    default config, train step, loop, checkpoints
    downstream/  pretrained encoders: features, probes, fine-tuning, statistics
    explain/     integrated gradients by region, reconstruction by region
    tasks/       one module per `config.task`: the files each task writes

beside `config/` (config blocks, every config rule), `devices/` (mesh,
processes, platforms), `bench/` (benchmarks) and the shared modules at the top
(errors, console, outputs, metrics, preemption, locks, plots, `main`: the CLI).
docs/layout.md lists every module.
"""

from roi_mae_jax.devices import platforms as _platforms

__version__ = "0.1.0"

# Installed TPU/CUDA plugins stay quiet on hosts without the hardware.
_platforms.use_cpu_without_accelerators()
