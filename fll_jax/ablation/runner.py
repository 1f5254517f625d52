"""Running a sweep's points one after another: finished points are skipped, a failed point is
reported and the others go on; sweep.json records every point's outcome."""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import ml_collections

from fll_jax.ablation.points import Point, SweepError
from fll_jax.files import read_json, write_json
from fll_jax.code_version import code_version
from fll_jax.train.workdir import (
    FINGERPRINT_FILE, RESTART, WorkdirError, evaluated_current, hold_run, is_finished, run_changes, run_fingerprint,
    trained_code,
)

SWEEP_FILE = "sweep.json"
LOGS = "logs"
# How long a point stopped with its driver may take to finish its cleanup (a checkpoint being saved).
STOP_WAIT_S = 120


class PointError(RuntimeError):
    """A point's run failed; the message says how and where its log is."""


def run_point(point: Point, root: str | Path, source=None) -> dict:
    """Train and evaluate one point into root/<name> (or, for an evaluate-only point, evaluate its
    trained point's fold models); returns the run's metrics."""
    from fll_jax.train.cross_validate import cross_validate, evaluate_trained

    workdir = Path(root) / point.name
    try:
        if point.trained is not None:
            return evaluate_trained(point.config, workdir, Path(root) / point.trained, source)
        return cross_validate(point.config, workdir, source)
    except WorkdirError as error:  # ablate.py has no --restart: a point's own folder is the one to delete
        raise WorkdirError(str(error).replace(RESTART, f"delete {workdir} and rerun the sweep, or use another "
                                                       "--workdir")) from None


def point_finished(point: Point, root: str | Path, data: dict) -> bool:
    """Whether root/<name> holds the point's completed run on data of this fingerprint (for an
    evaluate-only point, of the fold models its trained point holds now)."""
    workdir = Path(root) / point.name
    if point.trained is not None and not evaluated_current(workdir, Path(root) / point.trained):
        return False
    return is_finished(workdir, point.config, data)


def data_sources(in_turn: bool = False) -> Callable[[ml_collections.ConfigDict], object]:
    """config -> its data source (with its fingerprint), prepared once per distinct data setting
    (fll_jax/data/prepare.py).

    in_turn: the processes of a multi-process run prepare it process 0 first (all at once, each
    would build the same files over the others'). Only then, since it starts JAX, which a sweep's
    driver must leave to its points' processes.
    """
    if in_turn:
        from fll_jax.train.cross_validate import prepared_in_turn as prepare
    else:
        from fll_jax.data.prepare import prepare_source as prepare

    cache: dict[str, object] = {}

    def source(config: ml_collections.ConfigDict):
        key = config.data.to_json()
        if key not in cache:
            cache[key] = prepare(config)
        return cache[key]

    return source


def _last_lines(path: Path, count: int = 6) -> str:
    # Progress bars rewrite one line with '\r': split on both so only their last state shows.
    lines = [line.strip() for line in path.read_text(errors="replace").replace("\r", "\n").split("\n")]
    return "\n".join([line for line in lines if line][-count:])


def _stop(process: subprocess.Popen, signal_it: bool) -> None:
    """Let a point's process end with its cleanup: SIGTERM when signal_it (Ctrl-C reaches it
    already, in the driver's process group), at most STOP_WAIT_S seconds, then SIGKILL."""
    if signal_it:
        process.terminate()
    try:
        process.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def subprocess_runner(command: Sequence[str], root: str | Path) -> Callable[[Point], None]:
    """run(point): `command --point=<name>` in a fresh Python process (so a crash or the memory one
    point holds cannot touch the next), its output in root/logs/<name>.log."""
    logs = Path(root) / LOGS

    def run(point: Point) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{point.name}.log"
        args = [sys.executable, *command, f"--point={point.name}"]
        with open(log, "a") as out:  # appended: a refused rerun must not replace a finished point's log
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(args)}\n")
            out.flush()
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
            try:
                code = process.wait()
            except BaseException as stop:  # the driver stopped: so does the point, after its own cleanup
                _stop(process, signal_it=not isinstance(stop, KeyboardInterrupt))
                raise
        if code:
            raise PointError(f"exit status {code}; the end of {log}:\n{_last_lines(log)}")

    return run


