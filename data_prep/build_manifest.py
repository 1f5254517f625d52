r"""Builds a manifest from a study kept as one folder per patient (docs/folders.md), or from the
patients data_prep/dicom_to_nifti.py converted into one folder (docs/dicom.md).

  python data_prep/build_manifest.py --root data/my_study
  python data_prep/build_manifest.py --root data/my_study --test_fraction 0.25 --seed 1
  python data_prep/build_manifest.py --root data/new_cases --unlabelled      # for experiments/predict.py

Writes <root>/manifest.csv (or --out) after checking the folders, labels.csv and every file, and
prints the lesions per split and the sequences lesions lack. Every problem is listed at once and
nothing is written. Train on it with
--config.data.source manifest --config.data.manifest <root>/manifest.csv.
"""
from collections import Counter

from absl import app, flags

from fll_jax.constants import SEQUENCES
from fll_jax.data.folders import build_manifest, split_counts
from fll_jax.data.manifest import read_manifest
from fll_jax.errors import no_stray_arguments, reported_as

_ROOT = flags.DEFINE_string("root", None, "The study folder: labels.csv and one folder per patient.")
_OUT = flags.DEFINE_string("out", "", "The manifest to write (default: <root>/manifest.csv).")
_TEST_FRACTION = flags.DEFINE_float(
    "test_fraction", 0.2, "Share of patients drawn for the test split when labels.csv has no split column.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of that draw.", lower_bound=0)
_UNLABELLED = flags.DEFINE_bool("unlabelled", False, "A prediction manifest: labels may be empty, no split is drawn.")
_IGNORE_UNKNOWN = flags.DEFINE_bool(
    "ignore_unknown_files", False, "Skip files in patient folders that name no sequence instead of refusing them.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing manifest with other content.")
flags.mark_flag_as_required("root")


def _summary(records) -> list[str]:
    """Lines: lesions and patients, each split, and how many lesions lack each sequence."""
    lines = [f"{len(records)} lesions in {len({r.patient_id for r in records})} patients"]
    lines += [f"  {split or 'no split'}: {p} patients, {n} lesions" for split, (p, n) in split_counts(records).items()]
    lacking = Counter(s for r in records for s in SEQUENCES if s not in r.images)
    lines.append("lesions lacking a sequence: " + (", ".join(f"{s} {lacking[s]}" for s in SEQUENCES if lacking[s])
                                                   or "none"))
    return lines


def main(argv):
    no_stray_arguments(argv)
    with reported_as("build_manifest"):
        path = build_manifest(_ROOT.value, _OUT.value or None, test_fraction=_TEST_FRACTION.value, seed=_SEED.value,
                              labelled=not _UNLABELLED.value, ignore_unknown_files=_IGNORE_UNKNOWN.value,
                              overwrite=_OVERWRITE.value)
        records = read_manifest(path, check_files=False, check_masks=False, labelled=not _UNLABELLED.value)
    print(f"wrote {path}")
    print("\n".join(_summary(records)))


if __name__ == "__main__":
    app.run(main)
