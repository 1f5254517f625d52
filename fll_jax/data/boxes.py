"""Lesions given as boxes instead of masks: parsing, the inscribed ellipsoid, the diameter.

A box in array indices (``i0 j0 k0 i1 j1 k1``, first and last voxel inside, inclusive) or in
world millimetres (``x0 y0 z0 x1 y1 z1``, opposite corners, RAS+) stands for the lesion. Its
mask is the ellipsoid inscribed in the box: a voxel belongs to the lesion when its centre
satisfies sum(((p - c) / r)^2) <= 1, with c the box centre and r its half-sides (for an index
box, measured from the outer edges of its first and last voxels, so a 1-voxel-wide box keeps
its voxel). The lesion's diameter is the ellipsoid's equivalent-sphere diameter, the cube
root of the product of the box's three sides in mm, the same measure preprocessing takes from
a mask (fll_jax/data/preprocess.py), so a lesion measures the same whichever way it is given.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VoxelBox = tuple[int, int, int, int, int, int]
WorldBox = tuple[float, float, float, float, float, float]


def parse_voxel_box(text: str) -> VoxelBox:
    """'i0 j0 k0 i1 j1 k1' (non-negative integers, first <= last on each axis) -> a tuple."""
    parts = text.replace(",", " ").split()
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 6 or min(values) < 0 or any(values[a] > values[a + 3] for a in range(3)):
        raise ValueError(f"box {text!r} is not 'i0 j0 k0 i1 j1 k1' (0-based voxel indices, first <= last)")
    return values  # type: ignore[return-value]


def parse_world_box(text: str) -> WorldBox:
    """'x0 y0 z0 x1 y1 z1' (two opposite corners in mm, any order) -> (low corner, high corner)."""
    parts = text.replace(",", " ").split()
    try:
        values = np.array([float(v) for v in parts])
    except ValueError:
        values = np.array([])
    if values.size != 6 or not np.isfinite(values).all():
        raise ValueError(f"box_mm {text!r} is not 'x0 y0 z0 x1 y1 z1' (six finite numbers, mm)")
    lo, hi = np.minimum(values[:3], values[3:]), np.maximum(values[:3], values[3:])
    if (hi - lo <= 0).any():
        raise ValueError(f"box_mm {text!r} is flat: every side must be longer than 0 mm")
    return tuple(float(v) for v in (*lo, *hi))  # type: ignore[return-value]


def format_box(box: Sequence[float]) -> str:
    """The manifest's text of a box (the inverse of the parsers)."""
    return " ".join(str(int(v)) if isinstance(v, (int, np.integer)) else repr(float(v)) for v in box)


def voxel_box_problem(box: VoxelBox, shape: Sequence[int]) -> str | None:
    """Why a voxel box does not fit an image of this shape, or None."""
    if any(box[a + 3] >= shape[a] for a in range(3)):
        return f"box {format_box(box)} reaches outside the image (shape {tuple(shape)})"
    return None


def voxel_box_ellipsoid(box: VoxelBox, shape: Sequence[int]) -> np.ndarray:
    """uint8 mask of the ellipsoid inscribed in a voxel box."""
    lo, hi = np.array(box[:3], float), np.array(box[3:], float)
    centre, radius = (lo + hi) / 2, (hi - lo + 1) / 2
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius)) <= 1.0
    return inside.astype(np.uint8)


def world_box_ellipsoid(box: WorldBox, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """uint8 mask, on the grid (shape, affine), of the ellipsoid inscribed in a world box."""
    lo, hi = np.array(box[:3]), np.array(box[3:])
    centre, radius = (lo + hi) / 2, (hi - lo) / 2
    # Only the voxels between the box's corners can be inside: the whole grid had taken 80 bytes a
    # voxel (4 GB for a 512 x 512 x 200 volume) for a lesion of a few hundred voxels.
    inverse = np.linalg.inv(affine)
    corners = np.stack(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)
    corner_ijk = inverse[:3, :3] @ corners + inverse[:3, 3:]
    start = np.clip(np.floor(corner_ijk.min(1)).astype(int), 0, shape)
    stop = np.maximum(np.clip(np.ceil(corner_ijk.max(1)).astype(int) + 1, 0, shape), start)
    ijk = np.indices(stop - start).reshape(3, -1) + start[:, None]
    world = affine[:3, :3] @ ijk + affine[:3, 3:]
    inside = (((world - centre[:, None]) / radius[:, None]) ** 2).sum(0) <= 1.0
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = inside.reshape(stop - start)
    return mask


def world_box_overhang(box: WorldBox, shape: Sequence[int], affine: np.ndarray) -> float:
    """How many voxels the ellipsoid inscribed in a world box reaches beyond the image's edge (the
    outer faces of its outermost voxels) along the voxel axis where it reaches furthest; 0 inside."""
    lo, hi = np.array(box[:3]), np.array(box[3:])
    inverse = np.linalg.inv(affine)
    centre = inverse[:3, :3] @ ((lo + hi) / 2) + inverse[:3, 3]
    # An axis-aligned ellipsoid's extent along a direction n is n.c +- |n * radii| (its support).
    half = np.linalg.norm(inverse[:3, :3] * ((hi - lo) / 2)[None, :], axis=1)
    beyond = np.maximum(-0.5 - (centre - half), centre + half - (np.asarray(shape) - 0.5))
    return float(max(beyond.max(), 0.0))


def voxel_box_sides_mm(box: VoxelBox, affine: np.ndarray) -> np.ndarray:
    """Side lengths in mm of a voxel box (voxel counts times the length of each voxel axis)."""
    counts = np.array(box[3:], float) - np.array(box[:3], float) + 1
    return counts * np.linalg.norm(affine[:3, :3], axis=0)


def equivalent_diameter_mm(sides_mm: Sequence[float]) -> float:
    """Diameter of the sphere with the volume of the ellipsoid inscribed in a box of these sides."""
    return float(np.cbrt(np.prod(sides_mm)))


def bounding_box(mask: np.ndarray) -> VoxelBox:
    """The voxel box (first and last index on each axis, inclusive) of a mask's non-zero voxels."""
    ijk = np.argwhere(mask)
    if not len(ijk):
        raise ValueError("an empty mask has no bounding box")
    return tuple(int(v) for v in (*ijk.min(0), *ijk.max(0)))  # type: ignore[return-value]
