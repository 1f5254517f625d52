"""Fusion strategies: per-sequence features [B, S, F] -> logits of both heads, by name.

Every fusion module takes `sequences` (the used ones, in input order) and `dropout` (applied to
the head inputs); it is called with the features (zero for a sequence the lesion lacks) and
`present` [B, S] bool, and returns a dict with logits2 [B, 2] and logits7 [B, 7] in float32.
Each knows which sequences are present: the concatenating fusions see the zeros plus the
presence flags, the attention fusions give absent sequences no weight, late fusion averages
the present sequences' logits only.
`shared_backbone` tells the classifier to use one branch's weights for every sequence;
the fusions with `pools_by_attention` also take `attention_hidden`, their scoring MLP's width.
"""
from __future__ import annotations

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fll_jax.constants import BINARY_CLASSES, NUM_CLASSES, SEQUENCES
from fll_jax.models.initializers import normal_flat, variance_scaling_flat

# The scoring MLP's width when none is set (model.attention_hidden None), or the features' if narrower.
AUTO_ATTENTION_HIDDEN = 128

# LeCun-scaled normal (Flax's Dense default scale), drawn flat: fast to compile on XLA:CPU.
Dense = functools.partial(nn.Dense, kernel_init=variance_scaling_flat(1.0, "fan_in"))

# The paper's groups: T2WI, DWI, ADC join the binary head; LAP, PVP, DP the seven-way head.
BINARY_GROUP = SEQUENCES[0:3]
MULTICLASS_GROUP = SEQUENCES[4:7]


def _with_flags(feats: jax.Array, present: jax.Array) -> jax.Array:
    """[B, S * F + S]: every sequence's features, then a 0/1 flag per sequence."""
    return jnp.concatenate([feats.reshape(feats.shape[0], -1), present.astype(feats.dtype)], axis=-1)


def _heads(x2: jax.Array, x7: jax.Array, dropout: float, train: bool, suffix: str = "") -> tuple[jax.Array, jax.Array]:
    """Dropout, then one float32 linear layer per task (created in the calling module)."""
    drop = nn.Dropout(dropout, deterministic=not train)
    logits2 = Dense(len(BINARY_CLASSES), name=f"head2{suffix}")(drop(x2.astype(jnp.float32)))
    logits7 = Dense(NUM_CLASSES, name=f"head7{suffix}")(drop(x7.astype(jnp.float32)))
    return logits2, logits7


class _AttentionPool(nn.Module):
    """Softmax-weighted sum over sequences, scores from a tanh MLP shared by all sequences."""

    hidden: int | None = None  # None: AUTO_ATTENTION_HIDDEN, capped at the features' width

    @nn.compact
    def __call__(self, tokens: jax.Array, present: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden = self.hidden or min(AUTO_ATTENTION_HIDDEN, tokens.shape[-1])
        scores = Dense(1, name="score")(jnp.tanh(Dense(hidden, name="key")(tokens)))[..., 0]
        # Absent sequences get no weight; a lesion with none present pools to zero.
        weights = jax.nn.softmax(jnp.where(present, scores, -1e9), axis=1) * present
        return jnp.einsum("bs,bsf->bf", weights, tokens), weights


class PaperFusion(nn.Module):
    """The paper's: all features and the presence flags, plus the used members of each head's
    group, per head."""

    sequences: tuple[str, ...]
    dropout: float = 0.0
    shared_backbone: ClassVar[bool] = False
    pools_by_attention: ClassVar[bool] = False

    @nn.compact
    def __call__(self, feats: jax.Array, present: jax.Array, train: bool = False) -> dict:
        fused_all = _with_flags(feats, present)

        def with_group(group):
            return jnp.concatenate(
                [fused_all] + [feats[:, self.sequences.index(s)] for s in group if s in self.sequences], axis=-1
            )

        logits2, logits7 = _heads(with_group(BINARY_GROUP), with_group(MULTICLASS_GROUP), self.dropout, train)
        return {"logits2": logits2, "logits7": logits7}


class ConcatFusion(nn.Module):
    """All features concatenated into both heads."""

    sequences: tuple[str, ...]
    dropout: float = 0.0
    shared_backbone: ClassVar[bool] = False
    pools_by_attention: ClassVar[bool] = False

    @nn.compact
    def __call__(self, feats: jax.Array, present: jax.Array, train: bool = False) -> dict:
        fused = _with_flags(feats, present)
        logits2, logits7 = _heads(fused, fused, self.dropout, train)
        return {"logits2": logits2, "logits7": logits7}


class AttentionFusion(nn.Module):
    """Learned per-lesion sequence weights (softmax over sequences), reported as sequence_weights."""

    sequences: tuple[str, ...]
    dropout: float = 0.0
    attention_hidden: int | None = None
    shared_backbone: ClassVar[bool] = False
    pools_by_attention: ClassVar[bool] = True

    @nn.compact
    def __call__(self, feats: jax.Array, present: jax.Array, train: bool = False) -> dict:
        pooled, weights = _AttentionPool(self.attention_hidden, name="attention")(feats, present)
        logits2, logits7 = _heads(pooled, pooled, self.dropout, train)
        return {"logits2": logits2, "logits7": logits7, "sequence_weights": weights}


class LateFusion(nn.Module):
    """Each sequence's own heads; the logits are averaged over sequences."""

    sequences: tuple[str, ...]
    dropout: float = 0.0
    shared_backbone: ClassVar[bool] = False
    pools_by_attention: ClassVar[bool] = False

    @nn.compact
    def __call__(self, feats: jax.Array, present: jax.Array, train: bool = False) -> dict:
        per_seq = [_heads(feats[:, i], feats[:, i], self.dropout, train, f"_{s}") for i, s in enumerate(self.sequences)]
        weights = present / jnp.maximum(present.sum(1, keepdims=True), 1)
        return {
            "logits2": jnp.einsum("bs,sbk->bk", weights, jnp.stack([l2 for l2, _ in per_seq])),
            "logits7": jnp.einsum("bs,sbk->bk", weights, jnp.stack([l7 for _, l7 in per_seq])),
        }


class SharedFusion(nn.Module):
    """For one backbone shared by all sequences: a learned sequence embedding is added to each
    sequence's features, which are then pooled by attention (a linear head after concatenation
    would absorb the embedding as a constant bias; the softmax scores do not)."""

    sequences: tuple[str, ...]
    dropout: float = 0.0
    attention_hidden: int | None = None
    shared_backbone: ClassVar[bool] = True
    pools_by_attention: ClassVar[bool] = True

    @nn.compact
    def __call__(self, feats: jax.Array, present: jax.Array, train: bool = False) -> dict:
        embedding = self.param(
            "sequence_embedding", normal_flat(0.02), (len(self.sequences), feats.shape[-1]), jnp.float32
        )
        pooled, weights = _AttentionPool(self.attention_hidden, name="attention")(feats + embedding, present)
        logits2, logits7 = _heads(pooled, pooled, self.dropout, train)
        return {"logits2": logits2, "logits7": logits7, "sequence_weights": weights}


FUSIONS: dict[str, type[nn.Module]] = {
    "paper": PaperFusion,
    "concat": ConcatFusion,
    "attention": AttentionFusion,
    "late": LateFusion,
    "shared": SharedFusion,
}
