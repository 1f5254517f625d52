r"""Writes the synthetic phantom in the folder layout (docs/folders.md), to demonstrate build_manifest.

  python data_prep/phantom_to_folders.py --out_dir data/phantom_folders
  python data_prep/build_manifest.py --root data/phantom_folders
  python data_prep/phantom_to_folders.py --out_dir data/phantom_boxes --boxes_only
  python data_prep/build_manifest.py --root data/phantom_boxes
  python data_prep/phantom_to_folders.py --out_dir data/phantom_missing --drop adc --drop_rate 0.1 --seed 0

One folder per phantom patient, its images hard-linked (or copied) from the phantom. With masks,
each sequence's mask goes beside its image; with --boxes_only no mask is written and each lesion's
{s}_box in labels.csv is the bounding box of its voxels in that sequence's mask. labels.csv keeps
the phantom's own dev/test split, so results compare with runs on the phantom itself.

Missing sequences: --drop leaves the listed sequences out for every patient; --drop_rate removes
one random sequence from that share of the patients (--seed picks them), never a patient's last.
"""
import dataclasses

import numpy as np
from absl import app, flags

from fll_jax.constants import SEQUENCES, sequence_index
from fll_jax.data.folders import write_folders
from fll_jax.data.manifest import LesionRecord, read_manifest
from fll_jax.errors import no_stray_arguments, reported_as

_MANIFEST = flags.DEFINE_string("manifest", "data/phantom_quick_seed0/manifest.csv", "The phantom's manifest.")
_OUT_DIR = flags.DEFINE_string("out_dir", "data/phantom_folders", "New (or empty) folder for the layout.")
_BOXES_ONLY = flags.DEFINE_bool("boxes_only", False, "Write lesion boxes in labels.csv instead of mask files.")
_DROP = flags.DEFINE_list("drop", [], "Sequences left out for every patient (comma list, e.g. adc,dwi).")
_DROP_RATE = flags.DEFINE_float("drop_rate", 0.0, "Share of patients that lose one random sequence.",
                                 lower_bound=0, upper_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the patients and sequences --drop_rate removes.",
                              lower_bound=0)


def _dropped(names: list[str]) -> set[str]:
    """The --drop sequences, checked by name; at least one sequence must remain."""
    dropped = {name.strip() for name in names}
    try:
        for name in dropped:
            sequence_index(name)
    except ValueError as e:
        raise app.UsageError(f"--drop: {e}") from None
    if dropped == set(SEQUENCES):
        raise app.UsageError("--drop leaves no sequence")
    return dropped


def _random_drops(records: list[LesionRecord], rate: float, seed: int) -> dict[str, str]:
    """Patient -> the one sequence removed, for round(rate * patients) patients with two or more."""
    present = {r.patient_id: r.sequences for r in records}
    rng = np.random.default_rng(seed)
    chosen = rng.choice(sorted(present), size=round(rate * len(present)), replace=False)
    return {p: str(rng.choice(present[p])) for p in chosen if len(present[p]) > 1}


def _without(record: LesionRecord, sequences: set[str]) -> LesionRecord:
    """The record with those sequences absent (no image, mask or box)."""

    def keep(files):
        return {s: v for s, v in files.items() if s not in sequences}

    return dataclasses.replace(record, images=keep(record.images), masks=keep(record.masks), boxes=keep(record.boxes))


def main(argv):
    no_stray_arguments(argv)
    dropped = _dropped(_DROP.value)
    with reported_as("phantom_to_folders"):
        records = [_without(r, dropped) for r in read_manifest(_MANIFEST.value, check_masks=False)]
        random_drops = _random_drops(records, _DROP_RATE.value, _SEED.value)
        records = [_without(r, {random_drops[r.patient_id]}) if r.patient_id in random_drops else r for r in records]
        labels = write_folders(records, _OUT_DIR.value, boxes_only=_BOXES_ONLY.value)
    kind = "lesion boxes" if _BOXES_ONLY.value else "masks"
    print(f"wrote {len({r.patient_id for r in records})} patients, {len(records)} lesions with {kind}; {labels}")
    if dropped or random_drops:
        print(f"left out: {', '.join(sorted(dropped)) or 'nothing'} for every patient; one sequence of "
              f"{len(random_drops)} patient(s) ({', '.join(f'{p} {s}' for p, s in sorted(random_drops.items()))})")


if __name__ == "__main__":
    app.run(main)
