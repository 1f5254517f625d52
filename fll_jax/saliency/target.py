"""The explained scalar F: one head's class probability (or logit), one model or an ensemble.

Every map in this package differentiates F with respect to the image channel (channel 0) of
all used sequences at once; the blurred-mask channel is held fixed. Inputs are one lesion's
network input x [S_used, D, H, W, 2] as the model sees it (after `prepare_inputs`).

For an ensemble (the five fold models) F is the mean over models: of the class probability
(output='prob', the default, so that F is what the ensemble reports) or of the logit
(output='logit'). Gradients, and so every attribution, are the same means of the
per-model ones, which is why the models are evaluated one after another through a single
compiled function instead of being compiled together.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fll_jax.constants import BINARY_CLASSES, NUM_CLASSES

HEADS = {"binary": "logits2", "seven": "logits7"}
OUTPUTS = ("prob", "logit")

ApplyFn = Callable[[Any, jax.Array], Mapping[str, jax.Array]]


@dataclass
class Evaluation:
    """Results of one batch of inputs, averaged over the models.

    probs: [c, K] head probabilities; scores: [c] F of the explained class;
    grad: [S, D, H, W] the weighted sum over the batch of dF/d(image).
    """

    probs: np.ndarray
    scores: np.ndarray
    grad: np.ndarray


def model_apply_fn(model: nn.Module) -> ApplyFn:
    """(variables, x) -> model outputs in inference mode (batch norm uses running stats)."""
    return functools.partial(model.apply, train=False)


class ClassScore:
    """F for one head and output kind over one model or a list of fold models.

    Batches of inputs are built on the device as base + alphas * direction (+ noise), per
    sequence, so that integrated-gradient paths, occlusions, SmoothGrad samples and plain
    inputs all go through two compiled functions of a fixed chunk size: `evaluate` (with
    gradients) and `forward` (without).
    """

    def __init__(
        self,
        apply_fn: ApplyFn,
        variables: Mapping | Sequence[Mapping],
        *,
        head: str = "seven",
        output: str = "prob",
        chunk: int = 16,
    ):
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; known: {', '.join(OUTPUTS)}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.variables = [variables] if isinstance(variables, Mapping) else list(variables)
        if not self.variables:
            raise ValueError("ClassScore needs at least one set of model variables")
        self.apply_fn, self.head, self.output, self.chunk = apply_fn, head, output, chunk
        self._chunk_fn = jax.jit(self._evaluate_chunk)
        self._compiled: dict = {}

    @classmethod
    def from_model(cls, model: nn.Module, variables: Mapping | Sequence[Mapping], **kwargs) -> "ClassScore":
        return cls(model_apply_fn(model), variables, **kwargs)

    def with_variables(self, variables: Mapping | Sequence[Mapping]) -> "ClassScore":
        """The same F over other variables of the same model, sharing the compiled functions."""
        other = copy.copy(self)
        other.variables = [variables] if isinstance(variables, Mapping) else list(variables)
        return other

    def compiled(self, key, build: Callable[[], Callable]) -> Callable:
        """A jit-compiled function built once per key (other maps reuse this object's cache)."""
        if key not in self._compiled:
            self._compiled[key] = jax.jit(build())
        return self._compiled[key]

    def _outputs(self, variables, images, mask):
        """Head probabilities and F of every class [c, K] for images [c, S, D, H, W]."""
        masks = jnp.broadcast_to(mask, images.shape)
        logits = self.apply_fn(variables, jnp.stack([images, masks], axis=-1))[HEADS[self.head]]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return probs, probs if self.output == "prob" else logits.astype(jnp.float32)

    def _forward_chunk(self, variables, base, direction, alphas, mask):
        return self._outputs(variables, base[None] + alphas[:, :, None, None, None] * direction[None], mask)

    def _evaluate_chunk(self, variables, base, direction, alphas, weights, noise, mask, index):
        """One model, c inputs: (probs [c,K], scores [c], sum_i w_i dF/dimage(input_i))."""

        def weighted_sum(base_):
            images = base_[None] + alphas[:, :, None, None, None] * direction[None]
            if noise is not None:
                images = images + noise
            probs, values = self._outputs(variables, images, mask)
            scores = jnp.take(values, index, axis=-1)
            return jnp.sum(weights * scores), (probs, scores)

        # d/d(base) of sum_i w_i F(base + ...) is sum_i w_i dF(input_i): no [c, ...] buffer.
        grad, (probs, scores) = jax.grad(weighted_sum, has_aux=True)(base)
        return probs, scores, grad

    def _inputs(self, x, direction, alphas) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """(image, mask, direction, alphas padded to whole chunks [m, S], n) from the arguments."""
        x = np.asarray(x, np.float32)
        image, mask = x[..., 0], x[..., 1]
        num_seq = image.shape[0]
        direction = np.zeros_like(image) if direction is None else np.asarray(direction, np.float32)
        alphas = np.zeros((1, num_seq), np.float32) if alphas is None else np.asarray(alphas, np.float32)
        if alphas.ndim == 1:
            alphas = np.repeat(alphas[:, None], num_seq, axis=1)
        n = alphas.shape[0]
        if alphas.shape != (n, num_seq) or direction.shape != image.shape:
            raise ValueError(
                f"alphas {alphas.shape} and direction {direction.shape} do not match {n} inputs of "
                f"{num_seq} sequences {image.shape}"
            )
        alphas = np.concatenate([alphas, np.zeros((-n % self.chunk, num_seq), np.float32)])
        return image, mask, direction, alphas, n

    def forward(
        self, x: np.ndarray, *, direction: np.ndarray | None = None, alphas: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probs [n, K], F of every class [n, K]) of inputs image + alphas[i, s] * direction.

        x: [S, D, H, W, 2]; alphas [n, S] or [n] (default: x alone). No gradients.
        """
        image, mask, direction, alphas, n = self._inputs(x, direction, alphas)
        fn = self.compiled("forward", lambda: self._forward_chunk)
        probs, values = [], []
        for start in range(0, len(alphas), self.chunk):
            outs = [fn(v, image, direction, alphas[start:start + self.chunk], mask) for v in self.variables]
            probs.append(np.mean([np.asarray(p) for p, _ in outs], axis=0))
            values.append(np.mean([np.asarray(f) for _, f in outs], axis=0))
        return np.concatenate(probs)[:n], np.concatenate(values)[:n]

    def evaluate(
        self,
        x: np.ndarray,
        *,
        index: int,
        direction: np.ndarray | None = None,
        alphas: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        noise_sd: np.ndarray | None = None,
        seed: int = 0,
    ) -> Evaluation:
        """F, the head's probabilities and the weighted gradient sum over n inputs.

        Input i is image + alphas[i, s] * direction (per sequence s) + noise_sd[s] * N(0, 1),
        with the mask channel of x; alphas [n, S] (or [n], shared by all sequences),
        weights [n] (default ones). Evaluated in chunks of self.chunk (padded with weight 0).
        The noise is drawn on the host (numpy, seeded): jax.random's kernels took ~30 s to
        compile on XLA:CPU, longer than the model.
        """
        image, mask, direction, alphas, n = self._inputs(x, direction, alphas)
        weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
        if weights.shape != (n,):
            raise ValueError(f"weights {weights.shape} do not match {n} inputs")
        weights = np.concatenate([weights, np.zeros(len(alphas) - n, np.float32)])
        rng = np.random.default_rng(seed) if noise_sd is not None else None
        sd = None if noise_sd is None else np.asarray(noise_sd, np.float32)[None, :, None, None, None]
        index = jnp.asarray(index, jnp.int32)
        probs, scores, grad = [], [], np.zeros_like(image)
        for start in range(0, len(alphas), self.chunk):
            part = slice(start, start + self.chunk)
            noise = None if rng is None else (sd * rng.standard_normal((self.chunk,) + image.shape)).astype(np.float32)
            p_sum = s_sum = 0.0
            for variables in self.variables:
                p, s, g = self._chunk_fn(variables, image, direction, alphas[part], weights[part], noise, mask, index)
                p_sum, s_sum, grad = p_sum + np.asarray(p), s_sum + np.asarray(s), grad + np.asarray(g)
            probs.append(p_sum / len(self.variables))
            scores.append(s_sum / len(self.variables))
        return Evaluation(
            probs=np.concatenate(probs)[:n],
            scores=np.concatenate(scores)[:n],
            grad=grad / len(self.variables),
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The head's (ensemble-mean) class probabilities [K] for one input."""
        return self.forward(x)[0][0]

    def resolve_index(self, x: np.ndarray, index: int | None) -> int:
        """The explained class: the given one, or the (ensemble's) predicted one."""
        if index is not None:
            classes = NUM_CLASSES if self.head == "seven" else len(BINARY_CLASSES)
            if not 0 <= int(index) < classes:
                raise ValueError(f"class index {index}: the {self.head} head's classes are 0 to {classes - 1}")
            return int(index)
        return int(np.argmax(self.predict(x)))
