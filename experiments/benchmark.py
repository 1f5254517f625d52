"""Throughput of the project's real train step (and forward pass) on random inputs.

Runs several variants in one process so their ratios are comparable, e.g. on a GPU with the
paper's shapes:
  python experiments/benchmark.py --config configs/paper.py --batch 32 --variants s2d,direct
and on this CPU (f32, narrow, 32^3):
  python experiments/benchmark.py --config configs/quick.py --batch 16 --variants s2d,direct
A variant names how strided convolutions are computed (s2d or direct), optionally followed by
how every convolution is (_native: XLA's 3D convolution, _folded: a 2D one with the depth taps
in channels); without it the config's model.conv_impl decides ('auto': folded on the CPU only):
  python experiments/benchmark.py --config configs/quick.py --batch 8 --variants s2d_folded,s2d_native
Feeds numpy arrays (no TensorFlow needed). Prints one JSON line per variant and the ratios.

--inference and --saliency add, from the first variant's weights after its timed steps, the
ensemble's inference (five fold models' forward passes per lesion) in lesions/s and integrated
gradients of the five-model ensemble (--ig_steps, every sequence, float32 as explain.py) in ms
per lesion; on a GPU, with the paper's shapes:
  python experiments/benchmark.py --config configs/paper.py --batch 32 --variants s2d,direct \
      --inference --saliency
"""
import json
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from fll_jax.constants import PATCH_SIZE
from fll_jax.data.random_batch import random_batch
from fll_jax.errors import no_stray_arguments, parse_config_flags
from fll_jax.models.conv import folds_depth
from fll_jax.train.checkpoints import variables_of
from fll_jax.train.cross_validate import build_steps
from fll_jax.train.sharding import shard_batch
from fll_jax.train.step import DEVICE_KEYS, PREDICT_KEYS, rng_settings

config_flags.DEFINE_config_file("config", "configs/quick.py", "Config to benchmark.")
flags.DEFINE_integer("batch", 16, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("steps", 10, "Timed steps after the first (compiling) one.", lower_bound=1)
flags.DEFINE_list("variants", ["s2d", "direct"],
                  "s2d | direct (the strided convolutions' implementation), optionally _native | _folded.")
flags.DEFINE_integer("stored", PATCH_SIZE, "Side of the stored patch fed to the step.", lower_bound=1)
flags.DEFINE_bool("inference", False, "Also time the five-model ensemble's inference (lesions/s).")
flags.DEFINE_integer("inference_batch", 256, "Lesions per inference call.", lower_bound=1)
flags.DEFINE_bool("saliency", False, "Also time the five-model ensemble's integrated gradients (ms per lesion).")
flags.DEFINE_integer("ig_steps", 64, "Integrated-gradients steps (gradient evaluations along the path).",
                     lower_bound=2)
flags.DEFINE_integer("ig_lesions", 4, "Lesions timed after the compiling one.", lower_bound=1)
FLAGS = flags.FLAGS


def _peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first, compiling call, mean seconds of `repeats` more calls) of fn()."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return first, (time.perf_counter() - start) / repeats


def time_inference(config, steps, variables: dict) -> dict:
    """Lesions/s of the ensemble's inference: five fold models' predict step on each batch."""
    n = FLAGS.inference_batch
    batch = shard_batch(random_batch(n, FLAGS.stored), steps.mesh, PREDICT_KEYS)
    models = [variables] * len(config.train.folds)
    first, each = _timed(lambda: [steps.predict(v, batch) for v in models], FLAGS.steps)
    return {"figure": "ensemble_inference", "models": len(models), "batch": n,
            "lesions_per_s": n / each, "first_call_s": first}


