"""Compare a sweep's points with a reference on the same lesions (experiments/ablate.py runs it at the end).

  python experiments/compare.py --workdir runs/ablate_quick
  python experiments/compare.py --workdir runs/ablate_quick --pair hcc:fnh     # HCC against FNH only
  python experiments/compare.py --workdir runs/ablate_quick --reference fusion=concat

Writes comparison[_vs_REFERENCE][_PAIR].md and .csv (each point's test and out-of-fold metrics
with CIs at the level of the points' evaluation.confidence, 0.95 by default; against its
reference: McNemar exact, DeLong paired, paired bootstrap CIs, Holm) and forest[...].png; a
--reference has files of its own, beside the default comparison.
"""
from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A sweep's folder (experiments/ablate.py --workdir).")
flags.DEFINE_string("reference", None, "Point every other is compared with (default: 'base'; an evaluate-only "
                    "point's default is the point whose models it evaluates).")
flags.DEFINE_string("pair", None, "Compare on two classes only, as 'first:second' (e.g. hcc:fnh).")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def main(argv):
    from fll_jax.errors import no_stray_arguments, reported_as

    no_stray_arguments(argv)
    logging.set_verbosity(logging.ERROR)
    from fll_jax.evaluation.comparison import Task, write_comparison

    with reported_as("compare"):
        paths = write_comparison(FLAGS.workdir, FLAGS.reference, Task.parse(FLAGS.pair))
    print(paths[0].read_text())
    print(f"wrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    app.run(main)
