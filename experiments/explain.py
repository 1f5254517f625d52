"""Saliency for a cross-validation workdir: maps, sequence importance, NIfTI overlays, scores.

  python experiments/explain.py --workdir runs/demo
  python experiments/explain.py --workdir runs/demo --split val --num_per_class 0 --score
  python experiments/explain.py --workdir runs/demo --method gradcam --head binary

Writes workdir/explain/<split>/ (see fll_jax/saliency/explain.py); the logic lives there.
"""
import json

from absl import app, flags, logging

from fll_jax.errors import no_stray_arguments, reported_as
from fll_jax.saliency.explain import EXPLAINED, METHODS, SPLITS, Settings, explain_workdir, scores_markdown
from fll_jax.saliency.integrated_gradients import BASELINES, QUADRATURES
from fll_jax.saliency.target import HEADS, OUTPUTS

flags.DEFINE_string("workdir", "runs/demo", "A cross-validation workdir (config.json and fold checkpoints).")
flags.DEFINE_integer("num_per_class", 2, "Lesions explained per class (0: all of the split).", lower_bound=0)
flags.DEFINE_enum("split", "test", SPLITS, "test: the fold ensemble on test lesions; val: each development "
                  "lesion by the fold model that held it out.")
flags.DEFINE_integer("steps", 64, "Integration steps (IG) or noise samples (SmoothGrad).")
flags.DEFINE_enum("method", "ig", METHODS, "Attribution map.")
flags.DEFINE_enum("head", "seven", list(HEADS), "Explained head.")
flags.DEFINE_enum("output", "prob", OUTPUTS, "Explain the class probability or the logit.")
flags.DEFINE_enum("baseline", "mean", BASELINES, "IG baseline and occlusion fill (mean: each sequence's mean "
                  "intensity, so a sequence's attribution is its contrast, not its brightness).")
flags.DEFINE_enum("quadrature", "trapezoid", QUADRATURES, "IG quadrature rule (adaptive: for the zeros baseline).")
flags.DEFINE_enum("explain", "predicted", EXPLAINED, "Explain the predicted or the true class.")
flags.DEFINE_integer("chunk", 16, "Inputs per compiled batch (bounds memory; changes no map, so a rerun with "
                     "only another chunk is not refused).")
flags.DEFINE_bool("score", False, "Score the maps against the synthetic phantom's key sequences (the signatures it "
                  "draws into each class) and run the randomisation check. Phantom runs only: refused for a run on "
                  "other data (config data.source not 'phantom'), where those sequences mean nothing.")
flags.DEFINE_string("out_dir", None, "Output folder (default workdir/explain/<split>, whose maps the report shows); "
                    "inside workdir/explain only workdir/explain/<split>.")
flags.DEFINE_bool("overwrite", False, "Replace explanations made earlier with other arguments, or the files of a "
                  "folder without summary.json.")
FLAGS = flags.FLAGS


def main(argv):
    no_stray_arguments(argv)
    logging.set_verbosity(logging.ERROR)  # orbax's INFO lines would bury the progress bar
    settings = Settings(
        method=FLAGS.method, head=FLAGS.head, output=FLAGS.output, baseline=FLAGS.baseline, steps=FLAGS.steps,
        quadrature=FLAGS.quadrature, chunk=FLAGS.chunk, explained=FLAGS.explain,
    )
    try:
        settings.check()
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    with reported_as("explain"):
        summary = explain_workdir(
            FLAGS.workdir, num_per_class=FLAGS.num_per_class or None, split=FLAGS.split, score=FLAGS.score,
            settings=settings, out_dir=FLAGS.out_dir, overwrite=FLAGS.overwrite,
        )
    print(json.dumps({k: summary[k] for k in ("num_lesions", "accuracy", "completeness") if k in summary}, indent=1))
    if FLAGS.score:
        print(scores_markdown(summary))


if __name__ == "__main__":
    app.run(main)
