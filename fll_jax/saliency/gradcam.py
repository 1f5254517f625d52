"""3D Grad-CAM (Selvaraju et al. 2017) from each branch's last-stage feature map.

Every branch (module 'branch_<seq>') sows its last-stage feature map A [d, h, w, K] under
'intermediates'/'stage4' and returns its global average pool f = mean_v A(v). Grad-CAM's
channel weights are the spatial means of dF/dA_k, and through the pool
dF/dA_k(v) = dF/df_k / N at every voxel, so the weights are dF/df_k / N. The model is
therefore split at the pooled features: a zero offset is added to each branch's output with
`nn.intercept_methods` (public Flax API; no change to the model), dF/d(offset) = dF/df, and
the feature maps come from the sown intermediates, all in one forward and backward pass.

The map per sequence is ReLU(sum_k alpha_k A_k), interpolated linearly onto the input grid
with each cell at the input voxel it is centred on (`to_input_grid`); for an ensemble, the mean
of the fold models' maps. F is the
score's output: Selvaraju et al. use the logit, so build the ClassScore with output='logit'
to follow them exactly.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from fll_jax.saliency.target import HEADS, ClassScore


def _add_to_branch_outputs(offsets: dict):
    """Interceptor: offsets[name] is added to what the module called `name` returns."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name in offsets:
            return out + offsets[context.module.name]
        return out

    return interceptor


def _build(score: ClassScore, names: tuple[str, ...]):
    """(variables, x [1, S, D, H, W, 2], index) -> one model's maps [S, D, H, W]."""

    def run(variables, x, offsets):
        with nn.intercept_methods(_add_to_branch_outputs(offsets)):
            return score.apply_fn(variables, x, mutable=["intermediates"])

    def maps(variables, x, index):
        num_features = jax.eval_shape(score.apply_fn, variables, x)["features"].shape[-1]
        zeros = {n: jnp.zeros((1, num_features), jnp.float32) for n in names}

        def f(offsets):
            out, state = run(variables, x, offsets)
            logits = out[HEADS[score.head]].astype(jnp.float32)
            chosen = jax.nn.softmax(logits) if score.output == "prob" else logits
            fmaps = {n: state["intermediates"][n]["stage4"][-1] for n in names}
            return jnp.take(chosen[0], index), fmaps

        grads, fmaps = jax.grad(f, has_aux=True)(zeros)
        cams = []
        for n in names:
            fmap = fmaps[n][0].astype(jnp.float32)  # [d, h, w, K]
            weights = grads[n][0] / np.prod(fmap.shape[:3])
            cam = jax.nn.relu(jnp.einsum("dhwk,k->dhw", fmap, weights))
            cams.append(to_input_grid(cam, x.shape[2:5]))
        return jnp.stack(cams)

    return maps


def to_input_grid(cam: jax.Array, shape: Sequence[int]) -> jax.Array:
    """A last-stage map [d, h, w] on the input grid `shape`, linear between cells, each edge cell's
    value held beyond it.

    Every strided layer (stem, max-pool, each stage's first block) pads k // 2, so cell i of a
    grid that a stride of s made from n voxels (n / s rounded up) is centred on input voxel s * i,
    not where a resize of the whole map to n voxels would draw it (s * i + (s - 1) / 2).
    """
    coords = []
    for n, cells in zip(shape, cam.shape):
        stride = 1
        while -(-n // stride) > cells:  # each strided layer halves the grid, rounding up
            stride *= 2
        if -(-n // stride) != cells:
            raise ValueError(f"a last stage of {cells} cells does not come from {n} input voxels by halving")
        coords.append(jnp.arange(n, dtype=jnp.float32) / stride)
    return map_coordinates(cam, jnp.meshgrid(*coords, indexing="ij"), order=1, mode="nearest")


def grad_cam(score: ClassScore, x: np.ndarray, sequences: Sequence[str], *, index: int | None = None) -> np.ndarray:
    """Grad-CAM maps [S, D, H, W] (non-negative) of class `index` (default: predicted).

    score must wrap a model's apply (ClassScore.from_model); x: [S, D, H, W, 2];
    sequences: the model's used sequences, in input order.
    """
    x = np.asarray(x, np.float32)
    if len(sequences) != x.shape[0]:
        raise ValueError(f"{len(sequences)} sequence names for an input of {x.shape[0]} sequences")
    index = score.resolve_index(x, index)
    names = tuple(f"branch_{s}" for s in sequences)
    fn = score.compiled(("grad_cam", names), lambda: _build(score, names))
    total = sum(np.asarray(fn(v, x[None], jnp.asarray(index, jnp.int32))) for v in score.variables)
    return total / len(score.variables)


def last_stage_voxels(score: ClassScore, sequences: Sequence[str], input_shape: Sequence[int]) -> tuple[int, ...]:
    """Voxels per axis of the branches' last-stage maps, the grid Grad-CAM's maps are made on
    (1 x 1 x 1 for a ResNet on 16^3 or 32^3 inputs: one value per sequence, no spatial detail).

    input_shape: one lesion's input [S, D, H, W, 2].
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    _, state = jax.eval_shape(lambda v, x: score.apply_fn(v, x, mutable=["intermediates"]), score.variables[0], x)
    return tuple(state["intermediates"][f"branch_{sequences[0]}"]["stage4"][-1].shape[1:4])
