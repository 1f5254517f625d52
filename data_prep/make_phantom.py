r"""Writes the synthetic liver-lesion MRI phantom: NIfTI files plus manifest.csv.

  python data_prep/make_phantom.py --out_dir data/phantom_quick_seed0 --scale quick
  python data_prep/make_phantom.py --out_dir data/phantom_paper_seed0 --scale paper --workers 2

The same --seed writes the same bytes. An existing manifest in --out_dir is only replaced
with --overwrite.
"""
from absl import app, flags

from fll_jax.data import phantom
from fll_jax.errors import no_stray_arguments, reported_as

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for patients/, manifest.csv, phantom_truth.json.")
_SCALE = flags.DEFINE_enum("scale", "quick", list(phantom.SCALES), "Cohort size (see fll_jax.data.phantom.SCALES).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the cohort.", lower_bound=0)
_ATYPICAL_RATE = flags.DEFINE_float(
    "atypical_rate", 0.1, "Fraction of lesions showing a confuser class's pattern on one or two sequences.",
    lower_bound=0, upper_bound=1)
_WORKERS = flags.DEFINE_integer("workers", 2, "Processes generating patients in parallel.", lower_bound=1)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing phantom in --out_dir.")
flags.mark_flag_as_required("out_dir")


def main(argv):
    no_stray_arguments(argv)
    with reported_as("make_phantom"):
        manifest = phantom.generate_phantom(
            _OUT_DIR.value, scale=_SCALE.value, seed=_SEED.value, atypical_rate=_ATYPICAL_RATE.value,
            workers=_WORKERS.value, overwrite=_OVERWRITE.value)
    print(f"wrote {manifest}")


if __name__ == "__main__":
    app.run(main)
