"""Per-fold orbax checkpoints: the latest train state (for resuming) and the best model.

latest/ holds the whole TrainState and the run's progress (epoch, best so far, history);
best/ holds only the model variables of the best-on-validation epoch, which is all that
evaluation and saliency need.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from fll_jax.train.step import TrainState


def variables_of(state: TrainState) -> dict[str, Any]:
    """The model variables (what model.apply takes) of a train state."""
    return {"params": state.params, "batch_stats": state.batch_stats}


class FoldCheckpoints:
    """Two CheckpointManagers under one fold directory: latest/ and best/, one step each."""

    def __init__(self, directory: Path, target: TrainState):
        self.directory = Path(directory).absolute()  # orbax refuses relative paths
        self.target = target
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self.latest = ocp.CheckpointManager(self.directory / "latest", options=options)
        self.best = ocp.CheckpointManager(self.directory / "best", options=options)

    def save_latest(self, epoch: int, state: TrainState, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.latest.save(epoch, args=args)

    def save_best(self, epoch: int, state: TrainState) -> None:
        self.best.save(epoch, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables_of(state))))

    def restore_latest(self) -> tuple[TrainState, dict] | None:
        """The latest state and progress; best checkpoints written after it are dropped,
        since the resumed run recomputes those epochs (identically) and saves them again."""
        step = self.latest.latest_step()
        if step is None:
            return None
        args = ocp.args.Composite(state=ocp.args.StandardRestore(self.target), meta=ocp.args.JsonRestore())
        restored = self.latest.restore(step, args=args)
        for later in [s for s in self.best.all_steps() if s > step]:
            self.best.delete(later)
        return restored["state"], restored["meta"]

    def restore_best(self) -> dict[str, Any] | None:
        step = self.best.latest_step()
        if step is None:
            return None
        target = ocp.args.StandardRestore(variables_of(self.target))
        return self.best.restore(step, args=ocp.args.Composite(variables=target))["variables"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def best_variables(fold_dir: Path, target: TrainState) -> dict[str, Any]:
    """The model variables of a fold's best-on-validation checkpoint."""
    ckpt = FoldCheckpoints(Path(fold_dir) / "checkpoints", target)
    try:
        variables = ckpt.restore_best()
    finally:
        ckpt.close()
    if variables is None:
        raise FileNotFoundError(f"no best checkpoint under {Path(fold_dir) / 'checkpoints' / 'best'}")
    return variables


def load_fold_models(workdir: str | Path) -> tuple[Any, list[dict[str, Any]], ml_collections.ConfigDict]:
    """(model, the best variables of every configured fold, config) of a finished workdir."""
    from fll_jax.models import build_model
    from fll_jax.train.sharding import make_mesh
    from fll_jax.train.step import abstract_state, make_optimizer

    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a cross-validation workdir")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    model = build_model(config.model, config.sequences)
    # The optimiser only shapes the abstract state; the best checkpoint holds no opt_state.
    target = abstract_state(model, make_optimizer(config, 1), config, make_mesh(jax.devices()[:1]))
    return model, [best_variables(workdir / f"fold{f}", target) for f in config.train.folds], config
