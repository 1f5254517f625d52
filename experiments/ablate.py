"""Run a sweep of configs/ablations/*.py: every point a full cross-validation in its own folder.

  python experiments/ablate.py --config configs/ablations/sequences_and_fusions.py:quick \
      --workdir runs/ablate_quick --config.train.epochs=10
  python experiments/ablate.py --config configs/ablations/loso.py:paper --workdir runs/loso \
      --emit=slurm --slurm_nodes=2 --slurm_gpus_per_node=8     # write SLURM scripts, run nothing

Points run one after another, each in a fresh process (output in WORKDIR/logs/<point>.log); a
point finished earlier is skipped, a failed one is reported and the others go on; WORKDIR/sweep.json
records each outcome. At the end experiments/compare.py's table and forest plot are written
(--collect does only that, after points run elsewhere, as the SLURM scripts' last job). SLURM
scripts are written only when every point's config passes its check on the job's GPUs.
--config.* overrides change the base config of every point. docs/ablations.md has the details.
"""
import os
import subprocess
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from fll_jax.errors import parse_config_flags

config_flags.DEFINE_config_file("config", None, "Ablation config (configs/ablations/X.py[:quick|paper]).")
flags.DEFINE_string("workdir", None, "The sweep's folder; each point runs in WORKDIR/<point name>.")
flags.DEFINE_string("point", None, "Run only this point, in this process (what each subprocess and SLURM task does).")
flags.DEFINE_bool("prepare_only", False, "Build the data of every point and exit.")
flags.DEFINE_enum("emit", None, ["slurm"], "Write SLURM scripts into WORKDIR instead of running.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (one process per host).")
flags.DEFINE_bool("compare", True, "Write the comparison (experiments/compare.py) at the end of the sweep.")
flags.DEFINE_bool("collect", False, "Run no point: record in sweep.json which points finished (as after the SLURM "
                  "arrays) and write the comparison.")
flags.DEFINE_string("reference", None, "Point every other is compared with (default: 'base').")
flags.DEFINE_integer("slurm_nodes", 1, "Nodes per point (processes of its multi-host job).")
flags.DEFINE_integer("slurm_gpus_per_node", 1, "GPUs per node.")
flags.DEFINE_integer("slurm_cpus_per_task", 8, "CPU cores per node.")
flags.DEFINE_string("slurm_mem", "64G", "Memory per node.")
flags.DEFINE_string("slurm_time", "04:00:00", "Time limit per point.")
flags.DEFINE_string("slurm_partition", "", "Partition (empty: the cluster's default).")
flags.DEFINE_string("slurm_account", "", "Account (empty: the user's default).")
flags.DEFINE_integer("slurm_parallel", 0, "Most points running at once (0: no limit).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _points():
    from fll_jax.ablation.points import collect_points, load_sweep

    path, _, arg = config_flags.get_config_filename(FLAGS["config"]).partition(":")
    return collect_points(load_sweep(path), arg or None, FLAGS.config)


def _point_devices() -> int:
    """The devices each point's process will have, asked of a new process: the driver leaves JAX,
    and the GPUs, to its points (a multi-host driver has initialised it already)."""
    if FLAGS.distributed:
        import jax

        return jax.device_count()
    count = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], capture_output=True,
                           text=True, check=True)
    return int(count.stdout.split()[-1])


def _command() -> list[str]:
    """This command line as it would rerun, without the flags that pick a mode."""
    valued = ("--point", "--emit", *(f"--{name}" for name in FLAGS if name.startswith("slurm_")))
    switches = ("--prepare_only", "--noprepare_only", "--distributed", "--nodistributed", "--compare", "--nocompare",
                "--collect", "--nocollect")
    args, rest = [], iter(sys.argv[1:])
    for arg in rest:
        name = arg.split("=", 1)[0]
        if name in valued and "=" not in arg:
            next(rest, None)  # its value is the next argument
        elif name not in valued and name not in switches:
            args.append(arg)
    return [os.path.relpath(sys.argv[0]), *args]


def main(argv):
    from fll_jax.errors import no_stray_arguments, reported_as

    no_stray_arguments(argv)
    logging.set_verbosity(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if FLAGS.distributed:
        import jax

        jax.distributed.initialize()
    from fll_jax.ablation.points import SweepError, check_points
    from fll_jax.ablation.runner import data_sources, not_run, point_finished, run_point, run_sweep, subprocess_runner

    root = Path(FLAGS.workdir)
    with reported_as("ablate"):
        points = _points()
        if FLAGS.emit == "slurm":
            from fll_jax.ablation.slurm import Resources, write_slurm

            check_points(points, FLAGS.slurm_nodes * FLAGS.slurm_gpus_per_node)
            resources = Resources(FLAGS.slurm_nodes, FLAGS.slurm_gpus_per_node, FLAGS.slurm_cpus_per_task,
                                  FLAGS.slurm_mem, FLAGS.slurm_time, FLAGS.slurm_partition, FLAGS.slurm_account,
                                  FLAGS.slurm_parallel)
            paths = write_slurm(points, root, [sys.executable, *_command()], resources, Path.cwd(), FLAGS.compare)
            print(f"{len(points)} points; wrote {', '.join(map(str, paths))}\nsubmit with: bash {paths[-1]}")
            return
        # Else a bad base config would be recorded as every point failing.
        check_points(points, _point_devices() if not (FLAGS.point or FLAGS.prepare_only or FLAGS.collect) else 1)
        sources = data_sources(in_turn=FLAGS.distributed)
        if FLAGS.prepare_only:
            for point in points:
                sources(point.config)
            print(f"data ready for {len(points)} points")
            return
        if FLAGS.point is not None:
            point = next((p for p in points if p.name == FLAGS.point), None)
            if point is None:
                raise SweepError(f"no point {FLAGS.point!r} in this sweep; its points: {', '.join(p.name for p in points)}")
            source = sources(point.config)
            if point_finished(point, root, source.fingerprint):
                print(f"{point.name}: finished earlier")
            else:
                run_point(point, root, source)
            return
        print(f"{len(points)} points: {', '.join(p.name for p in points)}")
        run = not_run if FLAGS.collect else subprocess_runner(_command(), root)
        rows = run_sweep(points, root, run, lambda config: sources(config).fingerprint)
    for row in rows:
        print(f"{row['status']:>16}  {row['seconds']:7.0f} s  {row['name']}" + (f"\n{row['error']}" if row["error"] else ""))
    failed = [row["name"] for row in rows if row["status"] == "failed"]
    if FLAGS.compare and len(failed) < len(rows):
        from fll_jax.evaluation.comparison import write_comparison

        with reported_as("compare"):
            outputs = write_comparison(root, FLAGS.reference)
        print(f"wrote {', '.join(map(str, outputs))}")
    if failed:
        sys.exit(f"{len(failed)} point(s) failed: {', '.join(failed)} (logs in {root / 'logs'})")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_config_flags)
