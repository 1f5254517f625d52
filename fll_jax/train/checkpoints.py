"""Per-fold orbax checkpoints: the latest state (for resuming) and the best on validation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from fll_jax.train.step import TrainState


class FoldCheckpoints:
    """Two CheckpointManagers under one fold directory: latest/ and best/, one step each."""

    def __init__(self, directory: Path, target: TrainState):
        self.directory = Path(directory)
        self.target = target
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self.latest = ocp.CheckpointManager(self.directory / "latest", options=options)
        self.best = ocp.CheckpointManager(self.directory / "best", options=options)

    @staticmethod
    def _save(manager: ocp.CheckpointManager, epoch: int, state: TrainState, meta: dict) -> None:
        manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def save_latest(self, epoch: int, state: TrainState, meta: dict) -> None:
        self._save(self.latest, epoch, state, meta)

    def save_best(self, epoch: int, state: TrainState, meta: dict) -> None:
        self._save(self.best, epoch, state, meta)

    def _restore(self, manager: ocp.CheckpointManager) -> tuple[TrainState, dict] | None:
        step = manager.latest_step()
        if step is None:
            return None
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(self.target), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def restore_latest(self) -> tuple[TrainState, dict] | None:
        return self._restore(self.latest)

    def restore_best(self) -> tuple[TrainState, dict] | None:
        return self._restore(self.best)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def variables_of(state: TrainState) -> dict[str, Any]:
    """The model variables (what model.apply takes) of a train state."""
    return {"params": state.params, "batch_stats": state.batch_stats}