def not_run(point: Point) -> None:
    """run(point) for a sweep whose points ran elsewhere (SLURM array tasks): a point not found
    finished is reported failed, so that sweep.json records what each task left."""
    raise PointError("not finished: its task failed or did not run (see logs/; a failed data preparation, "
                     "logs/prepare.out, cancels every task)")


def run_sweep(points: Sequence[Point], root: str | Path, run: Callable[[Point], None],
              data: Callable[[ml_collections.ConfigDict], dict]) -> list[dict]:
    """Run every point not yet finished with run(point), in order, and record each outcome.

    Args:
        points: the sweep's points (fll_jax/ablation/points.py).
        root: the sweep's folder; point p runs in root/<p.name>.
        run: runs one point (run_point in this process, or subprocess_runner).
        data: config -> data fingerprint, to tell a finished point from a stale one.

    Returns:
        One row per point: name, trained, status ('finished earlier', 'done' or 'failed'),
        seconds and, when failed, the error (a point finished earlier by other code than this
        also has a note saying so); also written to root/sweep.json after each point.
    """
    root = Path(root)
    # A second sweep driver would rewrite the running point's log and record it failed.
    with hold_run(root, held_by="an ablate.py running this sweep", remedy="use another --workdir for this sweep"):
        other = _other_runs(points, root, data)
        if other:  # each would fail, and sweep.json then count finished runs as failed points
            raise SweepError(f"{root} holds runs of other settings or data than this sweep's points; nothing was "
                             "changed:\n  " + "\n  ".join(other) + "\nUse another --workdir for this sweep, or "
                             "delete those points' folders to run them again.")
        return _run_points(points, root, run, data)


def _other_runs(points: Sequence[Point], root: Path, data: Callable[[ml_collections.ConfigDict], dict]) -> list[str]:
    """A line for each point whose folder holds a run of other settings or data, naming what differs."""
    lines = []
    for point in points:
        if not (root / point.name / FINGERPRINT_FILE).exists():
            continue  # no run recorded: its data need not be prepared here
        changes = run_changes(root / point.name, run_fingerprint(point.config, data(point.config)))
        if changes:
            lines.append(f"{point.name}: {'; '.join(changes[:4])}{' ...' if len(changes) > 4 else ''}")
    return lines


def _run_points(points: Sequence[Point], root: Path, run: Callable[[Point], None],
                data: Callable[[ml_collections.ConfigDict], dict]) -> list[dict]:
    rows: list[dict] = []
    for point in points:
        start = time.perf_counter()
        row = {"name": point.name, "trained": point.trained, "status": "done", "error": None}
        try:
            if point_finished(point, root, data(point.config)):
                row["status"] = "finished earlier"
                trained = trained_code(root / point.name)
                if trained != [code_version()]:  # reused unsaid, it would be compared with points of this code
                    row["note"] = f"its models were trained by {', '.join(trained)}; this is {code_version()}"
                    print(f"{point.name}: finished earlier; {row['note']}", flush=True)
            else:
                print(f"[{len(rows) + 1}/{len(points)}] {point.name}", flush=True)
                run(point)
        except Exception as error:  # noqa: BLE001  (a failed point must not stop the sweep)
            row.update(status="failed", error=f"{type(error).__name__}: {error}")
            print(f"  failed: {row['error']}", flush=True)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        write_json(root / SWEEP_FILE, {"points": rows + [{"name": p.name, "trained": p.trained, "status": "pending"}
                                                          for p in points[len(rows):]]}, indent=1)
    return rows


def read_sweep(root: str | Path) -> list[dict]:
    """The rows of root/sweep.json ([] when the folder has none)."""
    path = Path(root) / SWEEP_FILE
    return read_json(path, "it is rewritten by rerunning experiments/ablate.py")["points"] if path.exists() else []