def time_saliency(config, variables: dict) -> dict:
    """ms per lesion of integrated gradients of the five-model ensemble's predicted class."""
    from fll_jax.saliency.explain import Settings, float32_model, lesion_input
    from fll_jax.saliency.integrated_gradients import integrated_gradients
    from fll_jax.saliency.target import ClassScore

    settings = Settings(steps=FLAGS.ig_steps)
    score = ClassScore.from_model(float32_model(config), [variables] * len(config.train.folds), chunk=settings.chunk)
    batch = random_batch(FLAGS.ig_lesions + 1, FLAGS.stored)
    inputs = [lesion_input(batch["image"][i], batch["mask"][i], config) for i in range(FLAGS.ig_lesions + 1)]

    def ig(x):
        return integrated_gradients(score, x, baseline=settings.baseline, steps=settings.steps,
                                    quadrature=settings.quadrature).attributions

    start = time.perf_counter()
    jax.block_until_ready(ig(inputs[0]))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for x in inputs[1:]:
        jax.block_until_ready(ig(x))
    per = (time.perf_counter() - start) / FLAGS.ig_lesions
    return {"figure": "integrated_gradients", "models": len(config.train.folds), "steps": settings.steps,
            "sequences": len(config.sequences), "ms_per_lesion": 1000 * per, "first_lesion_s": first}


def apply_variant(config, variant: str):
    """The config with a variant's convolutions: 's2d' or 'direct', optionally '_native' or '_folded'."""
    strided, _, conv_impl = variant.partition("_")
    if strided not in ("s2d", "direct") or conv_impl not in ("", "native", "folded"):
        raise app.UsageError(f"unknown variant {variant!r}: s2d or direct, optionally followed by _native or _folded")
    config = config.copy_and_resolve_references()
    config.model.space_to_depth = strided == "s2d"
    if conv_impl:
        config.model.conv_impl = conv_impl
    return config


def run_variant(config, variant: str) -> dict:
    config = apply_variant(config, variant)
    config.train.batch_size = FLAGS.batch
    config.train.eval_batch_size = FLAGS.batch
    steps = build_steps(config, steps_per_epoch=100)
    start = time.perf_counter()
    state = jax.block_until_ready(steps.init(jax.random.PRNGKey(0)))
    init_s = time.perf_counter() - start
    batch = shard_batch(random_batch(FLAGS.batch, FLAGS.stored), steps.mesh, DEVICE_KEYS)
    start = time.perf_counter()
    lowered = steps.train.lower(state, batch, steps.schedule)
    trace_s = time.perf_counter() - start
    train = lowered.compile()
    compile_s = time.perf_counter() - start - trace_s
    state, metrics = train(state, batch, steps.schedule)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start  # tracing, compiling and the first step, as a jitted call's first
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = train(state, batch, steps.schedule)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / FLAGS.steps
    extra = []
    if FLAGS.inference and variant == FLAGS.variants[0]:
        extra.append(time_inference(config, steps, variables_of(state)))
    if FLAGS.saliency and variant == FLAGS.variants[0]:
        extra.append(time_saliency(config, variables_of(state)))
    return {
        "variant": variant,
        "conv": "folded" if folds_depth(config.model.conv_impl) else "native",
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "batch": FLAGS.batch,
        "input_size": config.input_size,
        "width": config.model.width,
        "depth": config.model.depth,
        "dtype": config.model.dtype,
        "batch_norm_statistics": config.model.get("batch_norm_statistics") or "present",
        "sequences": len(config.sequences),
        "samples_per_s": FLAGS.batch / step_s,
        "step_ms": 1000 * step_s,
        "first_step_s": first,
        "init_s": init_s,
        "trace_s": trace_s,
        "compile_s": compile_s,
        "peak_gib": _peak_gib(),
        "also": extra,
    }


def main(argv):
    no_stray_arguments(argv)
    for variant in FLAGS.variants:  # all checked before any is measured
        apply_variant(FLAGS.config, variant)
    with rng_settings(FLAGS.config):
        results = [run_variant(FLAGS.config, v) for v in FLAGS.variants]
    for r in results:
        also = r.pop("also")
        print(json.dumps(r))
        for figure in also:
            print(json.dumps(figure))
    base = results[0]
    for r in results[1:]:
        print(f"{base['variant']} / {r['variant']} throughput ratio: {base['samples_per_s'] / r['samples_per_s']:.2f}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_config_flags)
