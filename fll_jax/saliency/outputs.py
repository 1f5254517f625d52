"""Per-lesion outputs: overlay PNG, sequence-importance bars, NIfTI maps in native space."""
from __future__ import annotations

from itertools import product
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from fll_jax.constants import SEQUENCE_NAMES
from fll_jax.data.nifti_units import affine_mm
from fll_jax.files import save_figure, write_nifti
from fll_jax.saliency.importance import SequenceImportance


def input_grid_affine(patch_affine: np.ndarray, stored: int, size: int) -> np.ndarray:
    """Voxel -> world affine of the network's input grid (size^3) resampled from a stored patch.

    prepare_inputs samples input voxel o at stored coordinate (o + 0.5) * stored / size - 0.5
    (centre-aligned), so the map is patch_affine composed with that scaling.
    """
    scale = stored / size
    to_stored = np.diag([scale, scale, scale, 1.0])
    to_stored[:3, 3] = 0.5 * scale - 0.5
    return np.asarray(patch_affine, np.float64) @ to_stored


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the world's superior-inferior axis (axial slices cut it)."""
    return int(np.argmax(np.abs(np.asarray(affine)[2, :3]) / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))


def largest_lesion_slice(mask: np.ndarray, axis: int = 2, threshold: float = 0.5) -> int:
    """Index along `axis` of the slice with the largest lesion area, summed over sequences.

    mask: [S, D, H, W] or [D, H, W] blurred masks in [0, 1]; the lesion is mask > threshold.
    """
    mask = np.asarray(mask)
    mask = mask[None] if mask.ndim == 3 else mask
    inside = mask > threshold
    axes = tuple(a + 1 for a in range(3) if a != axis)
    area = inside.sum(axis=(0,) + axes)
    if area.max() == 0:
        # No voxel above the threshold: fall back to the mask's mass.
        area = mask.sum(axis=(0,) + axes)
    return int(np.argmax(area))


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    # Transposed with origin 'lower': first in-plane axis horizontal, as viewers show RAS data.
    return np.take(volume, index, axis=axis).T


def lesion_figure(
    image: np.ndarray,
    mask: np.ndarray,
    attributions: np.ndarray,
    sequences: Sequence[str],
    path: str | Path,
    *,
    title: str,
    axis: int = 2,
    slice_index: int | None = None,
) -> int:
    """PNG: every used sequence on the slice of largest lesion area, attribution overlaid.

    The signed attribution is drawn red (supports the class) / blue (against) on one colour
    scale shared by all sequences, so panels compare; the lesion outline is drawn in green, and
    a sequence the lesion lacks (no mask anywhere) is titled absent. Returns the slice index shown.
    """
    index = largest_lesion_slice(mask, axis) if slice_index is None else slice_index
    limit = float(np.abs(np.take(attributions, index, axis=axis + 1)).max()) or 1.0
    fig = Figure(figsize=(2.2 * len(sequences), 2.6), layout="constrained")
    axes = fig.subplots(1, len(sequences), squeeze=False)[0]
    for ax, name, img, msk, att in zip(axes, sequences, image, mask, attributions):
        ax.imshow(_slice(img, axis, index), cmap="gray", origin="lower", vmin=0.0, vmax=1.0)
        heat = _slice(att, axis, index)
        # Opacity grows with magnitude so that near-zero attribution leaves the image visible.
        alpha = np.clip(np.abs(heat) / limit, 0.0, 1.0) * 0.8
        ax.imshow(heat, cmap="bwr", origin="lower", vmin=-limit, vmax=limit, alpha=alpha)
        # Default X, Y put Z[i, j] at pixel centre (j, i), as imshow does; origin= would shift it by half a pixel.
        ax.contour(_slice(msk, axis, index), levels=[0.5], colors="lime", linewidths=0.6)
        ax.set_title(SEQUENCE_NAMES.get(name, name) + ("" if msk.any() else " (absent)"), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110)
    return index


def importance_figure(importance: SequenceImportance, path: str | Path, *, title: str, share_label: str,
                      present: Sequence[bool] | None = None) -> Figure:
    """Bar chart: the map's attribution share and the occlusion share per sequence, side by side.

    share_label names the map whose share the first bars show (e.g. '|IG| share'), since
    importance.attribution_share is that of whichever map was computed; a sequence not `present`
    is labelled absent (its bars are zero). Returns the saved Figure.
    """
    present = [True] * len(importance.sequences) if present is None else present
    names = [SEQUENCE_NAMES.get(s, s) + ("" if p else "\n(absent)") for s, p in zip(importance.sequences, present)]
    pos = np.arange(len(names))
    fig = Figure(figsize=(1.6 + 0.8 * len(names), 3.4), layout="constrained")
    ax = fig.subplots()
    ax.bar(pos - 0.2, importance.attribution_share, 0.4, label=share_label, color="tab:red")
    ax.bar(pos + 0.2, importance.occlusion_share, 0.4, label="occlusion: share of the drops in F", color="tab:gray")
    ax.set_xticks(pos, names)
    ax.set_ylabel("share")
    ax.set_ylim(0, 1)
    # Below the axes: a legend inside would hide the bars of a narrow chart.
    fig.legend(fontsize=8, loc="outside lower center")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path, dpi=110)
    return fig


def patch_to_native(
    volume: np.ndarray, patch_affine: np.ndarray, native_shape: Sequence[int], native_affine: np.ndarray
) -> np.ndarray:
    """Resample a patch map [D, H, W] into a native grid (linear, zero outside the patch).

    For every native voxel: world = native_affine @ ijk, patch voxel = inv(patch_affine) @ world.
    Only the native voxels inside the patch's bounding box are computed.
    """
    volume = np.asarray(volume, np.float32)
    native_shape = tuple(int(n) for n in native_shape[:3])
    patch_to_vox = np.linalg.inv(np.asarray(native_affine, np.float64)) @ np.asarray(patch_affine, np.float64)
    corners = np.array(list(product(*[(-0.5, n - 0.5) for n in volume.shape])))
    reach = corners @ patch_to_vox[:3, :3].T + patch_to_vox[:3, 3]
    lo = np.maximum(np.floor(reach.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(reach.max(axis=0)).astype(int) + 1, native_shape)
    out = np.zeros(native_shape, np.float32)
    if np.any(hi <= lo):
        return out
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"))
    vox_to_patch = np.linalg.inv(patch_to_vox)
    coords = np.einsum("ij,j...->i...", vox_to_patch[:3, :3], grid) + vox_to_patch[:3, 3, None, None, None]
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = ndimage.map_coordinates(
        volume, coords, order=1, mode="constant", cval=0.0
    )
    return out


def write_native_map(
    volume: np.ndarray, patch_affine: np.ndarray, native_image: str | Path | nib.Nifti1Image, path: str | Path
) -> Path:
    """Write a patch map as NIfTI on the native image's grid (its shape, and its affine in mm, as
    the patch's: a header in metres would otherwise place the map 1,000 times too close)."""
    native = nib.load(native_image) if isinstance(native_image, (str, Path)) else native_image
    affine = affine_mm(native)
    return write_nifti(patch_to_native(volume, patch_affine, native.shape, affine), affine, path)
