r"""Writes the synthetic phantom in the LLD-MMRI release layout, to demonstrate the converter.

  python data_prep/phantom_to_lld.py --manifest data/phantom_quick_seed0/manifest.csv \
      --out_dir data/lld_phantom_quick_seed0
  python data_prep/lld_mmri.py --release data/lld_phantom_quick_seed0 --out_dir data/lld_phantom_manifest

One case per phantom patient; its phases are our sequences under the release's names (T1WI
also stands in for In Phase and Out Phase; ADC is dropped, as the release has none). Each
phase's lesion boxes are the bounding boxes of that sequence's own mask. Images are flipped
(never resampled) into the release's orientation, the only one its spacing-and-origin
geometry can express; an image with a rotated or oblique affine is refused.

Folds: the phantom's dev patients are dealt into official folds 1-4 (patient-level,
class-stratified), its test patients form fold 5, so converting with --test_fold 5 gives back
a held-out test split. --unlabelled test patients are written with label -1 instead, in no
fold, as the release's validation cases were.
"""
from collections import defaultdict

import nibabel as nib
import numpy as np
from absl import app, flags

from fll_jax.data.folds import assign_folds
from fll_jax.data.boxes import bounding_box
from fll_jax.data.lld_mmri import ReleaseCase, ReleasePhase, release_oriented, write_release
from fll_jax.data.manifest import read_manifest
from fll_jax.errors import no_stray_arguments, reported_as

_MANIFEST = flags.DEFINE_string("manifest", "data/phantom_quick_seed0/manifest.csv", "The phantom's manifest.")
_OUT_DIR = flags.DEFINE_string("out_dir", "data/lld_phantom_quick_seed0", "Folder for the release layout.")
_UNLABELLED = flags.DEFINE_integer("unlabelled", 3, "Test patients written as unlabelled (-1) cases.",
                                     lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the folds and of the choice of unlabelled patients.",
                              lower_bound=0)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier release in --out_dir.")

# Release phase -> phantom sequence.
PHASE_SOURCES = {"T2WI": "t2w", "DWI": "dwi", "In Phase": "t1w", "Out Phase": "t1w",
                 "C-pre": "t1w", "C+A": "lap", "C+V": "pvp", "C+Delay": "dp"}
DEV_FOLDS = 4  # official folds 1-4; fold 5 is the phantom's test split


def _phase(lesions, phase: str, sequence: str) -> ReleasePhase:
    """One phase of a patient: its image and each lesion's box in its own mask."""
    image = nib.load(lesions[0].images[sequence])
    mask = nib.load(lesions[0].masks[sequence])
    try:
        array, geometry = release_oriented(np.asanyarray(image.dataobj), image.affine)
        labels, _ = release_oriented(np.asarray(mask.dataobj), mask.affine)
    except ValueError as e:
        raise app.UsageError(f"{lesions[0].images[sequence]}: {e}") from None
    boxes = {k: bounding_box(labels == lesion.mask_value) for k, lesion in enumerate(lesions)}
    return ReleasePhase(phase, array, geometry, boxes)


def _official_folds(records, unlabelled: set[str], seed: int) -> dict[str, int | None]:
    """Patient -> official fold: dev patients 1-4, test patients 5, unlabelled ones None."""
    dev = [r for r in records if r.split == "dev"]
    folds = assign_folds([r.patient_id for r in dev], [r.label for r in dev], ["dev"] * len(dev),
                         num_folds=DEV_FOLDS, seed=seed)
    official = {r.patient_id: int(k) + 1 for r, k in zip(dev, folds)}
    official |= {r.patient_id: None if r.patient_id in unlabelled else DEV_FOLDS + 1
                 for r in records if r.split == "test"}
    return official


def _unlabelled_patients(records, count: int, seed: int) -> set[str]:
    test = sorted({r.patient_id for r in records if r.split == "test"})
    if count < 0:
        raise app.UsageError(f"--unlabelled {count}: must be 0 or more")
    if count > len(test) - 1:
        raise app.UsageError(f"--unlabelled {count}: the phantom has {len(test)} test patients and fold 5 needs one")
    return set(np.random.default_rng(seed).permutation(test)[:count].tolist())


def main(argv):
    no_stray_arguments(argv)
    with reported_as("phantom_to_lld"):
        records = read_manifest(_MANIFEST.value, check_masks=False)
        unlabelled = _unlabelled_patients(records, _UNLABELLED.value, _SEED.value)
        folds = _official_folds(records, unlabelled, _SEED.value)
        patients = defaultdict(list)
        for record in records:
            patients[record.patient_id].append(record)
        cases = [ReleaseCase(case, [_phase(lesions, p, s) for p, s in PHASE_SOURCES.items()],
                             [None if case in unlabelled else r.label for r in lesions], folds[case])
                 for case, lesions in sorted(patients.items())]
        path = write_release(_OUT_DIR.value, cases, overwrite=_OVERWRITE.value)
    print(f"wrote {len(cases)} cases ({len(unlabelled)} unlabelled) in the LLD-MMRI layout; annotation {path}")


if __name__ == "__main__":
    app.run(main)
