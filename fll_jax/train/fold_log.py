"""A fold's TensorBoard run, written as it is logged, so that an epoch once flushed survives a kill.

tensorboardX's SummaryWriter hands its events to a thread through a queue, and its flush() writes
only what that thread has taken; the rest reaches the disk at the thread's next flush, up to two
minutes later. An epoch's last scalars, logged just before a SIGKILL (the OOM killer, a lost
node), were then lost for good: the resumed run hides what the stopped one logged after its
latest checkpoint and repeats only the epochs after it.
"""
from __future__ import annotations

import time
from pathlib import Path

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.summary import scalar


class FoldLog:
    """Scalars of one fold against its global step, in the TensorBoard run `logdir/fold<k>`.

    Opened at the fold's global `step` (its resumed state's, or 0), it hides from TensorBoard what
    an earlier attempt logged after that step (a session start at step + 1, which TensorBoard
    reads as a purge): a resumed fold trains again the epochs after its latest checkpoint, and
    each would otherwise show twice.
    """

    def __init__(self, logdir: str | Path, fold: int, step: int):
        folder = Path(logdir) / f"fold{fold}"
        folder.mkdir(parents=True, exist_ok=True)
        # Named to the nanosecond: tensorboardX's own name, to the second, had a retry within the
        # second overwrite the first attempt's file; TensorBoard reads a run's files in name order.
        self._events = EventsWriter(str(folder / "events"), filename_suffix=f".{time.time_ns()}")
        self._events.write_event(Event(wall_time=time.time(), step=step + 1,
                                       session_log=SessionLog(status=SessionLog.START)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._events.write_event(Event(wall_time=time.time(), step=step, summary=scalar(tag, value)))

    def flush(self) -> None:
        """Everything logged so far, on disk (fsync)."""
        self._events.flush()

    def close(self) -> None:
        self._events.close()
