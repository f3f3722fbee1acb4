"""Figures a person looks at: orthogonal slices, region colours, mask rasters.

Brain maps are drawn by nilearn.plotting: the atlas, masked patches and the
attribution map over nilearn's MNI152 template (it ships with nilearn), the
atlas outlines over a prepared frame. Curves, bars, token rasters and the
reconstruction slices (input, masked input, output of one window) stay
matplotlib; those slices are in neurological convention (subject's right on
the right) whatever the grid's orientation: volumes are reordered to RAS first.

    fig = show_masks_figure(patch_map, {"roi": sample}, num_time=10,
                            point_mm=(30, -20, 8))
    fig.savefig("masks.png")
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display is assumed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import colors as mcolors  # pylint: disable=g-import-not-at-top
import nibabel as nib  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from roi_mae_jax.brain import atlas as atlas_lib  # pylint: disable=g-import-not-at-top

BACKGROUND = (0.0, 0.0, 0.0)
VISIBLE = (0.42, 0.42, 0.42)


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`volume` reordered so axes run Right, Anterior, Superior, and its affine."""
  ornt = nib.orientations.io_orientation(affine)
  ras = nib.orientations.apply_orientation(volume, ornt)
  new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
  return ras, new_affine


def region_colours(num_regions: int, seed: int = 7) -> np.ndarray:
  """(R, 3) distinct-looking RGB colours, shuffled so neighbours differ."""
  hues = np.random.default_rng(seed).permutation(num_regions) / max(num_regions, 1)
  sat = 0.55 + 0.4 * (np.arange(num_regions) % 3) / 2
  hsv = np.stack([hues, sat, np.full(num_regions, 0.95)], axis=1)
  return mcolors.hsv_to_rgb(hsv)


