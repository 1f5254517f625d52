"""Regenerate a run's report from its predictions.csv and config.json, without retraining.

  python experiments/report.py --workdir runs/demo

Writes workdir/metrics.json, workdir/report.md and workdir/figures/ (the same code the main job runs).
"""
import json

from absl import app, flags

flags.DEFINE_string("workdir", None, "Run directory holding predictions.csv and config.json.", required=True)
FLAGS = flags.FLAGS


def main(argv):
    from fll_jax.errors import no_stray_arguments, reported_as

    no_stray_arguments(argv)
    from fll_jax.evaluation.report import write_report
    from fll_jax.train.workdir import hold_run

    with reported_as("report"), hold_run(FLAGS.workdir, reading=True):
        metrics = write_report(FLAGS.workdir)
    ens = metrics["test"]["ensemble"]
    print(json.dumps({k: ens[k] for k in ("accuracy_7way", "accuracy_2way", "auc_binary", "macro_f1", "cohen_kappa")}, indent=1))
    print(f"wrote {FLAGS.workdir}: metrics.json, report.md, figures/")


if __name__ == "__main__":
    app.run(main)
