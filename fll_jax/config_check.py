"""Preflight: every problem of a config, found before anything is written or compiled."""
from __future__ import annotations

import math

import ml_collections

from fll_jax.constants import NUM_CLASSES, SEQUENCES


class ConfigError(ValueError):
    """A config that cannot run; the message lists every bad field by its path."""


def _get(config: ml_collections.ConfigDict, path: str):
    node = config
    for name in path.split("."):
        node = node[name]
    return node


def check_config(config: ml_collections.ConfigDict, num_devices: int = 1, data_source: bool = True) -> None:
    """Raise ConfigError listing every invalid field of a training config.

    Args:
        config: a config as configs/paper.py makes it.
        num_devices: devices the batches are split over (batch sizes must divide by it).
        data_source: also check the fields that say where the data comes from (False when the
            caller hands the data over itself).
    """
    try:
        _check_config(config, num_devices, data_source)
    except (AttributeError, KeyError) as error:
        name = str(error.args[0]).strip("'\"") if error.args else "?"
        raise ConfigError(f"invalid config: it has no field {name!r} (a config.json written by an earlier version of "
                          "fll_jax? compare it with configs/paper.py)") from None


def _check_config(config: ml_collections.ConfigDict, num_devices: int, data_source: bool) -> None:
    from fll_jax.data.checks import parse_allow
    from fll_jax.data.phantom import SCALES
    from fll_jax.data.prepare import BACKENDS, FOLD_SOURCES, SOURCES
    from fll_jax.data.preprocess import PreprocessOptions
    from fll_jax.evaluation.stats import RULES
    from fll_jax.models import build_model
    from fll_jax.train.loop import SELECT_METRICS

    problems = []

    def need(ok: bool, path: str, what: str) -> None:
        if not ok:
            problems.append(f"{path} = {_get(config, path)!r}: {what}")

    def positive_int(path: str) -> None:
        value = _get(config, path)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, path, "must be an integer >= 1")

    def finite(path: str, low: float = 0.0, strict: bool = False) -> None:
        value = _get(config, path)
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if strict else value >= low)
        need(ok, path, f"must be a finite number {'>' if strict else '>='} {low:g}")

    for path in ("train.epochs", "train.batch_size", "train.eval_batch_size", "train.checkpoint_every",
                 "train.log_every", "model.width", "model.stem_kernel", "model.stem_stride", "input_size",
                 "data.workers"):
        positive_int(path)
    kernel = config.model.stem_kernel
    need(not isinstance(kernel, int) or kernel % 2 == 1, "model.stem_kernel", "must be odd (a centred 'same' stem)")
    for path in ("optim.learning_rate", "optim.grad_clip", "augment.scale_min", "augment.scale_max"):
        finite(path, strict=True)
    for path in ("optim.weight_decay", "optim.warmup_epochs", "loss.binary_weight", "loss.multiclass_weight",
                 "loss.label_smoothing", "model.dropout", "augment.rotate_deg", "augment.shift",
                 "augment.intensity", "augment.noise_std", "train.sequence_dropout"):
        finite(path)
    if not problems:
        need(config.augment.scale_min <= config.augment.scale_max, "augment.scale_min", "must be <= augment.scale_max")
        need(config.loss.binary_weight + config.loss.multiclass_weight > 0, "loss.binary_weight",
             "and loss.multiclass_weight cannot both be 0")
        for path in ("loss.label_smoothing", "model.dropout"):
            need(_get(config, path) < 1, path, "must be < 1")
    for path in ("augment.random_dilation", "train.resident_data"):
        need(isinstance(_get(config, path), bool), path, "must be true or false")
    rule, confidence = config.evaluation.interval_rule, config.evaluation.confidence
    need(rule in RULES, "evaluation.interval_rule", f"must be one of {', '.join(RULES)}")
    need(isinstance(confidence, float) and 0 < confidence < 1, "evaluation.confidence", "must be between 0 and 1")
    dropout = config.train.sequence_dropout
    need(not isinstance(dropout, (int, float)) or dropout < 1, "train.sequence_dropout",
         "must be < 1 (a lesion always keeps one sequence)")
    used = tuple(config.sequences)
    canonical = tuple(s for s in SEQUENCES if s in used)
    # One order per subset: a sweep would otherwise train ('dwi', 't2w') beside ('t2w', 'dwi').
    need(len(canonical) != len(used) or used == canonical, "sequences", f"must be in the order {', '.join(canonical)}")
    hidden = tuple(config.evaluation.hidden_sequences)
    need(set(hidden) <= set(config.sequences) and len(set(hidden)) < len(config.sequences),
         "evaluation.hidden_sequences", "must name sequences of the config's sequences, and not all of them")
    weights = tuple(config.loss.class_weights)
    need(not weights or (len(weights) == NUM_CLASSES and all(math.isfinite(w) and w >= 0 for w in weights)
                         and sum(weights) > 0),
         "loss.class_weights", f"must be empty or {NUM_CLASSES} finite weights >= 0, not all 0")
    for path in ("seed", "data.fold_seed", "data.phantom_seed"):
        value = _get(config, path)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, path, "must be an integer >= 0")

    num_folds = config.data.num_folds
    need(isinstance(num_folds, int) and num_folds >= 2, "data.num_folds", "must be an integer >= 2")
    folds = list(config.train.folds)
    need(bool(folds) and len(set(folds)) == len(folds)
         and all(isinstance(f, int) and 0 <= f < max(num_folds, 0) for f in folds),
         "train.folds", f"must be distinct fold indices in 0..{num_folds - 1}")
    need(config.train.select_metric in SELECT_METRICS, "train.select_metric", f"must be one of {', '.join(SELECT_METRICS)}")
    if data_source:
        need(config.data.source in SOURCES, "data.source", f"must be one of {', '.join(SOURCES)}")
        need(config.data.backend in BACKENDS, "data.backend", f"must be one of {', '.join(BACKENDS)}")
        need(config.data.source != "manifest" or bool(config.data.manifest), "data.manifest", "must name a manifest.csv")
        # Given alone, the manifest had been ignored for the phantom, and its data taken as checked.
        need(config.data.source == "manifest" or not config.data.manifest, "data.manifest",
             f"is read only with data.source 'manifest' (it is {config.data.source!r}): add --config.data.source manifest")
        need(config.data.folds in FOLD_SOURCES, "data.folds", f"must be one of {', '.join(FOLD_SOURCES)}")
        need(config.data.source != "phantom" or config.data.scale in SCALES, "data.scale",
             f"must be one of {', '.join(SCALES)}")
    for path in ("train.batch_size", "train.eval_batch_size"):
        value = _get(config, path)
        need(not isinstance(value, int) or value < 1 or value % num_devices == 0, path,
             f"must divide evenly over the {num_devices} devices")
    try:
        parse_allow(config.data.allow)
    except ValueError as error:
        problems.append(str(error))
    try:
        PreprocessOptions.from_config(config.data)
    except ValueError as error:
        problems.append(str(error))
    try:
        build_model(config.model, config.sequences)
    except ValueError as error:
        problems.append(f"model: {error}")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
