"""The 3D ResNet backbone (basic blocks; depths 10, 18 and 34) and the backbone registry."""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fll_jax.models.conv import Conv3D
from fll_jax.models.registry import lookup

STAGE_SIZES: dict[int, tuple[int, ...]] = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
SHORTCUTS = ("A", "B")
DTYPES: dict[str, Any] = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    # PyTorch's defaults (momentum 0.1 there is 0.9 here), so the paper's recipe carries over.
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name
    )


def _sample_mask(mask: jax.Array | None, ndim: int) -> jax.Array | None:
    """[B] bool -> broadcastable over [B, D, H, W, C]; None keeps every sample in the statistics."""
    return None if mask is None else mask.reshape(mask.shape + (1,) * (ndim - 1))


class BasicBlock(nn.Module):
    """Two 3^3 convolutions with batch norm and a residual connection.

    Attributes:
      features: output channels.
      stride: of the first convolution and of the shortcut.
      shortcut: 'B' projects (1^3 conv + BN) when the shape changes; 'A' subsamples and
        zero-pads the channels (no parameters).
      space_to_depth: compute the strided convolutions over 2^3 blocks (same values).
      dtype: compute dtype.
      fold_depth: compute every convolution as a 2D one with the depth taps in channels (same values).
    """

    features: int
    stride: int = 1
    shortcut: str = "B"
    space_to_depth: bool = False
    dtype: Any = jnp.float32
    fold_depth: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """mask: [B] bool, the samples batch norm's training statistics come from (None: all)."""
        conv = functools.partial(Conv3D, space_to_depth=self.space_to_depth, dtype=self.dtype,
                                 fold_depth=self.fold_depth)
        mask = _sample_mask(mask, x.ndim)
        y = conv(self.features, 3, self.stride, name="conv1")(x)
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y, mask=mask))
        y = conv(self.features, 3, 1, name="conv2")(y)
        y = _batch_norm(train, self.dtype, "bn2")(y, mask=mask)
        residual = x.astype(self.dtype)
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.shortcut == "B":
                residual = conv(self.features, 1, self.stride, name="shortcut_conv")(x)
                residual = _batch_norm(train, self.dtype, "shortcut_bn")(residual, mask=mask)
            else:
                s = self.stride
                residual = residual[:, ::s, ::s, ::s]
                pad = self.features - residual.shape[-1]
                residual = jnp.pad(residual, [(0, 0)] * 4 + [(0, pad)])
        return nn.relu(y + residual)


class ResNet3D(nn.Module):
    """3D ResNet: stem convolution, BN, ReLU, 3^3 max-pool, four stages of basic blocks.

    Returns the last stage's feature map [B, d, h, w, 8 * width] in the compute dtype. In
    training, batch norm's statistics come from the samples of `mask` ([B] bool) when given.

    Attributes:
      depth: 10, 18 or 34.
      width: channels of the first stage; the stages have width * (1, 2, 4, 8).
      stem_kernel: odd side of the stem convolution's kernel.
      stem_stride: stride of the stem convolution.
      shortcut: 'B' (projection) or 'A' (zero-padded identity).
      space_to_depth: compute every strided convolution over blocks (same values, faster).
      dtype: 'bfloat16' or 'float32' compute; parameters are float32 either way.
      fold_depth: compute every convolution as a 2D one with the depth taps in channels (same
        values, faster on XLA:CPU).
    """

    depth: int = 18
    width: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    shortcut: str = "B"
    space_to_depth: bool = False
    dtype: str = "float32"
    fold_depth: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        stages = lookup(STAGE_SIZES, self.depth, "ResNet depth")
        lookup({s: s for s in SHORTCUTS}, self.shortcut, "shortcut type")
        dtype = lookup(DTYPES, self.dtype, "dtype")
        x = stem(x, self.width, self.stem_kernel, self.stem_stride, self.space_to_depth, dtype, train, self.fold_depth,
                 mask)
        for index, blocks in enumerate(stages):
            x = stage(x, index, blocks, self.width, self.shortcut, self.space_to_depth, dtype, train, self.fold_depth,
                      mask)
        return x


# The two parts of ResNet3D, as functions that create their layers in the calling module (so
# experiments/profile_step.py can time each alone under the same parameter names).
def stem(x: jax.Array, width: int, kernel: int, stride: int, space_to_depth: bool, dtype: Any, train: bool,
         fold_depth: bool = False, mask: jax.Array | None = None) -> jax.Array:
    """Stem convolution, BN, ReLU and the 3^3 stride-2 max-pool."""
    x = Conv3D(width, kernel, stride, space_to_depth, dtype, fold_depth, name="stem_conv")(x)
    x = nn.relu(_batch_norm(train, dtype, "stem_bn")(x, mask=_sample_mask(mask, x.ndim)))
    return nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=((1, 1),) * 3)


def stage(x: jax.Array, index: int, blocks: int, width: int, shortcut: str, space_to_depth: bool, dtype: Any,
          train: bool, fold_depth: bool = False, mask: jax.Array | None = None) -> jax.Array:
    """Stage `index` (0-3): `blocks` basic blocks of width * 2**index channels, the first strided after stage 0."""
    for block in range(blocks):
        x = BasicBlock(
            width * 2**index,
            stride=2 if index > 0 and block == 0 else 1,
            shortcut=shortcut,
            space_to_depth=space_to_depth,
            dtype=dtype,
            fold_depth=fold_depth,
            name=f"stage{index + 1}_block{block + 1}",
        )(x, train, mask)
    return x


# Backbones by name: each factory takes the model config's backbone keys and returns an
# unbound module called as (x [B, D, H, W, C], train, mask [B] bool or None) that returns a
# feature map [B, d, h, w, F], its training batch norm statistics from the masked samples only.
BACKBONES: dict[str, Callable[..., nn.Module]] = {"resnet": ResNet3D}
