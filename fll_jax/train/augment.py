"""On-device input preparation: sequence selection, resampling and the paper's augmentation.

Every lesion's volumes are resampled once through one affine map from the output grid
(input_size^3) into the stored patch (64^3): identity for evaluation (centre-aligned, so
64 -> 32 is an exact 2x2x2 mean), and a random rotation, flip, shift and scale in training,
shared by all sequences and by each image and its mask. An input at most a quarter of the
stored size samples the stored patch averaged over blocks first (64 -> 16: 2^3 blocks, so the
identity is an exact 4x4x4 mean), as trilinear samples alone would read 1 stored voxel in 8
and alias. Lighting change (gain and offset per sequence) and Gaussian noise then touch the
image channel only.
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections


def _rotation(angles: jax.Array) -> jax.Array:
    """Rotation matrix from three angles (radians) about the three axes."""
    cx, cy, cz = jnp.cos(angles)
    sx, sy, sz = jnp.sin(angles)
    rx = jnp.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = jnp.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = jnp.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_affine(rng: jax.Array, cfg: ml_collections.ConfigDict, zoom_max=1.0) -> tuple[jax.Array, jax.Array]:
    """A random (matrix, offset) in normalised [-1, 1] patch coordinates.

    The zoom is drawn from [scale_min, scale_max]; for a lesion cropped by the dilated rule
    (zoom_max > 1) with cfg.random_dilation, from [1, zoom_max] instead: the paper's random
    dilation, the margin around the lesion's box from the stored one down to about 0, and
    never a zoom out past the stored cube.
    """
    k_rot, k_flip, k_shift, k_scale = jax.random.split(rng, 4)
    limit = jnp.deg2rad(cfg.rotate_deg)
    matrix = _rotation(jax.random.uniform(k_rot, (3,), minval=-limit, maxval=limit))
    if cfg.flip:
        signs = jnp.where(jax.random.bernoulli(k_flip, 0.5, (3,)), -1.0, 1.0)
        matrix = matrix * signs[None, :]
    # Zooming in (scale > 1) samples a smaller region of the stored patch.
    dilate = cfg.random_dilation & (zoom_max > 1.0)
    low, high = jnp.where(dilate, 1.0, cfg.scale_min), jnp.where(dilate, zoom_max, cfg.scale_max)
    scale = jax.random.uniform(k_scale, (), minval=low, maxval=high)
    offset = jax.random.uniform(k_shift, (3,), minval=-2 * cfg.shift, maxval=2 * cfg.shift)
    return matrix / scale, offset


def _source_coords(matrix: jax.Array, offset: jax.Array, stored: int, out: int) -> jax.Array:
    """Coordinates [3, out, out, out] in stored-voxel units of every output voxel centre."""
    u = (jnp.arange(out, dtype=jnp.float32) + 0.5) / out * 2.0 - 1.0
    grid = jnp.stack(jnp.meshgrid(u, u, u, indexing="ij"))  # [3, o, o, o]
    mapped = jnp.einsum("ij,j...->i...", matrix, grid) + offset[:, None, None, None]
    return (mapped + 1.0) / 2.0 * stored - 0.5


def _resample(volumes: jax.Array, coords: jax.Array) -> jax.Array:
    """Trilinear samples [C, o, o, o] (float) of volumes [C, N, N, N] at shared coordinates [3, o, o, o].

    Edges are clamped, as scipy's mode "nearest". The gathers read the stored uint8 voxels and
    convert only what they fetch: converting whole 64^3 patches first cost the quick config's
    CPU train step a fifth of its time (docs/performance.md).
    """
    size = volumes.shape[1:]
    low = jnp.floor(coords)
    frac = coords - low
    low = low.astype(jnp.int32)
    total = 0.0
    for corner in itertools.product((0, 1), repeat=3):
        index = [jnp.clip(low[a] + corner[a], 0, size[a] - 1) for a in range(3)]
        weight = math.prod(frac[a] if corner[a] else 1 - frac[a] for a in range(3))
        total = total + weight * volumes[:, index[0], index[1], index[2]].astype(jnp.float32)
    return total


def _block_sums(volumes: jax.Array, block: int) -> jax.Array:
    """[C, N, N, N] uint8 -> [C, N/b, N/b, N/b] integer sums of b^3 blocks (no float copy of the
    whole patch). Strided slices added axis by axis: 6x faster on XLA:CPU than a reshaped sum."""
    x = volumes.astype(jnp.uint16 if 255 * block**3 < 2**16 else jnp.uint32)
    for axis in (1, 2, 3):
        x = sum(jax.lax.slice_in_dim(x, k, None, block, axis) for k in range(block))
    return x


def _pool_block(stored: int, out: int) -> int:
    """Side of the blocks averaged before sampling: half the stored-to-input ratio where it divides."""
    block = stored // (2 * out)
    return block if block > 1 and stored % (2 * out) == 0 else 1


def _lesion_inputs(image, mask, zoom_max, rng, cfg, out: int, train: bool):
    """[S, N, N, N] uint8 image and mask -> [S, out, out, out, 2] floats (voxels / 255)."""
    stored = image.shape[-1]
    k_affine, k_gain, k_bias, k_noise = jax.random.split(rng, 4)
    if train:
        matrix, offset = random_affine(k_affine, cfg, zoom_max)
    else:
        matrix, offset = jnp.eye(3), jnp.zeros(3)
    if train or out != stored:
        block = _pool_block(stored, out)
        if block > 1:
            image, mask = _block_sums(image, block), _block_sums(mask, block)
        coords = _source_coords(matrix, offset, stored // block, out)
        image, mask = (_resample(v, coords) / block**3 for v in (image, mask))
    image, mask = image.astype(jnp.float32) / 255.0, mask.astype(jnp.float32) / 255.0
    if train:
        num_seq = image.shape[0]
        gain = jax.random.uniform(k_gain, (num_seq, 1, 1, 1), minval=1 - cfg.intensity, maxval=1 + cfg.intensity)
        bias = jax.random.uniform(k_bias, (num_seq, 1, 1, 1), minval=-cfg.intensity, maxval=cfg.intensity)
        image = image * gain + bias + cfg.noise_std * jax.random.normal(k_noise, image.shape)
    return jnp.stack([image, mask], axis=-1)


def drop_sequences(x: jax.Array, rng: jax.Array, rate: float) -> jax.Array:
    """Hide each present sequence of each lesion with probability `rate`, never all of a lesion's.

    x: [B, S, D, H, W, 2] network inputs; a hidden sequence becomes all zeros (both channels),
    which the model reads as absent.
    """
    present = jnp.any(x[..., -1] > 0, axis=(2, 3, 4))
    draw = jax.random.uniform(rng, present.shape)
    keep = present & (draw >= rate)
    # A lesion that would lose every sequence keeps the present one with the largest draw.
    best = jax.nn.one_hot(jnp.argmax(jnp.where(present, draw, -1.0), axis=1), present.shape[1], dtype=bool)
    keep = jnp.where(keep.any(axis=1, keepdims=True), keep, best & present)
    return x * keep[:, :, None, None, None, None].astype(x.dtype)


def prepare_inputs(
    batch: dict,
    seq_indices: tuple[int, ...],
    input_size: int,
    rng: jax.Array | None = None,
    cfg: ml_collections.ConfigDict | None = None,
) -> jax.Array:
    """Network input [B, S_used, M, M, M, 2] from uint8 batch arrays [B, 7, N, N, N].

    With rng and cfg (cfg.enabled true) the lesion is augmented; otherwise only resampled.
    Sequences the batch's `present` [B, 7] marks absent are all zeros (both channels).
    """
    idx = jnp.asarray(seq_indices)
    image, mask = batch["image"][:, idx], batch["mask"][:, idx]
    train = rng is not None and cfg is not None and cfg.enabled
    rngs = jax.random.split(rng if rng is not None else jax.random.key(0), image.shape[0])
    zoom_max = batch.get("zoom_max", jnp.ones(image.shape[0]))
    fn = lambda im, ma, z, r: _lesion_inputs(im, ma, z, r, cfg, input_size, train)
    x = jax.vmap(fn)(image, mask, zoom_max, rngs)
    if "present" in batch:
        x = x * batch["present"][:, idx, None, None, None, None].astype(x.dtype)
    return x
