"""Tiny configs and synthetic batches shared by the training tests."""
from __future__ import annotations

import contextlib
import logging

import numpy as np

from configs import quick
from fll_jax.config_string import apply_config_string
from fll_jax.constants import NUM_CLASSES, SEQUENCES, to_binary


# Three branches instead of seven for tests whose claim does not depend on the number of
# sequences: the train step compiles in about half the time.
FEW = "t2w+dwi+lap"
# What the training fixtures train: one config (with sequence dropout, so that path runs end to
# end), so they share one compiled train step through the persistent compilation cache.
TRAINED = f"sequences={FEW},sequence_dropout=0.3"


def tiny_config(arg: str | None = None, size: int = 16):
    """A config that compiles in seconds on the CPU: depth 10, width 2, 16^3."""
    config = quick.get_config()
    config.model.depth = 10
    config.model.width = 2
    config.input_size = size
    config.train.batch_size = 8
    config.train.eval_batch_size = 8
    config.train.epochs = 2
    config.train.checkpoint_every = 1
    config.data.backend = "numpy"
    return apply_config_string(config, arg)


def random_batch(n: int = 8, size: int = 16, seed: int = 0) -> dict:
    """A batch in the pipeline's format with a class-dependent signal, so it is learnable."""
    rng = np.random.default_rng(seed)
    label7 = np.arange(n) % NUM_CLASSES
    image = rng.integers(0, 60, (n, len(SEQUENCES), size, size, size), dtype=np.uint8)
    centre = slice(size // 4, 3 * size // 4)
    for i, label in enumerate(label7):
        image[i, label % len(SEQUENCES), centre, centre, centre] += 150
    mask = np.zeros_like(image)
    mask[:, :, centre, centre, centre] = 255
    return {
        "image": image,
        "mask": mask,
        "label7": label7.astype(np.int32),
        "label2": to_binary(label7),
        "present": np.ones((n, len(SEQUENCES)), bool),
        "zoom_max": np.ones(n, np.float32),
        "valid": np.ones(n, bool),
    }


def synthetic_source(per_fold: int = 8, test: int = 8, size: int = 16, seed: int = 0, lacking=None):
    """A NumpySource of learnable random lesions: five dev folds and a test split, one lesion per patient.

    lacking: {row: sequences} lesions that lack those sequences (zero patches, present False).
    """
    from fll_jax.data.numpy_source import NumpySource
    from fll_jax.data.patchset import PatchSet

    folds = np.concatenate([np.repeat(np.arange(5), per_fold), np.full(test, -1)]).astype(np.int32)
    n = len(folds)
    batch = random_batch(n, size, seed)
    for row, sequences in (lacking or {}).items():
        for s in sequences:
            k = SEQUENCES.index(s)
            batch["image"][row, k] = batch["mask"][row, k] = 0
            batch["present"][row, k] = False
    ids = np.array([f"P{i:03d}" for i in range(n)])
    patches = PatchSet(
        image=batch["image"],
        mask=batch["mask"],
        label7=batch["label7"],
        label2=batch["label2"],
        patient_id=ids,
        lesion_id=np.array([f"{p}_L1" for p in ids]),
        scanner=np.array(["GE Signa"] * n),
        background=np.array(["normal", "cirrhotic", "fatty"] * n)[:n],
        diameter_mm=np.full(n, 20.0, np.float32),
        patch_affine=np.tile(np.eye(4), (n, 7, 1, 1)),
        present=batch["present"],
        zoom_max=batch["zoom_max"],
    )
    return NumpySource(patches, dict(zip(patches.lesion_id.tolist(), folds.tolist())))


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen: list[tuple[str, str]] = []

    def emit(self, record):
        words = record.getMessage().split()
        if words[:4] == ["Finished", "XLA", "compilation", "of"]:
            self.seen.append((words[4], record.threadName))


@contextlib.contextmanager
def recorded_compiles():
    """A list that receives (program, thread name) for each program compiled (or read from the
    persistent cache) inside the block, from JAX's own log."""
    import jax

    handler, logger = _Compiles(), logging.getLogger("jax")
    logger.addHandler(handler)
    before = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)  # globally: the compiling threads read it too
    try:
        yield handler.seen
    finally:
        jax.config.update("jax_log_compiles", before)
        logger.removeHandler(handler)


def tensorboard_scalars(logdir) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{run: {tag: [(step, value), ...]}} as TensorBoard loads `logdir` (each folder of event
    files is a run, named by its path under `logdir`), purges included."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return {run: {tag: [(event.step, event.value) for event in multiplexer.Scalars(run, tag)] for tag in tags["scalars"]}
            for run, tags in multiplexer.Runs().items()}
