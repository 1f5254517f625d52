"""3D convolution with PyTorch-style padding, computed directly or by space-to-depth, natively or folded.

Space-to-depth (docs/performance.md, "Decisions"): a stride-s convolution equals a
stride-1 convolution over the s x s x s blocks of the input, with each block's voxels moved
into channels and the kernel zero-padded and regrouped the same way. The parameter keeps its
natural [k, k, k, C_in, C_out] shape; only the forward pass changes.

Folding the depth: a 3D convolution equals a 2D convolution over (H, W) of every output depth
slice whose channels stack the k input slices its kernel reads, with the kernel's depth taps
moved into its input channels the same way. XLA:CPU computes 2D convolutions several times
faster than 3D ones (docs/performance.md), so on the CPU every convolution is folded.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fll_jax.models.initializers import variance_scaling_flat

DIMENSION_NUMBERS = ("NDHWC", "DHWIO", "NDHWC")
# How the convolutions are computed (config.model.conv_impl): 'auto' folds on the CPU only.
CONV_IMPLS = ("auto", "native", "folded")
# He initialisation on fan-out, as torchvision's (and MedicalNet's) ResNets.
KERNEL_INIT = variance_scaling_flat(2.0, "fan_out")


def folds_depth(conv_impl: str) -> bool:
    """Whether convolutions of implementation `conv_impl` (one of CONV_IMPLS) are folded here."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"unknown convolution implementation {conv_impl!r}; known: {', '.join(CONV_IMPLS)}")
    return conv_impl == "folded" or (conv_impl == "auto" and jax.default_backend() == "cpu")


def conv_volume(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int], fold_depth: bool) -> jax.Array:
    """3D convolution [B, D, H, W, C] * [k, k, k, C, F] with the same stride and (low, high) padding on every axis."""
    if not fold_depth:
        return lax.conv_general_dilated(x, kernel, (stride,) * 3, [padding] * 3, dimension_numbers=DIMENSION_NUMBERS)
    taps, _, _, c, f = kernel.shape
    x = jnp.pad(x, [(0, 0), padding, (0, 0), (0, 0), (0, 0)])
    depth = (x.shape[1] - taps) // stride + 1
    # Output slice d reads input slices stride * d + t for taps t: stack them in channels, tap-major.
    reads = [x[:, t:t + stride * (depth - 1) + 1:stride] for t in range(taps)]
    stacked = jnp.concatenate(reads, axis=-1) if taps > 1 else reads[0]
    b, _, h, w, _ = stacked.shape
    kernel = jnp.moveaxis(kernel, 0, 2).reshape(kernel.shape[1], kernel.shape[2], taps * c, f)
    y = lax.conv_general_dilated(stacked.reshape(b * depth, h, w, taps * c), kernel, (stride,) * 2, [padding] * 2,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, depth, *y.shape[1:])


def conv3d(x: jax.Array, kernel: jax.Array, stride: int, fold_depth: bool = False) -> jax.Array:
    """Convolution with padding k // 2 on every side (PyTorch's for odd k), strided directly."""
    pad = kernel.shape[0] // 2
    return conv_volume(x, kernel, stride, (pad, pad), fold_depth)


def s2d_geometry(kernel_size: int, stride: int) -> tuple[int, int, int, int]:
    """(zero taps in front, blocked kernel size, low pad, high pad) of the blocked convolution.

    Output i of the direct convolution reads input stride * i + t - pad for taps t. With
    `front` zero taps prepended, pad + front is a multiple of the stride, so tap t lands in
    block i + (t + front) // stride - (pad + front) // stride at offset (t + front) % stride.
    """
    pad = kernel_size // 2
    front = -pad % stride
    low = (pad + front) // stride
    taps = low + -(-(pad + 1) // stride)  # low + ceil((pad + 1) / stride)
    return front, taps, low, taps - 1 - low


def space_to_depth(x: jax.Array, stride: int) -> jax.Array:
    """[B, D, H, W, C] -> [B, D', H', W', s^3 C], zero-padding each side up to a multiple of s.

    The padding only adds zeros where the direct convolution also reads zeros (its own padding),
    so odd sizes give the same ceil(n / s) outputs.
    """
    b, c = x.shape[0], x.shape[-1]
    x = jnp.pad(x, [(0, 0)] + [(0, -n % stride) for n in x.shape[1:4]] + [(0, 0)])
    d, h, w = (n // stride for n in x.shape[1:4])
    x = x.reshape(b, d, stride, h, stride, w, stride, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, d, h, w, stride**3 * c)


def kernel_to_depth(kernel: jax.Array, stride: int) -> jax.Array:
    """[k, k, k, C, F] -> [K, K, K, s^3 C, F], the kernel of the blocked stride-1 convolution."""
    k, c, f = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    front, taps, _, _ = s2d_geometry(k, stride)
    back = taps * stride - k - front
    kernel = jnp.pad(kernel, [(front, back)] * 3 + [(0, 0), (0, 0)])
    kernel = kernel.reshape(taps, stride, taps, stride, taps, stride, c, f)
    kernel = kernel.transpose(0, 2, 4, 1, 3, 5, 6, 7)
    return kernel.reshape(taps, taps, taps, stride**3 * c, f)


def conv3d_s2d(x: jax.Array, kernel: jax.Array, stride: int, fold_depth: bool = False) -> jax.Array:
    """Same values as conv3d(x, kernel, stride), computed as a stride-1 convolution over blocks."""
    if kernel.shape[0] == 1:
        # A 1^3 kernel reads only offset 0 of each block: subsample, then a 1^3 convolution.
        return conv3d(x[:, ::stride, ::stride, ::stride], kernel, 1, fold_depth)
    _, _, low, high = s2d_geometry(kernel.shape[0], stride)
    return conv_volume(space_to_depth(x, stride), kernel_to_depth(kernel, stride), 1, (low, high), fold_depth)


class Conv3D(nn.Module):
    """Bias-free cubic convolution; `space_to_depth` changes how a strided one is computed.

    Attributes:
      features: output channels.
      kernel_size: odd side of the cubic kernel (padding kernel_size // 2, as PyTorch).
      stride: the same on every axis.
      space_to_depth: compute a strided convolution over stride^3 blocks (same values).
      dtype: compute dtype; the kernel parameter is always float32.
      fold_depth: compute it as a 2D convolution with the depth taps in channels (same values).
    """

    features: int
    kernel_size: int
    stride: int = 1
    space_to_depth: bool = False
    dtype: Any = jnp.float32
    fold_depth: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        if k % 2 != 1:
            raise ValueError(f"Conv3D needs an odd kernel size for k // 2 padding, got {k}")
        kernel = self.param("kernel", KERNEL_INIT, (k, k, k, x.shape[-1], self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.space_to_depth and self.stride > 1:
            return conv3d_s2d(x, kernel, self.stride, self.fold_depth)
        return conv3d(x, kernel, self.stride, self.fold_depth)
