r"""Converts a DICOM study folder to de-identified NIfTI volumes with JSON sidecars (docs/dicom.md).

  python data_prep/dicom_to_nifti.py --study path/to/study --out_dir nifti/ --salt "$SECRET"
  FLL_DICOM_SALT="$SECRET" python data_prep/dicom_to_nifti.py --study path/to/study --out_dir nifti/
  python data_prep/dicom_to_nifti.py --study path/to/study --out_dir nifti/ --id_map ids.csv
  python data_prep/dicom_to_nifti.py ... --mapping site_sequences.json   # a site's sequence rules

Writes <out_dir>/<subject_id>/<series>.nii.gz and .json, and series.csv listing every volume with
its study and sequence guess (edit that column before building a manifest; a patient's studies
share the folder, and one lesion's sequences must come from one study). Series that cannot be
stacked are listed as refused, with the reason, and the rest converted; exit status 1 (one
message, no traceback) means the study could not be converted at all: no salt or id map, no DICOM
images, a PatientID missing from the id map, or a patient converted before (--overwrite replaces
it).
"""
import os

from absl import app, flags

from fll_jax.data import dicom
from fll_jax.errors import no_stray_arguments, reported_as

PROGRAM = "dicom_to_nifti"
_STUDY = flags.DEFINE_string("study", None, "Folder holding the study's DICOM files (searched recursively).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder; gets one <subject_id>/ folder per patient.")
_SALT = flags.DEFINE_string(
    "salt", None, "Secret (>= 16 characters) hashed with the PatientID into the subject id; defaults to the "
    "FLL_DICOM_SALT environment variable, which keeps it out of the shell history. Keep the same salt for all "
    "studies so a patient keeps one id.")
_ID_MAP = flags.DEFINE_string("id_map", None, "Instead of --salt: CSV with columns patient_id,subject_id.")
_MAPPING = flags.DEFINE_string(
    "mapping", None, "JSON file of a site's sequence rules, tried before fll_jax/data/sequence_map.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a patient converted before (its series.csv exists).")
flags.mark_flags_as_required(["study", "out_dir"])


def main(argv):
    no_stray_arguments(argv)
    salt = _SALT.value
    if salt is None and _ID_MAP.value is None:
        salt = os.environ.get("FLL_DICOM_SALT")
    # Checked here too, to name the flags; the library names its arguments.
    if (salt is None) == (_ID_MAP.value is None):
        raise SystemExit(f"{PROGRAM}: give --salt (or set FLL_DICOM_SALT) or --id_map, not both: subject ids are a "
                         "salted hash of the PatientID or come from your CSV")
    with reported_as(PROGRAM):
        results = dicom.convert_study(_STUDY.value, _OUT_DIR.value, salt=salt, id_map=_ID_MAP.value,
                                      mapping=_MAPPING.value, overwrite=_OVERWRITE.value)
    refused = sum(result.status == "refused" for result in results)
    subjects = sorted({result.subject_id for result in results})
    print(f"{len(results) - refused} volume(s) written, {refused} series refused; see series.csv under "
          + ", ".join(f"{_OUT_DIR.value}/{subject}/" for subject in subjects))


if __name__ == "__main__":
    app.run(main)
