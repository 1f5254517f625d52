"""Compare radiologists' calls with the model on a run's test split (the paper's reader study).

  python experiments/reader_study.py --workdir runs/demo --readers readers.csv
  python experiments/reader_study.py --workdir runs/demo            # simulated readers, a demo

The readers CSV has columns reader_id, group, lesion_id, predicted_class (class name or 0-6);
reader ids that would share a figure's file name (e.g. 'R 1' and 'R_1', or 'model') are refused.
Writes workdir/reader_study.md, reader_study.json and figures/confusion_reader_*.png, with
intervals at the run's evaluation.confidence, as in its report; an earlier study's reader figures
go. Simulated readers do not replace a study of real readers without --overwrite.
"""
from absl import app, flags

flags.DEFINE_string("workdir", None, "Run directory holding predictions.csv.", required=True)
flags.DEFINE_string("readers", None, "Readers CSV; without it, simulated readers are written and used.")
flags.DEFINE_integer("seed", 0, "Seed of the simulated readers.", lower_bound=0)
flags.DEFINE_bool("overwrite", False, "Let simulated readers replace a study of real readers.")
FLAGS = flags.FLAGS


def main(argv):
    from fll_jax.errors import no_stray_arguments, reported_as

    no_stray_arguments(argv)
    from fll_jax.evaluation.readers import write_reader_study
    from fll_jax.train.workdir import hold_run

    with reported_as("reader_study"), hold_run(FLAGS.workdir, reading=True):
        study = write_reader_study(FLAGS.workdir, FLAGS.readers, FLAGS.seed, FLAGS.overwrite)
    for group, g in study["groups"].items():
        print(f"{group}: mean accuracy {g['mean_accuracy']:.3f}, model {g['model_correct']}/{g['n_lesions']}, "
              f"McNemar exact p {', '.join(f'{p:.3f}' for p in g['mcnemar_exact_p'].values())}")
    print(f"wrote {FLAGS.workdir}: reader_study.md, reader_study.json, figures/confusion_reader_*.png")


if __name__ == "__main__":
    app.run(main)
