"""Parse config strings such as 'sequences=t2w+dwi+adc,fusion=attention'."""
from __future__ import annotations

import ml_collections

from fll_jax.constants import SEQUENCES, sequence_index

# Short keys a config string may set, and where each lives in the config.
_KEYS = {
    "sequences": "sequences",
    "fusion": "model.fusion",
    "depth": "model.depth",
    "width": "model.width",
    "attention_hidden": "model.attention_hidden",
    "folds": "train.folds",
    "fold": "train.folds",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "scale": "data.scale",
    "backend": "data.backend",
    "seed": "seed",
    "sequence_dropout": "train.sequence_dropout",
    "hide": "evaluation.hidden_sequences",
}


def _sequence_names(key: str, text: str) -> tuple[str, ...]:
    """'t2w+dwi' as sequence names in SEQUENCES order; unknown or repeated names fail."""
    names = tuple(s for s in text.split("+") if s)
    for name in names:
        sequence_index(name)
    # A repeat would otherwise pass as a point of its own that repeats another (hide=lap+lap).
    repeated = sorted({s for s in names if names.count(s) > 1}, key=SEQUENCES.index)
    if repeated:
        raise ValueError(f"{key}={text} names {', '.join(repeated)} more than once")
    return tuple(sorted(names, key=SEQUENCES.index))


def _folds(text: str) -> tuple[int, ...]:
    """'1+0' as (0, 1): one set of folds, one point name (folds=1+0 beside folds=0+1 had trained twice)."""
    folds = [int(f) for f in text.split("+")]
    if len(set(folds)) < len(folds):
        raise ValueError("a fold named twice")
    return tuple(sorted(folds))


# The config-string keys that hold numbers: how each is read, and what it must be.
_NUMBERS = {
    "folds": (_folds, "distinct fold indices joined by +"),
    "depth": (int, "an integer"),
    "width": (int, "an integer"),
    "attention_hidden": (int, "an integer"),
    "epochs": (int, "an integer"),
    "batch_size": (int, "an integer"),
    "seed": (int, "an integer"),
    "sequence_dropout": (float, "a number"),
}
_NUMBERS["fold"] = _NUMBERS["folds"]


def _parse_value(key: str, text: str):
    if key in ("sequences", "hide"):
        return _sequence_names(key, text)
    if key not in _NUMBERS:
        return text
    parse, expected = _NUMBERS[key]
    try:
        return parse(text)
    except ValueError:
        raise ValueError(f"config string item {key}={text}: {key} must be {expected}") from None


def key_path(key: str) -> str:
    """The dotted config path of a config-string key; unknown keys fail listing the known ones."""
    if key not in _KEYS:
        raise ValueError(f"unknown config string key {key!r}; known: {', '.join(_KEYS)}")
    return _KEYS[key]


def short_key(path: str) -> str:
    """The config-string key of a dotted config path (the first that names it), else the path itself."""
    return next((k for k, v in _KEYS.items() if v == path), path)


def apply_config_string(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply 'key=value,key=value' overrides; unknown keys fail listing the known ones."""
    if not arg:
        return config
    given: dict[str, str] = {}
    for item in arg.split(","):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS:
            raise ValueError(
                f"bad config string item {item!r}; expected key=value with key in: {', '.join(_KEYS)}"
            )
        # Set twice, the last had silently won (fusion=attention,fusion=late ran late).
        if _KEYS[key] in given:
            raise ValueError(f"config string {arg!r} sets {_KEYS[key]} twice ({given[_KEYS[key]]} and {item})")
        given[_KEYS[key]] = item
        node = config
        *parents, leaf = _KEYS[key].split(".")
        for name in parents:
            node = node[name]
        node[leaf] = _parse_value(key, text.strip())
    return config
