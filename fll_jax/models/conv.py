"""3D convolution with PyTorch-style padding, computed directly or by space-to-depth.

Space-to-depth (docs/performance.md, "Decisions"): a stride-s convolution equals a
stride-1 convolution over the s x s x s blocks of the input, with each block's voxels moved
into channels and the kernel zero-padded and regrouped the same way. The parameter keeps its
natural [k, k, k, C_in, C_out] shape; only the forward pass changes.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fll_jax.models.initializers import variance_scaling_flat

DIMENSION_NUMBERS = ("NDHWC", "DHWIO", "NDHWC")
# He initialisation on fan-out, as torchvision's (and MedicalNet's) ResNets.
KERNEL_INIT = variance_scaling_flat(2.0, "fan_out")


def conv3d(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Convolution with padding k // 2 on every side (PyTorch's for odd k), strided directly."""
    pad = kernel.shape[0] // 2
    return lax.conv_general_dilated(
        x, kernel, (stride,) * 3, [(pad, pad)] * 3, dimension_numbers=DIMENSION_NUMBERS
    )


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


def conv3d_s2d(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Same values as conv3d(x, kernel, stride), computed as a stride-1 convolution over blocks."""
    if kernel.shape[0] == 1:
        # A 1^3 kernel reads only offset 0 of each block: subsample, then a 1^3 convolution.
        return conv3d(x[:, ::stride, ::stride, ::stride], kernel, 1)
    _, _, low, high = s2d_geometry(kernel.shape[0], stride)
    return lax.conv_general_dilated(
        space_to_depth(x, stride),
        kernel_to_depth(kernel, stride),
        (1, 1, 1),
        [(low, high)] * 3,
        dimension_numbers=DIMENSION_NUMBERS,
    )


class Conv3D(nn.Module):
    """Bias-free cubic convolution; `space_to_depth` changes how a strided one is computed.

    Attributes:
      features: output channels.
      kernel_size: odd side of the cubic kernel (padding kernel_size // 2, as PyTorch).
      stride: the same on every axis.
      space_to_depth: compute a strided convolution over stride^3 blocks (same values).
      dtype: compute dtype; the kernel parameter is always float32.
    """

    features: int
    kernel_size: int
    stride: int = 1
    space_to_depth: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        if k % 2 != 1:
            raise ValueError(f"Conv3D needs an odd kernel size for k // 2 padding, got {k}")
        kernel = self.param("kernel", KERNEL_INIT, (k, k, k, x.shape[-1], self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.space_to_depth and self.stride > 1:
            return conv3d_s2d(x, kernel, self.stride)
        return conv3d(x, kernel, self.stride)
