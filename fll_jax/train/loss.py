"""The multitask loss: weighted cross-entropies of the binary and the seven-way heads."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fll_jax.constants import BINARY_CLASSES, FIRST_MALIGNANT, NUM_CLASSES


def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-example cross-entropy in float32 against (optionally smoothed) one-hot targets."""
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def _class_weighted_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float,
                                  class_weights: jax.Array) -> jax.Array:
    """Per-example terms whose sum over the batch, divided by the sum of class_weights[labels],
    is PyTorch's CrossEntropyLoss(weight=class_weights, label_smoothing=...): the smoothing part
    weights each class's log-probability by that class's own weight."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    smooth = -(logp * class_weights).sum(axis=-1)
    return (1 - label_smoothing) * class_weights[labels] * nll + label_smoothing / logits.shape[-1] * smooth


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    # An all-padding batch gives 0, not NaN.
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def multitask_loss(
    outputs: dict,
    label7: jax.Array,
    *,
    binary_weight: float = 1.0,
    multiclass_weight: float = 1.0,
    label_smoothing: float = 0.0,
    class_weights: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """binary_weight * CE(logits2, label2) + multiclass_weight * CE(logits7, label7).

    Args:
      outputs: the model's outputs with logits2 [B, 2] and logits7 [B, 7].
      label7: int [B] seven-way labels; the binary label is derived (labels >= 4 are malignant).
      binary_weight, multiclass_weight: weights of the two terms.
      label_smoothing: applied to both heads' one-hot targets.
      class_weights: optional [7] per-class weights of the seven-way term, as PyTorch's
        CrossEntropyLoss(weight=..., label_smoothing=...): a sum divided by the weights of the
        examples' classes, the smoothing part weighting each class by its own weight.
      valid: optional bool/float [B]; rows with 0 (padding) count for nothing.

    Returns:
      (loss, {'loss2': ..., 'loss7': ...}), float32 scalars; the parts are the two
      cross-entropies before binary_weight and multiclass_weight are applied.
    """
    label7 = jnp.asarray(label7, jnp.int32)
    # constants.to_binary's rule, in jnp so that it traces under jit.
    label2 = (label7 >= FIRST_MALIGNANT).astype(jnp.int32)
    row = jnp.ones(label7.shape, jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    logits2, logits7 = outputs["logits2"], outputs["logits7"]
    if logits2.shape[-1] != len(BINARY_CLASSES) or logits7.shape[-1] != NUM_CLASSES:
        raise ValueError(f"expected logits2 [B, 2] and logits7 [B, 7], got {logits2.shape} and {logits7.shape}")
    loss2 = _weighted_mean(_cross_entropy(logits2, label2, label_smoothing), row)
    if class_weights is None:
        loss7 = _weighted_mean(_cross_entropy(logits7, label7, label_smoothing), row)
    else:
        class_weights = jnp.asarray(class_weights, jnp.float32)
        if class_weights.shape != (NUM_CLASSES,):
            raise ValueError(f"class_weights must have {NUM_CLASSES} entries, got shape {class_weights.shape}")
        terms = _class_weighted_cross_entropy(logits7, label7, label_smoothing, class_weights)
        # An all-padding batch gives 0, not NaN.
        loss7 = jnp.sum(terms * row) / jnp.maximum(jnp.sum(row * class_weights[label7]), 1e-12)
    loss = binary_weight * loss2 + multiclass_weight * loss7
    return loss, {"loss2": loss2, "loss7": loss7}
