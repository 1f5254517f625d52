"""Where a train step's time goes: by ResNet stage, forward against backward, and the step's parts.

One branch of the config's backbone is timed part by part (stem, stage1-4) on the input its
part sees in training, forward alone and forward plus backward (gradients of the parameters
and of the input), then with its convolutions alone (batch norm and ReLU left out) to split
convolution from the rest. The step's parts: the on-device augmentation alone, the config's
branches and fusion forward, forward plus backward, and the whole train step (with AdamW).
One JSON line per figure; --trace also writes a jax.profiler trace of a few whole steps.
  python experiments/profile_step.py --config configs/quick.py --batch 8          # this CPU
  python experiments/profile_step.py --config configs/paper.py --batch 32         # a GPU
"""
import functools
import json
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fll_jax.constants import PATCH_SIZE
from fll_jax.data.random_batch import random_batch
from fll_jax.errors import no_stray_arguments, parse_config_flags
from fll_jax.models.conv import Conv3D, folds_depth
from fll_jax.models.resnet3d import DTYPES, STAGE_SIZES, stage, stem
from fll_jax.train.augment import prepare_inputs
from fll_jax.train.cross_validate import build_steps
from fll_jax.train.sharding import shard_batch
from fll_jax.train.step import DEVICE_KEYS, rng_settings, seq_indices

config_flags.DEFINE_config_file("config", "configs/quick.py", "Config whose model and input size are profiled.")
flags.DEFINE_integer("batch", 8, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("iters", 5, "Timed calls after the first (compiling) one.", lower_bound=1)
flags.DEFINE_string("trace", None, "Write a jax.profiler trace of --iters whole train steps into this folder.")
FLAGS = flags.FLAGS


class Part(nn.Module):
    """A function that creates layers (a backbone part, or its convolutions alone) as a module."""

    fn: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x):
        return self.fn(x)


def _timed(fn, *args) -> float:
    """Seconds per call of a jitted fn, after a first (compiling) call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(FLAGS.iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / FLAGS.iters


def _forward_backward(module: nn.Module, x: jax.Array) -> tuple[float, float]:
    """(forward s, forward + backward s) of a part in training mode."""
    variables = module.init(jax.random.key(0), x)

    def loss(params, x):
        y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    forward = jax.jit(loss)
    backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return _timed(forward, variables["params"], x), _timed(backward, variables["params"], x)


def _conv_only(part: str, config, dtype, x: jax.Array) -> tuple[float, float]:
    """The same part's convolutions alone (every layer's input shape as in the part)."""
    m = config.model
    conv = functools.partial(Conv3D, space_to_depth=m.space_to_depth, dtype=dtype, fold_depth=folds_depth(m.conv_impl))
    if part == "stem":
        module = Part(lambda x: conv(m.width, m.stem_kernel, m.stem_stride)(x))
    else:
        index = int(part[-1]) - 1
        width = m.width * 2**index

        def convs(x):
            for block in range(STAGE_SIZES[m.depth][index]):
                stride = 2 if index > 0 and block == 0 else 1
                y = conv(width, 3, stride)(x)
                y = conv(width, 3, 1)(y)
                if stride != 1 or x.shape[-1] != width:
                    y = y + conv(width, 1, stride)(x)
                x = y
            return x

        module = Part(convs)
    return _forward_backward(module, x)


def profile_stages(config) -> list[dict]:
    """Per-part figures for one branch at the config's input size."""
    m, size = config.model, config.input_size
    dtype = DTYPES[m.dtype]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(FLAGS.batch, size, size, size, 2)), jnp.float32)
    fold = folds_depth(m.conv_impl)
    parts = [("stem", Part(functools.partial(stem, width=m.width, kernel=m.stem_kernel, stride=m.stem_stride,
                                             space_to_depth=m.space_to_depth, dtype=dtype, train=True,
                                             fold_depth=fold)))]
    for index, blocks in enumerate(STAGE_SIZES[m.depth]):
        parts.append((f"stage{index + 1}", Part(functools.partial(
            stage, index=index, blocks=blocks, width=m.width, shortcut=m.shortcut, space_to_depth=m.space_to_depth,
            dtype=dtype, train=True, fold_depth=fold))))
    rows = []
    for name, module in parts:
        forward, both = _forward_backward(module, x)
        conv_forward, conv_both = _conv_only(name, config, dtype, x)
        rows.append({"figure": "branch_part", "part": name, "input": list(x.shape[1:]), "forward_ms": 1000 * forward,
                     "backward_ms": 1000 * (both - forward), "conv_forward_ms": 1000 * conv_forward,
                     "conv_backward_ms": 1000 * (conv_both - conv_forward)})
        x = jax.eval_shape(module.init_with_output, jax.random.key(0), x)[0]
        x = jnp.ones(x.shape, jnp.float32)
    return rows


def profile_step(config) -> list[dict]:
    """The whole step and its parts: augmentation, model forward, forward + backward."""
    config = config.copy_and_resolve_references()
    config.train.batch_size = config.train.eval_batch_size = FLAGS.batch
    steps = build_steps(config, steps_per_epoch=100)
    state = steps.init(jax.random.PRNGKey(0))
    batch = shard_batch(random_batch(FLAGS.batch, PATCH_SIZE), steps.mesh, DEVICE_KEYS)
    augment = jax.jit(lambda batch, rng: prepare_inputs(batch, seq_indices(config), config.input_size, rng,
                                                        config.augment))
    x = augment(batch, jax.random.key(1))
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def loss(params, x):
        out, _ = steps.model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return out["logits7"].sum() + out["logits2"].sum()

    forward = _timed(jax.jit(loss), state.params, x)
    both = _timed(jax.jit(jax.grad(loss)), state.params, x)
    # the train step donates its state, so it is timed as a chain of steps after a compiling one
    state, metrics = steps.train(state, batch, steps.schedule)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(FLAGS.iters):
        state, metrics = steps.train(state, batch, steps.schedule)
    jax.block_until_ready(metrics)
    whole = (time.perf_counter() - start) / FLAGS.iters
    if FLAGS.trace:
        with jax.profiler.trace(FLAGS.trace):
            for _ in range(FLAGS.iters):
                state, metrics = steps.train(state, batch, steps.schedule)
            jax.block_until_ready(metrics)
    return [{"figure": "step", "device": jax.devices()[0].device_kind, "batch": FLAGS.batch,
             "input_size": config.input_size, "width": config.model.width, "dtype": config.model.dtype,
             "augment_ms": 1000 * _timed(augment, batch, jax.random.key(2)),
             "model_forward_ms": 1000 * forward, "model_backward_ms": 1000 * (both - forward),
             "train_step_ms": 1000 * whole}]


def main(argv):
    no_stray_arguments(argv)
    with rng_settings(FLAGS.config):
        rows = profile_stages(FLAGS.config) + profile_step(FLAGS.config)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_config_flags)
