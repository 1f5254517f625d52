"""The main job: build the data if absent, train the folds, ensemble, evaluate, report.

  python experiments/cross_validate.py --config configs/quick.py --workdir runs/demo
  python experiments/cross_validate.py --config configs/paper.py:sequences=t2w+dwi+adc,fusion=attention \
      --workdir runs/t2_dwi_adc_attention
  python experiments/cross_validate.py --config configs/paper.py --count_params   # no training

Rerunning an interrupted command resumes each fold from its latest checkpoint. A workdir that
holds a run with other settings or other data is refused, naming what changed; --restart
deletes that run's outputs and starts over.
"""
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from fll_jax.errors import parse_config_flags

config_flags.DEFINE_config_file("config", "configs/quick.py", "Experiment config (file[:config string]).")
flags.DEFINE_string("workdir", "runs/demo", "Where config, checkpoints, predictions and report go.")
flags.DEFINE_bool("count_params", False, "Print the model's parameter count and exit without training.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (one process per host); it "
                  "finds the processes itself under SLURM, Open MPI, Kubernetes or on Cloud TPU.")
flags.DEFINE_string("coordinator", None, "With --distributed elsewhere: process 0's host:port, for every process.")
flags.DEFINE_integer("num_processes", None, "With --distributed elsewhere: how many processes there are.")
flags.DEFINE_integer("process_id", None, "With --distributed elsewhere: this process's index, 0 to num_processes - 1.")
flags.DEFINE_bool("restart", False, "Delete the run already in --workdir (checkpoints, predictions, report) "
                  "and start over, instead of refusing a run with other settings or data.")
FLAGS = flags.FLAGS


def main(argv):
    from fll_jax.errors import no_stray_arguments, reported_as

    no_stray_arguments(argv)
    # Keep the progress bar readable: library INFO logs (orbax, TFDS, TF) only on request.
    logging.set_verbosity(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    config = FLAGS.config
    given = [f"--{name}" for name in ("coordinator", "num_processes", "process_id") if FLAGS[name].present]
    if given and not FLAGS.distributed:  # else every host would run the whole job into one workdir
        raise app.UsageError(f"{', '.join(given)} take effect only with --distributed")
    if FLAGS.distributed:
        import jax

        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.count_params:
        from fll_jax.config_check import check_config
        from fll_jax.models import count_params

        with reported_as("cross_validate"):
            check_config(config, data_source=False)  # a mistyped model field is named, not a traceback
        print(f"{count_params(config.model, config.sequences, config.input_size):,} parameters "
              f"({len(config.sequences)} sequences, {config.model.fusion} fusion, depth {config.model.depth}, "
              f"width {config.model.width})")
        return
    from fll_jax.train.cross_validate import cross_validate
    from fll_jax.train.workdir import folds_text

    folds, num_folds = sorted(config.train.folds), config.data.num_folds
    if folds != list(range(num_folds)):  # `folds=3` trains fold 3 of five, not a three-fold split
        print(f"training folds {folds_text(folds)} of data.num_folds = {num_folds}; the test ensemble is their mean")
    with reported_as("cross_validate"):
        metrics = cross_validate(config, FLAGS.workdir, restart=FLAGS.restart)
    ens = metrics["test"]["ensemble"]
    print(json.dumps({k: ens[k] for k in ("accuracy_7way", "auc_binary") if k in ens}, indent=1))
    print(f"wrote {FLAGS.workdir}: config.json, predictions.csv, metrics.json, report.md")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_config_flags)