def orthogonal_slices(axes: Sequence[plt.Axes], rgb: np.ndarray, affine: np.ndarray,
                      point_mm: Sequence[float], titles: Sequence[str] = ("", "", "")):
  """Draws sagittal, coronal and axial slices of an (X, Y, Z, 3) RGB volume."""
  rgb, affine = to_ras(rgb, affine)
  ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), point_mm)).astype(int)
  ijk = np.clip(ijk, 0, np.array(rgb.shape[:3]) - 1)
  lo = nib.affines.apply_affine(affine, [0, 0, 0])
  hi = nib.affines.apply_affine(affine, np.array(rgb.shape[:3]) - 1)
  views = [(rgb[ijk[0]], (lo[1], hi[1], lo[2], hi[2]), f"x = {point_mm[0]:g} mm"),
           (rgb[:, ijk[1]], (lo[0], hi[0], lo[2], hi[2]), f"y = {point_mm[1]:g} mm"),
           (rgb[:, :, ijk[2]], (lo[0], hi[0], lo[1], hi[1]), f"z = {point_mm[2]:g} mm")]
  for ax, (plane, extent, where), title in zip(axes, views, titles):
    ax.imshow(plane.transpose(1, 0, 2), origin="lower", extent=extent,
              interpolation="nearest")
    ax.set_title(f"{title} {where}".strip(), fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  axes[1].text(0.98, 0.02, "R", color="w", transform=axes[1].transAxes,
               ha="right", fontsize=8)
  axes[2].text(0.98, 0.02, "R", color="w", transform=axes[2].transAxes,
               ha="right", fontsize=8)


def _region_cmap(on_grid: atlas_lib.Atlas, colours: np.ndarray) -> mcolors.ListedColormap:
  """Colour of each label value 0..max id (0 unused: nilearn leaves the background clear)."""
  lookup = np.zeros((int(on_grid.labels.max()) + 1, 3))
  for index, region in enumerate(on_grid.regions):
    lookup[region.id] = colours[index]
  return mcolors.ListedColormap(lookup)


def roi_on_template(fig: plt.Figure, rect: Sequence[float], labels: np.ndarray,
                    affine: np.ndarray, cmap: mcolors.ListedColormap,
                    point_mm: Sequence[float], title: str, bg_img=None,
                    contours: bool = False):
  """nilearn's plot_roi of a label volume (0 = clear) over `bg_img` (the MNI template);
  `contours` draws region outlines only, so the background stays readable."""
  from nilearn import plotting  # pylint: disable=g-import-not-at-top  (slow import)
  from roi_mae_jax.brain import maps  # pylint: disable=g-import-not-at-top
  axes = fig.add_axes(rect)
  # Label k takes colour k: bins of width 1 centred on the integers.
  return plotting.plot_roi(maps.mni_image(labels.astype(np.int16), affine),
                           bg_img=mni_template() if bg_img is None else bg_img,
                           cut_coords=tuple(point_mm), display_mode="ortho", axes=axes,
                           figure=fig, title=title, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5,
                           alpha=0.85, draw_cross=False, black_bg=True, annotate=True,
                           colorbar=False, view_type="contours" if contours else "continuous",
                           dim=0 if contours else "auto")


def _row_rects(rows: int, row: int, split: float = 0.62):
  """(brain panel, side panel) rectangles of figure row `row` of `rows`, top first."""
  height = 1.0 / rows
  bottom = 1.0 - (row + 1) * height
  return ((0.01, bottom + 0.02 * height, split - 0.02, 0.9 * height),
          (split + 0.09, bottom + 0.22 * height, 0.97 - split - 0.09, 0.62 * height))


def show_masks_figure(patch_map, samples: Mapping[str, object], num_time: int,
                      point_mm: Sequence[float], time_chunk: int = 0) -> plt.Figure:
  """The atlas on its grid, then one row per strategy's sample mask, on the MNI template.

  Masked patches take their region's colour over the template (nilearn); the
  right column is the token mask (time chunk x brain patch, patches ordered by
  region; masked in region colours, visible grey): roi and tube make columns,
  random makes noise, roi_time makes blocks.
  """
  on_grid = patch_map.atlas
  colours = region_colours(on_grid.num_regions)
  cmap = _region_cmap(on_grid, colours)
  rows = 1 + len(samples)
  fig = plt.figure(figsize=(13, 2.9 * rows))
  affine = on_grid.grid.affine
  brain_rect, side_rect = _row_rects(rows, 0)
  roi_on_template(fig, brain_rect, on_grid.labels, affine, cmap, point_mm, "AAL3 on grid")

  # Brain patches per system, for the atlas row.
  region = patch_map.brain_region
  systems = [on_grid.regions[r].system if r >= 0 else "mixed" for r in region]
  names, counts = np.unique(systems, return_counts=True)
  bars = fig.add_axes(side_rect)
  bars.barh(names, counts, color="0.35")
  bars.set_title(f"brain patches per system ({patch_map.num_brain_patches} "
                 f"of {patch_map.num_patches})", fontsize=8)
  bars.tick_params(labelsize=7)

  by_region = np.argsort(region, kind="stable")
  patch_rgb = np.where(region[:, None] >= 0, colours[np.maximum(region, 0)], 0.8)
  # A masked patch's label value: its region's id (mixed patches: none, shown clear).
  patch_ids = np.array([on_grid.regions[r].id if r >= 0 else 0 for r in region])
  for row, (name, sample) in enumerate(samples.items(), start=1):
    mask = np.asarray(sample.mask).reshape(num_time, patch_map.num_brain_patches)
    volume = patch_map.to_volume(np.where(mask[time_chunk], patch_ids, 0), fill=0)
    brain_rect, side_rect = _row_rects(rows, row)
    roi_on_template(fig, brain_rect, volume, affine, cmap, point_mm,
                    f"{name}: masked, chunk {time_chunk}")
    raster = np.where(mask[:, by_region, None], patch_rgb[by_region][None], VISIBLE)
    ax = fig.add_axes(side_rect)
    ax.imshow(raster, aspect="auto", interpolation="nearest")
    ax.set_title(f"{name}: {mask.sum()} of {mask.size} tokens masked "
                 f"({mask.mean():.0%})", fontsize=8)
    ax.set_xlabel("brain patch (ordered by region)", fontsize=7)
    ax.set_ylabel("time chunk", fontsize=7)
    ax.tick_params(labelsize=6)
  return fig


def _grey_rgb(volume: np.ndarray, brain: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
  """Grey-scale RGB of a volume; NaN (masked) shows in red, non-brain black."""
  lo, hi = limits
  grey = np.clip((np.nan_to_num(volume) - lo) / max(hi - lo, 1e-6), 0, 1)
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  rgb[np.isnan(volume) & brain] = (0.55, 0.1, 0.1)
  rgb[~brain] = BACKGROUND
  return rgb


def reconstruction_figure(window: np.ndarray, masked: np.ndarray, reconstruction: np.ndarray,
                          brain: np.ndarray, affine: np.ndarray, point_mm: Sequence[float],
                          frame: int = 0) -> plt.Figure:
  """Rows: input, input with masked patches (red), reconstruction; one frame."""
  limits = tuple(np.percentile(window[brain][:, frame], [1, 99]))
  rows = [("input", window), ("masked input", masked), ("reconstruction", reconstruction)]
  fig, axes = plt.subplots(3, 3, figsize=(8, 7.6))
  for row, (name, volume) in enumerate(rows):
    orthogonal_slices(axes[row], _grey_rgb(volume[..., frame], brain, limits), affine,
                      point_mm, titles=(f"{name}, frame {frame}", "", ""))
  fig.tight_layout()
  return fig


def prepared_scan_figure(frame: np.ndarray, on_grid: atlas_lib.Atlas, brain: np.ndarray,
                         point_mm: Sequence[float], title: str) -> plt.Figure:
  """One prepared frame alone, then with the atlas over it (nilearn): checks the alignment."""
  from nilearn import plotting  # pylint: disable=g-import-not-at-top  (slow import)
  from roi_mae_jax.brain import maps  # pylint: disable=g-import-not-at-top
  affine = on_grid.grid.affine
  limits = tuple(np.percentile(frame[brain], [1, 99]))
  scan = maps.mni_image(np.where(brain, frame, limits[0]).astype(np.float32), affine)
  fig = plt.figure(figsize=(8, 5.6))
  plotting.plot_anat(scan, cut_coords=tuple(point_mm), display_mode="ortho", figure=fig,
                     axes=fig.add_axes((0.01, 0.51, 0.98, 0.47)), title=title, vmin=limits[0],
                     vmax=limits[1], draw_cross=False, dim=0, black_bg=True)
  colours = region_colours(on_grid.num_regions)
  roi_on_template(fig, (0.01, 0.02, 0.98, 0.47), on_grid.labels, affine,
                  _region_cmap(on_grid, colours), point_mm, "with the atlas", bg_img=scan,
                  contours=True)
  return fig


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> plt.Figure:
  """ROC curves of out-of-fold probabilities: name -> (labels, probabilities)."""
  from sklearn import metrics as sk_metrics  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(4.6, 4.4))
  for name, (labels, probs) in curves.items():
    if len(np.unique(labels)) < 2:
      continue
    fpr, tpr, _ = sk_metrics.roc_curve(labels, probs)
    auc = sk_metrics.roc_auc_score(labels, probs)
    ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.2f})")
  ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=0.8, label="chance")
  ax.set_xlabel("false positive rate (1 - specificity)")
  ax.set_ylabel("true positive rate (sensitivity)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  return fig


@functools.lru_cache(maxsize=1)
def mni_template():
  """nilearn's MNI152 T1 template (2 mm); it ships with nilearn, nothing is downloaded."""
  from nilearn import datasets  # pylint: disable=g-import-not-at-top  (slow import)
  return datasets.load_mni152_template(resolution=2)


def stat_map_on_template(fig: plt.Figure, rect: Sequence[float], volume: np.ndarray,
                         affine: np.ndarray, point_mm: Sequence[float], title: str,
                         threshold: float | None = None):
  """nilearn's plot_stat_map of `volume` over the MNI template, in `rect` of `fig`."""
  from nilearn import plotting  # pylint: disable=g-import-not-at-top
  from roi_mae_jax.brain import maps  # pylint: disable=g-import-not-at-top
  axes = fig.add_axes(rect)
  return plotting.plot_stat_map(maps.mni_image(volume.astype(np.float32), affine),
                                bg_img=mni_template(), cut_coords=tuple(point_mm),
                                display_mode="ortho", axes=axes, figure=fig, title=title,
                                threshold=threshold, colorbar=True, draw_cross=False,
                                annotate=True, black_bg=True)


def attribution_figure(top_rows: Sequence[Mapping], volume: np.ndarray, brain: np.ndarray,
                       affine: np.ndarray, point_mm: Sequence[float]) -> plt.Figure:
  """Top regions by class contrast (bars coloured by system) and `volume` on the MNI
  template (nilearn), voxels under the brain's 75th percentile of |volume| left clear."""
  fig = plt.figure(figsize=(11, 7.4))
  bars = fig.add_axes((0.27, 0.47, 0.70, 0.48))
  systems = sorted({r["system"] for r in top_rows})
  colour = {s: plt.get_cmap("tab20")(i % 20) for i, s in enumerate(systems)}
  names = [r["name"] for r in top_rows][::-1]
  values = [r["contrast"] for r in top_rows][::-1]
  bars.barh(names, values, color=[colour[r["system"]] for r in top_rows][::-1])
  bars.set_xlabel("|ADHD - control| of the mean signed integrated gradients per voxel",
                  fontsize=8)
  bars.tick_params(labelsize=7)
  bars.set_title(f"top {len(top_rows)} regions for the ADHD logit", fontsize=9)
  handles = [plt.Rectangle((0, 0), 1, 1, color=colour[s]) for s in systems]
  bars.legend(handles, systems, fontsize=6, loc="lower right")
  inside = np.abs(volume[brain]) if brain.any() else np.zeros(1)
  threshold = float(np.percentile(inside, 75)) if inside.any() else None
  stat_map_on_template(fig, (0.02, 0.02, 0.96, 0.36), np.where(brain, volume, 0.0), affine,
                       point_mm, "ADHD - control (mean signed IG), top quarter of voxels",
                       threshold)
  return fig


def reconstruction_by_region_figure(rows: Sequence[Mapping], show: int = 15) -> plt.Figure:
  """Best and worst reconstructed regions (MSE when masked alone) and the system means."""
  fig, axes = plt.subplots(1, 3, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1, 0.9]})
  for ax, part, title in ((axes[0], rows[:show], "best reconstructed"),
                          (axes[1], rows[-show:], "worst reconstructed")):
    ax.barh([r["name"] for r in part][::-1], [r["mse"] for r in part][::-1], color="C0")
    ax.set_title(f"{title} ({len(part)} of {len(rows)})", fontsize=9)
    ax.set_xlabel("MSE on the region's tokens, region masked alone", fontsize=7)
    ax.tick_params(labelsize=7)
  systems = sorted({r["system"] for r in rows})
  means = [np.mean([r["mse"] for r in rows if r["system"] == s]) for s in systems]
  order = np.argsort(means)[::-1]
  axes[2].barh([systems[i] for i in order], [means[i] for i in order], color="0.4")
  axes[2].set_title("mean MSE per system", fontsize=9)
  axes[2].tick_params(labelsize=7)
  fig.tight_layout()
  return fig


