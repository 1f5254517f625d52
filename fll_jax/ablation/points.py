"""A sweep's points: the configs that an ablation config's sweep(add, arg) adds, each named from
how its settings differ from the sweep's base config (so a point added by two sweeps runs once,
and 'base' is the unchanged config)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ml_collections

from fll_jax.config_string import apply_config_string, short_key
from fll_jax.constants import SEQUENCES
from fll_jax.train.cross_validate import trained_config
from fll_jax.train.workdir import settings_fingerprint

BASE = "base"


class SweepError(ValueError):
    """An ablation config or point that cannot be used; the message names it."""


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its folder name, its config, and for a point that only evaluates
    (hidden sequences) the name of the point whose fold models it evaluates."""

    name: str
    config: ml_collections.ConfigDict
    trained: str | None = None


def load_sweep(path: str | Path) -> Callable:
    """The sweep(add, arg) function of an ablation config file; SweepError if it has none."""
    spec = importlib.util.spec_from_file_location(f"sweep_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "sweep", None)):
        raise SweepError(f"{path} has no sweep(add, arg) function: it is not an ablation config "
                         "(see configs/ablations/)")
    return module.sweep


def _sequences_text(names) -> str:
    """'all', 'all-lap-pvp' (all but those) or 't2w+dwi' (only those), whichever is shorter."""
    # Of all seven, not of the base's: a point's name says which sequences it used on any base.
    missing = [s for s in SEQUENCES if s not in names]
    if not missing:
        return "all"
    if len(missing) < len(names):
        return "all-" + "-".join(missing)
    return "+".join(s for s in SEQUENCES if s in names)


def _value_text(path: str, value) -> str:
    if path == "sequences":
        return _sequences_text(value)
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value) or "none"
    return str(value)


def point_name(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> str:
    """'base', or the settings that differ from the base's as 'key=value' joined by ','."""
    new, old = settings_fingerprint(config), settings_fingerprint(base)
    changed = sorted(path for path in set(new) | set(old) if new.get(path) != old.get(path))
    return ",".join(f"{short_key(path)}={_value_text(path, new.get(path))}" for path in changed) or BASE


def _setting_text(value) -> str:
    return "+".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


class PointAdder:
    """The `add` of sweep(add, arg): add(**settings) adds a point; add.sequences are the base's
    sequences, the ones a sweep leaves out, keeps or hides (not all seven: on a base without ADC,
    a point that put ADC back would feed its branch only zeros)."""

    def __init__(self, base: ml_collections.ConfigDict):
        self.base = base
        self.configs: dict[str, ml_collections.ConfigDict] = {}

    @property
    def sequences(self) -> tuple[str, ...]:
        return tuple(self.base.sequences)

    def __call__(self, **settings) -> None:
        text = ",".join(f"{key}={_setting_text(value)}" for key, value in settings.items())
        try:
            config = apply_config_string(self.base.copy_and_resolve_references(), text)
        except ValueError as error:  # the sweep file's mistake: named with the call, not a traceback
            raise SweepError(f"add({', '.join(f'{k}={v!r}' for k, v in settings.items())}): {error}") from None
        self.configs.setdefault(point_name(config, self.base), config)


def collect_points(sweep: Callable, arg: str | None, base: ml_collections.ConfigDict) -> list[Point]:
    """The points of sweep(add, arg) over `base`: training points first, in the order added, then
    the evaluate-only ones (each after adding its trained point if the sweep did not).

    add(**settings) takes config-string keys (fll_jax/config_string.py): add() is the base,
    add(sequences=("t2w", "dwi")), add(fusion="attention", seed=1), add(hide="lap"); add.sequences
    are the base's sequences (PointAdder).
    """
    add = PointAdder(base)
    sweep(add, arg)
    configs = add.configs
    if not configs:
        raise SweepError(f"the sweep added no point (arg {arg!r}): its sweep(add, arg) must call add() at least once")
    trained, evaluated = [], []
    for name, config in configs.items():
        if config.evaluation.hidden_sequences:
            parent = trained_config(config)
            parent_name = point_name(parent, base)
            if parent_name not in configs and all(p.name != parent_name for p in trained):
                trained.append(Point(parent_name, parent))
            evaluated.append(Point(name, config, trained=parent_name))
        else:
            trained.append(Point(name, config))
    return trained + evaluated


def check_points(points: list[Point], num_devices: int = 1) -> None:
    """SweepError naming every point whose config would fail its check on `num_devices` devices
    (for scripts written now and run later, where a failure costs a queue wait)."""
    from fll_jax.config_check import ConfigError, check_config

    problems = []
    for point in points:
        try:
            check_config(point.config, max(1, num_devices))  # a task without GPUs has one CPU device
        except ConfigError as error:
            problems.append(f"point {point.name}: {error}")
    if problems:
        raise SweepError("\n".join(problems))
