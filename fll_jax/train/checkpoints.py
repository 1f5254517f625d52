"""Per-fold orbax checkpoints: the latest train state (for resuming) and the best model, verified.

latest/ holds the whole TrainState and the run's progress (epoch, best so far, history);
best/ holds only the model variables of the best-on-validation epoch, which is all that
evaluation and saliency need. Each checkpoint also holds the checksums of its arrays and of
its progress record (fll_jax.train.integrity), checked on every restore: a checkpoint that
cannot be read or does not match them raises CheckpointError naming its path and the remedy.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fll_jax.train import integrity
from fll_jax.train.sharding import place
from fll_jax.train.step import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted; the message names it and what to do."""


class LostBestError(CheckpointError):
    """The progress record names a best epoch whose checkpoint no longer exists."""


def variables_of(state: TrainState) -> dict[str, Any]:
    """The model variables (what model.apply takes) of a train state."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def _json_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _on_host(tree):
    """The replicated arrays of a tree as numpy, fetched in one call.

    Orbax then writes them from process 0 as replicated arrays, and restores them into the
    target's shardings. Handing it the device arrays instead cost 1.3 s per save on one CPU
    device and 2 s on four (it copies each array's replica on its own), against 0.6 s
    (docs/performance.md).
    """
    return jax.device_get(tree)


def background_writes() -> bool:
    """Whether latest/ is written from a thread of its own: where the state lives on an
    accelerator (5-7 s per save of the paper model's state on an H200, fetching, summing and
    handing it to orbax), and in a single process (with several, every orbax barrier must be
    reached in the same order by all). On the CPU, copying the state for the thread cost more
    than it saved (docs/performance.md)."""
    return jax.default_backend() != "cpu" and jax.process_count() == 1


def _options(name: str, **kwargs) -> ocp.CheckpointManagerOptions:
    # Barriers named per manager: with several processes, latest/ and best/ saving the same epoch
    # waited at one barrier name at once, which the coordination service refuses.
    processes = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
    return ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True, multiprocessing_options=processes,
                                        **kwargs)


class FoldCheckpoints:
    """Two CheckpointManagers under one fold directory: latest/ keeps one step; best/ keeps the
    best epoch that latest/ names and any better epoch saved after it.

    A better epoch's best/ must not replace the one latest/ names until a later latest/ names it:
    a run killed in between resumes from latest/ and needs that best again, and again after a
    second kill before the better epoch is recomputed.

    Every process makes the same calls, and orbax's deletes wait for all of them: so whether a
    call waits and prunes depends only on the calls made before it, never on how far a write got.
    A latest/ save starts once the best epoch it names is written, and that epoch becomes the one
    pruning keeps only once the save has reached orbax.
    """

    # best epochs saved, while a latest/ save may still be writing, before a save waits for it
    UNPRUNED_BEST = 3

    def __init__(self, directory: Path, target: TrainState):
        self.directory = Path(directory).absolute()  # orbax refuses relative paths
        self.target = target
        self.latest = ocp.CheckpointManager(self.directory / "latest", options=_options("latest", max_to_keep=1))
        # every step kept, and pruned here (wait): orbax's max_to_keep would drop the named best
        self.best = ocp.CheckpointManager(self.directory / "best", options=_options("best"))
        self._named_best: int | None = None  # the best epoch named by the last latest/ saved or restored
        self._latest_unwaited = False  # a latest/ save started since the last wait
        self._writer = ThreadPoolExecutor(1, "latest-checkpoint") if background_writes() else None
        # the thread's write of latest/ and the best epoch it names, which becomes the one pruning
        # keeps only once the write has reached orbax
        self._writing_latest: tuple[Future, int | None] | None = None

    def remedy(self) -> str:
        fold_dir = self.directory.parent
        return (f"delete {fold_dir} and rerun the same command to train this fold again "
                "(or pass --restart to start the whole run over)")

    def _check_room(self, tree: Any) -> None:
        """CheckpointError naming a disk without room for the arrays about to be saved, before
        anything is written."""
        need = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise CheckpointError(f"{self.directory}: {free / 1e6:.1f} MB free on its disk, less than the "
                                  f"{need / 1e6:.1f} MB of the next checkpoint; free some space, then rerun the "
                                  "same command: the fold resumes from its last complete checkpoint")

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """CheckpointError for a failed write: orbax raises a save's error from its background
        threads at the next save or wait, as a long chain of tracebacks."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as error:  # tensorstore, orbax and asyncio raise many types
            text = str(error)
            cause = ("no space left on device" if "No space left on device" in text
                     else f"{type(error).__name__}: {text.split('See full TensorStore details')[0].strip()[:300]}")
            raise CheckpointError(f"{self.directory}: a checkpoint could not be written ({cause}); once that is "
                                  "fixed, rerun the same command: the fold resumes from its last complete "
                                  "checkpoint") from error

    def save_latest(self, epoch: int, state: TrainState, meta: dict) -> None:
        """Start saving the state and progress of `epoch`; a failed write raises at the next save or wait."""
        self._join_latest()
        self._check_room(state)
        named = meta["best"] and meta["best"]["epoch"]
        # A latest/ on disk before the best epoch it names would lose that epoch to a kill.
        with self._writing():
            self.best.wait_until_finished()
        if self._writer is None:
            self._write_latest(epoch, _on_host(state), meta)
            self._named_best = named
        else:
            # copies: the train step donates the state's buffers, and the loop appends to meta
            snapshot = jax.tree.map(jnp.copy, state)
            self._writing_latest = (self._writer.submit(self._write_copy, epoch, [snapshot], copy.deepcopy(meta)),
                                    named)
        self._latest_unwaited = True

    def _write_copy(self, epoch: int, holder: list, meta: dict) -> None:
        """_write_latest of the device copy in holder, freed once it is on the host."""
        with self._writing():
            host = _on_host(holder.pop())
            self._write_latest(epoch, host, meta)

    def _write_latest(self, epoch: int, host: Any, meta: dict) -> None:
        check = {"arrays": integrity.checksums(host), "meta": _json_digest(meta)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta),
                                  checksums=ocp.args.JsonSave(check))
        with self._writing():
            self.latest.save(epoch, args=args)

    def _join_latest(self) -> None:
        """Wait until the last save_latest has handed its state to orbax; raise its error. Only
        then does the best epoch it names replace the one an earlier latest/ names."""
        writing, self._writing_latest = self._writing_latest, None
        if writing is not None:
            writing[0].result()
            self._named_best = writing[1]

    def save_best(self, epoch: int, state: TrainState) -> None:
        # Waiting drops the best epochs older than the one latest/ names. Right after a latest/ save,
        # which writes the whole train state in the background (2.8 GB on the paper model), a
        # better epoch is saved beside them instead of waiting, unless best/ holds a few already.
        if not self._latest_unwaited or len(self.best.all_steps()) >= self.UNPRUNED_BEST:
            self.wait()
        host = _on_host(variables_of(state))
        self._check_room(host)
        with self._writing():
            self.best.save(epoch, args=ocp.args.Composite(
                variables=ocp.args.StandardSave(host), checksums=ocp.args.JsonSave({"arrays": integrity.checksums(host)})))

    def _restore(self, manager: ocp.CheckpointManager, step: int, name: str, target: Any, **items) -> dict:
        """{name: the arrays in target's shapes and shardings, verified, and each other item} of one
        step; CheckpointError naming the path."""
        path = Path(manager.directory) / str(step)
        # numpy leaves make orbax read numpy; broadcast zeros give shape and dtype without memory
        host_target = jax.tree.map(lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape), target)
        args = ocp.args.Composite(**{name: ocp.args.StandardRestore(host_target)}, **items,
                                  checksums=ocp.args.JsonRestore())
        try:
            restored = manager.restore(step, args=args)
        except Exception as error:  # orbax, tensorstore and asyncio raise many types for damaged files
            cause = str(error).split("See full TensorStore details")[0].strip()[:300]
            raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {cause}); "
                                  f"{self.remedy()}") from error
        check = restored["checksums"] if isinstance(restored["checksums"], dict) else {}
        bad = integrity.mismatches(restored[name], check.get("arrays", {}))
        if "meta" in items and _json_digest(restored["meta"]) != check.get("meta"):
            bad.append("progress record (meta)")
        if bad:
            raise CheckpointError(f"{path}: damaged, its content does not match its checksums "
                                  f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); {self.remedy()}")
        # Orbax reads an array in its stored shape whatever the target's: an edited model would
        # fail later, deep in Flax, with a traceback.
        misfits = [f"{jax.tree_util.keystr(key)} {np.shape(stored)} stored, {np.shape(wanted)} built"
                   for (key, stored), wanted in zip(jax.tree_util.tree_leaves_with_path(restored[name]),
                                                    jax.tree.leaves(target))
                   if np.shape(stored) != np.shape(wanted)]
        if misfits:
            raise CheckpointError(f"{path}: the model this code builds has other shapes than the one saved "
                                  f"({'; '.join(misfits[:3])}{' ...' if len(misfits) > 3 else ''}): the model's code "
                                  "changed since it was trained (the run's report and done.json files name the code "
                                  "that trained it); use that code, or train again with --restart")
        # Read as numpy and placed by us: 0.5-0.8 s against 1.3 s for orbax's per-array placement.
        arrays = place(restored[name], jax.tree.map(lambda a: a.sharding, target))
        return {**{key: restored[key] for key in items}, name: arrays}

    def restore_latest(self) -> tuple[TrainState, dict] | None:
        """The verified latest state and progress, or None when no latest checkpoint exists.

        Best checkpoints written after it are dropped, since the resumed run recomputes those
        epochs and saves them again; the best epoch it names is kept.

        Raises:
            CheckpointError: the latest checkpoint is damaged.
            LostBestError: the best checkpoint its progress names is gone.
        """
        self._join_latest()
        step = self.latest.latest_step()
        if step is None:
            return None
        restored = self._restore(self.latest, step, "state", self.target, meta=ocp.args.JsonRestore())
        meta = restored["meta"]
        self._named_best = meta["best"] and meta["best"]["epoch"]
        if self._named_best is not None and self._named_best not in self.best.all_steps():
            raise LostBestError(f"{self.directory / 'best'}: the best checkpoint (epoch {self._named_best}) is missing")
        for later in [s for s in self.best.all_steps() if s > step]:
            self.best.delete(later)
        self.wait()
        return restored["state"], meta

    def best_step(self) -> int | None:
        return self.best.latest_step()

    def restore_best(self) -> dict[str, Any]:
        """The verified model variables of the best checkpoint; CheckpointError if missing or damaged."""
        step = self.best.latest_step()
        if step is None:
            raise CheckpointError(f"{self.directory / 'best'}: no best checkpoint; {self.remedy()}")
        return self._restore(self.best, step, "variables", variables_of(self.target))["variables"]

    def clear(self) -> None:
        """Delete both checkpoints (the fold starts over)."""
        self.wait()
        self._named_best = None
        for manager in (self.latest, self.best):
            for step in manager.all_steps():
                manager.delete(step)
        self.wait()

    def wait(self) -> None:
        """Wait until every save is on disk, then delete the best epochs older than the one the
        latest/ checkpoint names: no resume can need them."""
        self._join_latest()
        with self._writing():
            self.latest.wait_until_finished()
            self.best.wait_until_finished()
        self._latest_unwaited = False
        if self._named_best is not None:
            for step in self.best.all_steps():
                if step < self._named_best:
                    self.best.delete(step)

    def close(self) -> None:
        try:
            self._join_latest()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
            self.latest.close()
            self.best.close()


def best_variables(fold_dir: Path, target: TrainState) -> dict[str, Any]:
    """The verified model variables of a fold's best-on-validation checkpoint."""
    ckpt = FoldCheckpoints(Path(fold_dir) / "checkpoints", target)
    try:
        return ckpt.restore_best()
    finally:
        ckpt.close()


def load_fold_models(workdir: str | Path) -> tuple[Any, list[dict[str, Any]], ml_collections.ConfigDict]:
    """(model, the best variables of every configured fold, config) of a finished workdir
    (WorkdirError for an unfinished or evaluate-only one)."""
    from fll_jax.train.cross_validate import build_steps
    from fll_jax.train.workdir import check_has_models, check_recorded_settings, read_config

    workdir = Path(workdir)
    config = read_config(workdir)
    check_has_models(workdir, config.train.folds)
    check_recorded_settings(workdir, config)
    steps = build_steps(config, steps_per_epoch=1, devices=jax.devices()[:1])
    return steps.model, [best_variables(workdir / f"fold{f}", steps.state_target) for f in config.train.folds], config
