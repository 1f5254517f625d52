"""Throughput of the project's real train step (and forward pass) on random inputs.

Runs several variants in one process so their ratios are comparable, e.g. on a GPU with the
paper's shapes:
  python experiments/benchmark.py --config configs/paper.py --batch 32 --variants s2d,direct
and on this CPU (f32, narrow, 32^3):
  python experiments/benchmark.py --config configs/quick.py --batch 16 --variants s2d,direct
Feeds numpy arrays (no TensorFlow needed). Prints one JSON line per variant and the ratios.
"""
import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fll_jax.constants import NUM_CLASSES, PATCH_SIZE, SEQUENCES
from fll_jax.train.cross_validate import build_steps
from fll_jax.train.sharding import shard_batch
from fll_jax.train.step import DEVICE_KEYS, rng_settings

config_flags.DEFINE_config_file("config", "configs/quick.py", "Config to benchmark.")
flags.DEFINE_integer("batch", 16, "Global batch size.")
flags.DEFINE_integer("steps", 10, "Timed steps after the first (compiling) one.")
flags.DEFINE_list("variants", ["s2d", "direct"], "s2d | direct (the strided convolutions' implementation).")
flags.DEFINE_integer("stored", PATCH_SIZE, "Side of the stored patch fed to the step.")
FLAGS = flags.FLAGS


def _batch(n: int, size: int) -> dict:
    rng = np.random.default_rng(0)
    shape = (n, len(SEQUENCES), size, size, size)
    return {
        "image": rng.integers(0, 256, shape, dtype=np.uint8),
        "mask": rng.integers(0, 256, shape, dtype=np.uint8),
        "label7": rng.integers(0, NUM_CLASSES, n).astype(np.int32),
        "present": np.ones((n, len(SEQUENCES)), bool),
        "zoom_max": np.full(n, 1.5, np.float32),
        "valid": np.ones(n, bool),
    }


def _peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def run_variant(config, variant: str) -> dict:
    config = config.copy_and_resolve_references()
    config.model.space_to_depth = variant == "s2d"
    config.train.batch_size = FLAGS.batch
    config.train.eval_batch_size = FLAGS.batch
    steps = build_steps(config, steps_per_epoch=100)
    state = steps.init(jax.random.PRNGKey(0))
    batch = shard_batch(_batch(FLAGS.batch, FLAGS.stored), steps.mesh, DEVICE_KEYS)
    start = time.perf_counter()
    state, metrics = steps.train(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = steps.train(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / FLAGS.steps
    return {
        "variant": variant,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "batch": FLAGS.batch,
        "input_size": config.input_size,
        "width": config.model.width,
        "depth": config.model.depth,
        "dtype": config.model.dtype,
        "sequences": len(config.sequences),
        "samples_per_s": FLAGS.batch / step_s,
        "step_ms": 1000 * step_s,
        "first_step_s": first,
        "peak_gib": _peak_gib(),
    }


def main(argv):
    del argv
    with rng_settings(FLAGS.config):
        results = [run_variant(FLAGS.config, v) for v in FLAGS.variants]
    for r in results:
        print(json.dumps(r))
    base = results[0]
    for r in results[1:]:
        print(f"{base['variant']} / {r['variant']} throughput ratio: {base['samples_per_s'] / r['samples_per_s']:.2f}")


if __name__ == "__main__":
    app.run(main)
