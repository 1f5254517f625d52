r"""Turns the public LLD-MMRI 2023 release into a manifest (docs/lld_mmri.md).

  python data_prep/lld_mmri.py --release /path/to/LLD-MMRI2023 --out_dir data/lld_mmri
  python data_prep/lld_mmri.py --release /path/to/LLD-MMRI2023 --out_dir data/lld_mmri \
      --test_fold none --phase_map 'C-pre=t1w,C+A=lap,C+V=pvp,C+Delay=dp,T2WI=t2w,DWI=dwi'

Writes out_dir/manifest.csv (labelled lesions with the official folds; --test_fold's fold is
the held-out test split), out_dir/unlabelled.csv (the cases labelled -1, for prediction) and
out_dir/images/ (copies of the mapped phases carrying the geometry of Annotation.json). A bad
release is refused with every problem listed, before anything is written. --overwrite replaces
an earlier conversion's outputs whole, once the new ones are complete.
"""
from absl import app, flags

from fll_jax.data import lld_mmri
from fll_jax.errors import no_stray_arguments, reported_as

_RELEASE = flags.DEFINE_string("release", None, "The release folder (images/, labels/, classification_dataset/).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for manifest.csv, unlabelled.csv and images/.")
_TEST_FOLD = flags.DEFINE_string(
    "test_fold", "5", "Official fold (val_fold<k>.txt) held out as the test split, or 'none' to keep all five "
    "folds for development (training refuses a manifest without test rows: add another set's as split "
    "'test' first; docs/lld_mmri.md).")
_PHASE_MAP = flags.DEFINE_string(
    "phase_map", "", "Phase=sequence pairs joined by ',' (default: "
    + ",".join(f"{p}={s}" for p, s in lld_mmri.DEFAULT_PHASE_MAP.items()) + ").")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an earlier conversion in --out_dir whole (its images/, manifest.csv and "
    "unlabelled.csv; other files stay), once the new one has succeeded.")
flags.mark_flags_as_required(["release", "out_dir"])


def _test_fold(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    if not text.strip().isdigit():
        raise app.UsageError(f"--test_fold must be a fold number (1-5) or 'none', got {text!r}")
    return int(text)


def main(argv):
    no_stray_arguments(argv)
    try:
        phase_map = lld_mmri.parse_phase_map(_PHASE_MAP.value) if _PHASE_MAP.value else None
    except ValueError as e:
        raise app.UsageError(f"--phase_map: {e}") from None
    with reported_as("lld_mmri"):
        result = lld_mmri.convert_release(_RELEASE.value, _OUT_DIR.value, phase_map=phase_map,
                                          test_fold=_test_fold(_TEST_FOLD.value), overwrite=_OVERWRITE.value)
    if result.manifest:
        print(f"wrote {result.manifest} ({result.lesions} labelled lesions)")
    if result.unlabelled:
        print(f"wrote {result.unlabelled} ({result.unlabelled_lesions} unlabelled lesions, for prediction)")


if __name__ == "__main__":
    app.run(main)