def compare_figure(results: Mapping) -> plt.Figure:
  """Balanced accuracy and AUC per row (mean ± std over seeds x folds), a panel per evaluation."""
  evaluations = results["evaluations"]
  fig, axes = plt.subplots(1, len(evaluations), figsize=(4.2 * len(evaluations), 3.6),
                           squeeze=False)
  for ax, (evaluation, table) in zip(axes[0], evaluations.items()):
    strategies = list(table)
    x = np.arange(len(strategies))
    for k, (metric, label) in enumerate((("balanced_accuracy", "balanced acc."),
                                         ("roc_auc", "AUC"))):
      means = [table[s][metric]["mean"] for s in strategies]
      stds = [table[s][metric]["std"] for s in strategies]
      ax.bar(x + (k - 0.5) * 0.38, means, 0.36, yerr=stds, capsize=3, label=label)
    ax.axhline(0.5, color="0.6", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, strategies)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{evaluation} (baseline {results['baseline']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  return fig


def pretraining_curve_figure(curve: Mapping, metric: str = "balanced_accuracy") -> plt.Figure:
  """Score against pretraining steps (mean and 95% interval), a panel per read-out,
  a line per strategy; the classical baselines as horizontal bands."""
  readouts = list(dict.fromkeys(row["readout"] for row in curve["rows"].values()))
  fig, axes = plt.subplots(1, len(readouts), figsize=(3.8 * len(readouts), 3.4),
                           squeeze=False, sharey=True)
  for ax, readout in zip(axes[0], readouts):
    for k, row in enumerate(r for r in curve["rows"].values() if r["readout"] == readout):
      steps = sorted(int(b) for b in row["points"])
      points = [row["points"][str(b)][metric] for b in steps]
      ax.plot(steps, [p["mean"] for p in points], "o-", color=f"C{k}", label=row["strategy"])
      ax.fill_between(steps, [p["ci_low"] for p in points], [p["ci_high"] for p in points],
                      color=f"C{k}", alpha=0.15)
    for k, (name, interval) in enumerate(curve["reference"].items()):
      ax.axhspan(interval[metric]["ci_low"], interval[metric]["ci_high"], color=f"C{k + 4}",
                 alpha=0.12)
      ax.axhline(interval[metric]["mean"], color=f"C{k + 4}", linestyle="--", linewidth=0.9,
                 label=name)
    ax.axhline(0.5, color="0.6", linestyle=":", linewidth=0.8)
    ax.set_xlabel("pretraining steps (0: initial weights)")
    ax.set_title(readout, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel(f"{metric.replace('_', ' ')} (k-fold, 95% CI)")
  axes[0, -1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  return fig


def recovery_figure(recovery: Mapping) -> plt.Figure:
  """Recovery R² of each region's network and own component against pretraining
  steps: a panel per component and region group, a line per layer and strategy."""
  panels = [(c, g) for c in ("network", "own") for g in ("effect", "other")]
  fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False,
                           sharey=True)
  styles = ("-", "--", ":", "-.")
  for ax, (component, group) in zip(axes[0], panels):
    for s, (strategy, by_budget) in enumerate(recovery.items()):
      steps = sorted(int(b) for b in by_budget)
      depth = len(by_budget[str(steps[0])][component][group])
      for layer in range(depth):
        values = [by_budget[str(b)][component][group][layer] for b in steps]
        ax.plot(steps, values, styles[s % len(styles)], color=f"C{layer}", marker="o",
                markersize=3, label=f"{strategy} layer {layer}")
    ax.set_title(f"{component} component, {group} regions", fontsize=9)
    ax.set_xlabel("pretraining steps")
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("held-out R² (linear read-out)")
  axes[0, -1].legend(fontsize=6, loc="best")
  fig.tight_layout()
  return fig


def loss_curve_figure(records: Sequence[Mapping[str, float]], title: str = "") -> plt.Figure:
  """Masked-token loss (log scale) and learning rate against step."""
  steps = [r["step"] for r in records]
  fig, ax = plt.subplots(figsize=(6, 3.6))
  ax.plot(steps, [r["loss"] for r in records], color="C0", label="loss (masked tokens)")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("MSE on masked tokens")
  ax.grid(alpha=0.3)
  lr_axis = ax.twinx()
  lr_axis.plot(steps, [r["learning_rate"] for r in records], color="C1", alpha=0.6,
               label="learning rate")
  lr_axis.set_ylabel("learning rate")
  ax.set_title(f"pretraining loss{', ' + title if title else ''}", fontsize=9)
  fig.legend(loc="upper right", fontsize=7)
  fig.tight_layout()
  return fig


def save(fig: plt.Figure, path: str, dpi: int = 110) -> None:
  """Writes a PNG and frees the figure (long processes draw many)."""
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
