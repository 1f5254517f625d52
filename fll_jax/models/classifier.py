"""The multi-sequence classifier: one backbone branch per used sequence, then a fusion."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fll_jax.constants import sequence_index
from fll_jax.models.conv import folds_depth
from fll_jax.models.fusion import FUSIONS
from fll_jax.models.registry import lookup
from fll_jax.models.resnet3d import BACKBONES, DTYPES, SHORTCUTS, STAGE_SIZES


class Branch(nn.Module):
    """One sequence's path: backbone feature map (sown for Grad-CAM), then global average pool.
    With backbone None, x is that feature map already (a shared backbone computed it)."""

    backbone: nn.Module | None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        fmap = self.backbone(x, train, mask) if self.backbone is not None else x
        self.sow("intermediates", "stage4", fmap)
        return jnp.mean(fmap.astype(jnp.float32), axis=(1, 2, 3))


def _statistics_mask(present: jax.Array) -> jax.Array:
    """The samples batch norm's training statistics come from: the present images, so that the
    zeros standing in for absent sequences (missing data, sequence dropout) do not shift them;
    all of them when none is present (their statistics are then those of zeros, not 0/0, and the
    train step keeps that branch's running averages: fll_jax.train.step.keep_unseen_statistics)."""
    return present | ~jnp.any(present)


# Which images batch norm's training statistics come from (model.batch_norm_statistics). Unset:
# the present ones. 'all': every image, zeros of absent sequences too; on complete data without
# sequence dropout the same statistics, without the mask's cost (docs/performance.md). One
# spelling per choice: a run recorded unset is not refused when resumed with the default named.
BATCH_NORM_STATISTICS = {None: _statistics_mask, "all": lambda present: None}


class MultiSequenceClassifier(nn.Module):
    """Input [B, S, D, H, W, C] (the used sequences in `sequences` order) -> dict of outputs.

    A lesion lacks a sequence when that sequence's mask channel (the last) is zero everywhere
    (a present lesion always has its blurred mask in the patch): the branch's features are then
    zero, its batch norm statistics in training come from the lesions that have it, and the
    fusion is told which sequences are present.

    Outputs: logits2 [B, 2] and logits7 [B, 7] (float32), features [B, S, F] (float32, zero for
    absent sequences), present [B, S] bool, and sequence_weights [B, S] for the fusions that
    compute them. The branches are a Python loop of
    submodules named branch_<seq> (nn.vmap turns them into grouped convolutions, 5x slower on
    an H100); with a shared-backbone fusion one module named 'backbone' runs on all sequences'
    images at once, and each branch pools its part.
    """

    sequences: tuple[str, ...]
    fusion: str = "paper"
    dropout: float = 0.0
    backbone: str = "resnet"
    depth: int = 18
    width: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    shortcut: str = "B"
    space_to_depth: bool = False
    dtype: str = "float32"
    fold_depth: bool = False
    attention_hidden: int | None = None  # the attention fusions' scoring width; None: their default
    batch_norm_statistics: str | None = None  # a key of BATCH_NORM_STATISTICS; None: the present images

    def _backbone(self, **kwargs) -> nn.Module:
        return lookup(BACKBONES, self.backbone, "backbone")(
            depth=self.depth,
            width=self.width,
            stem_kernel=self.stem_kernel,
            stem_stride=self.stem_stride,
            shortcut=self.shortcut,
            space_to_depth=self.space_to_depth,
            dtype=self.dtype,
            fold_depth=self.fold_depth,
            **kwargs,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict:
        if x.ndim != 6 or x.shape[1] != len(self.sequences):
            raise ValueError(
                f"input must be [B, {len(self.sequences)} sequences ({', '.join(self.sequences)}), D, H, W, C], "
                f"got shape {x.shape}"
            )
        fusion = lookup(FUSIONS, self.fusion, "fusion")
        statistics_mask = BATCH_NORM_STATISTICS[self.batch_norm_statistics]
        present = jnp.any(x[..., -1] > 0, axis=(2, 3, 4))
        if fusion.shared_backbone:
            # One call on every sequence's images: batch norm's batch statistics are then those of
            # all sequences, as are the running averages every sequence updates (a call per
            # sequence normalised each by its own statistics in training, by their mixture after).
            b, s = x.shape[:2]
            fmaps = self._backbone(name="backbone")(
                x.reshape((b * s,) + x.shape[2:]), train, statistics_mask(present.reshape(b * s)))
            fmaps = fmaps.reshape((b, s) + fmaps.shape[1:])
            feats = [Branch(None, name=f"branch_{seq}")(fmaps[:, i], train) for i, seq in enumerate(self.sequences)]
        else:
            # parent=None: an unbound backbone, adopted by its branch (params under branch_<seq>).
            feats = [Branch(self._backbone(parent=None), name=f"branch_{seq}")(
                         x[:, i], train, statistics_mask(present[:, i]))
                     for i, seq in enumerate(self.sequences)]
        feats = jnp.where(present[..., None], jnp.stack(feats, axis=1), 0.0)
        options = {"attention_hidden": self.attention_hidden} if fusion.pools_by_attention else {}
        outputs = fusion(self.sequences, self.dropout, **options, name="fusion")(feats, present, train)
        return dict(outputs, features=feats, present=present)


def build_model(model_config: ml_collections.ConfigDict, sequences: Sequence[str]) -> MultiSequenceClassifier:
    """The classifier for a model config (keys as configs/paper.py's `model`) and used sequences."""
    sequences = tuple(sequences)
    if not sequences:
        raise ValueError("the model needs at least one sequence")
    for seq in sequences:
        sequence_index(seq)
    if len(set(sequences)) != len(sequences):
        raise ValueError(f"sequences repeat: {', '.join(sequences)}")
    backbone = model_config.get("backbone", "resnet")
    # Fail at build time, not at the first trace, on any unknown name.
    lookup(BACKBONES, backbone, "backbone")
    lookup(FUSIONS, model_config.fusion, "fusion")
    lookup(STAGE_SIZES, model_config.depth, "ResNet depth")
    lookup({s: s for s in SHORTCUTS}, model_config.shortcut, "shortcut type")
    lookup(DTYPES, model_config.dtype, "dtype")
    attention_hidden = model_config.get("attention_hidden")
    if attention_hidden is not None and (isinstance(attention_hidden, bool) or not isinstance(attention_hidden, int)
                                         or attention_hidden < 1):
        raise ValueError(f"attention_hidden must be an integer >= 1, or None (the default width), "
                         f"not {attention_hidden!r}")
    batch_norm_statistics = model_config.get("batch_norm_statistics")
    if batch_norm_statistics not in BATCH_NORM_STATISTICS:
        raise ValueError(f"batch_norm_statistics must be unset (the present images) or 'all', "
                         f"not {batch_norm_statistics!r}")
    return MultiSequenceClassifier(
        sequences=sequences,
        fusion=model_config.fusion,
        dropout=float(model_config.dropout),
        backbone=backbone,
        depth=int(model_config.depth),
        width=int(model_config.width),
        stem_kernel=int(model_config.stem_kernel),
        stem_stride=int(model_config.stem_stride),
        shortcut=model_config.shortcut,
        space_to_depth=bool(model_config.space_to_depth),
        dtype=model_config.dtype,
        # Configs written before the key existed get its default.
        fold_depth=folds_depth(model_config.get("conv_impl", "auto")),
        attention_hidden=attention_hidden,
        batch_norm_statistics=batch_norm_statistics,
    )


def count_params(
    model_config: ml_collections.ConfigDict, sequences: Sequence[str], input_size: int = 64, in_channels: int = 2
) -> int:
    """Number of trainable parameters, from shapes alone (jax.eval_shape; nothing is allocated)."""
    model = build_model(model_config, sequences)
    x = jax.ShapeDtypeStruct((1, len(model.sequences), input_size, input_size, input_size, in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda key, x: model.init(key, x, train=False)["params"], jax.random.key(0), x)
    return sum(leaf.size for leaf in jax.tree.leaves(shapes))
