"""What each sequence is worth to a trained ensemble: test metrics with it hidden at inference.

  python experiments/missing_sequences.py --workdir runs/demo

For the config's sequences one by one, every test lesion loses that sequence (zero features and
a presence flag, as a lesion without it would be seen); no retraining. Sequences the run's
evaluation hides (evaluation.hidden_sequences) stay hidden in every row. Writes
workdir/missing_at_inference.json and adds the table to report.md (fll_jax/inference.py).
"""
from absl import app, flags, logging

from fll_jax.errors import no_stray_arguments, reported_as

flags.DEFINE_string("workdir", "runs/demo", "A finished cross-validation workdir.")
FLAGS = flags.FLAGS


def main(argv):
    no_stray_arguments(argv)
    logging.set_verbosity(logging.ERROR)  # orbax's INFO lines
    from fll_jax.evaluation.report import write_report
    from fll_jax.inference import missing_at_inference
    from fll_jax.train.workdir import hold_run

    with reported_as("missing_sequences"), hold_run(FLAGS.workdir, reading=True):
        result = missing_at_inference(FLAGS.workdir)
        write_report(FLAGS.workdir)
    print(f"trained with sequence dropout {result['sequence_dropout']:g}")
    if result["hidden_by_run"]:
        print(f"{', '.join(result['hidden_by_run'])} hidden in every row, as in the run's evaluation")
    for row in result["rows"]:
        auc = "-" if row["auc_binary"] is None else f"{row['auc_binary']:.3f}"
        print(f"hidden {row['hidden']:>5}: n {row['n']}, ACC 7-way {row['accuracy_7way']:.3f}, "
              f"ACC 2-way {row['accuracy_2way']:.3f}, AUC 2-way {auc}")


if __name__ == "__main__":
    app.run(main)
