"""A sweep as SLURM jobs: one array task per point, each task a multi-host JAX job.

The array runs `ablate.py ... --point=<name> --distributed` on every node of the task (srun starts
one process per node; jax.distributed.initialize() reads the SLURM environment). submit.sh queues
the data preparation, the training array, the evaluate-only array (after the models it
evaluates) and the comparison, each waiting on the one before through SLURM dependencies. A failed
preparation cancels both arrays; the comparison job then still runs and records in sweep.json
why no point finished.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fll_jax.ablation.points import Point
from fll_jax.ablation.runner import LOGS

TRAIN_SCRIPT = "ablate_train.slurm"
EVAL_SCRIPT = "ablate_evaluate.slurm"
SUBMIT_SCRIPT = "submit.sh"
# SLURM cancels a job whose dependency can no longer be met, instead of leaving it pending.
KILL_ON_INVALID_DEP = "--kill-on-invalid-dep=yes"


@dataclass(frozen=True)
class Resources:
    """What each array task asks SLURM for; partition and account are left out when empty."""

    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem: str = "64G"
    time: str = "04:00:00"
    partition: str = ""
    account: str = ""
    parallel: int = 0  # most array tasks at once (0: no limit)


def _host_job_options(resources: Resources) -> str:
    """sbatch options of the preparation and comparison jobs: the arrays' account, partition, time
    and host resources (a cluster may refuse a job without its account), no GPUs."""
    options = {"partition": resources.partition, "account": resources.account, "time": resources.time,
               "cpus-per-task": resources.cpus_per_task, "mem": resources.mem}
    return " ".join(shlex.quote(f"--{key}={value}") for key, value in options.items() if value != "")


def _array_script(points: Sequence[Point], root: Path, command: Sequence[str], resources: Resources,
                  job: str, repository: Path) -> str:
    limit = f"%{resources.parallel}" if resources.parallel else ""
    options = {
        "job-name": job,
        "array": f"0-{len(points) - 1}{limit}",
        "nodes": resources.nodes,
        "ntasks-per-node": 1,
        "gpus-per-node": resources.gpus_per_node,
        "cpus-per-task": resources.cpus_per_task,
        "mem": resources.mem,
        "time": resources.time,
        "output": str(root / LOGS / f"{job}_%a.out"),
        "partition": resources.partition,
        "account": resources.account,
    }
    names = "\n".join(f"  {shlex.quote(p.name)}" for p in points)
    run = shlex.join([*command, "--distributed"])
    return "\n".join([
        "#!/bin/bash",
        f"# {len(points)} point(s), one array task each (written by experiments/ablate.py --emit slurm).",
        *(f"#SBATCH --{key}={value}" for key, value in options.items() if value != ""),
        "set -euo pipefail",
        f"cd {shlex.quote(str(repository))}",
        f"POINTS=(\n{names}\n)",
        # Slurm 22.05-23.02's srun does not take --cpus-per-task from #SBATCH: each point had one core.
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi',
        f'srun {run} --point="${{POINTS[$SLURM_ARRAY_TASK_ID]}}"',
        "",
    ])


def write_slurm(points: Sequence[Point], root: str | Path, command: Sequence[str], resources: Resources,
                repository: str | Path, compare: bool = True) -> list[Path]:
    """Write the array scripts and submit.sh into root; returns their paths.

    Args:
        points: the sweep's points, training points before evaluate-only ones.
        root: the sweep's folder (absolute paths are written, so the scripts run from anywhere).
        command: the ablate.py command line without --point, e.g. [python, experiments/ablate.py,
            --config=..., --workdir=...].
        resources: what each task asks for.
        repository: the folder the commands run in.
        compare: queue, after the arrays, `command --collect`: sweep.json records each point's
            outcome (so evaluate-only points are compared with their trained points) and the
            comparison is written with the command's own --reference.
    """
    root, repository = Path(root).absolute(), Path(repository).absolute()
    root.mkdir(parents=True, exist_ok=True)
    (root / LOGS).mkdir(exist_ok=True)
    trained = [p for p in points if p.trained is None]
    evaluated = [p for p in points if p.trained is not None]
    written = [root / TRAIN_SCRIPT]
    written[0].write_text(_array_script(trained, root, command, resources, "ablate_train", repository))
    queue = [
        "#!/bin/bash",
        "# Queue the sweep: data, training array, evaluate-only array, comparison (each after the one before).",
        "# A failed data preparation cancels both arrays; the comparison still runs and records it in sweep.json.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(repository))}",
        f"prepare=$(sbatch --parsable {_host_job_options(resources)} --job-name=ablate_prepare "
        f"--output={shlex.quote(str(root / LOGS / 'prepare.out'))} "
        f"--wrap={shlex.quote(shlex.join([*command, '--prepare_only']))})",
        # A failed preparation cancels the array (without the flag it would wait forever).
        f"last=$(sbatch --parsable {KILL_ON_INVALID_DEP} --dependency=afterok:$prepare "
        f"{shlex.quote(str(root / TRAIN_SCRIPT))})",
    ]
    if evaluated:
        written.append(root / EVAL_SCRIPT)
        written[-1].write_text(_array_script(evaluated, root, command, resources, "ablate_evaluate", repository))
        # afterany: an evaluate-only point whose model failed reports that itself; the others still run.
        # afterok on the preparation: after a failed one, cancelled too, not a task per point redoing it.
        queue.append(f"last=$(sbatch --parsable {KILL_ON_INVALID_DEP} --dependency=afterany:$last,afterok:$prepare "
                     f"{shlex.quote(str(root / EVAL_SCRIPT))})")
    if compare:
        # afterany is met by an array that was cancelled too: --collect then still records each point.
        queue.append(f"sbatch {_host_job_options(resources)} --dependency=afterany:$last --job-name=ablate_compare "
                     f"--output={shlex.quote(str(root / LOGS / 'compare.out'))} "
                     f"--wrap={shlex.quote(shlex.join([*command, '--collect']))}")
    queue.append("")
    written.append(root / SUBMIT_SCRIPT)
    written[-1].write_text("\n".join(queue))
    written[-1].chmod(0o755)
    return written
