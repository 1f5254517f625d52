r"""A trained workdir's five-model ensemble on new lesions (fll_jax/inference.py).

  python experiments/predict.py --workdir runs/demo --manifest new/manifest.csv --out_dir runs/demo/predict
  python experiments/predict.py --workdir runs/demo --folder data/new_cases --out_dir runs/demo/predict
  FLL_DICOM_SALT=... python experiments/predict.py --workdir runs/demo --dicom study/ \
      --box_mm "x0 y0 z0 x1 y1 z1" --out_dir runs/demo/predict --saliency

A manifest may leave label and split empty; a folder follows docs/folders.md; a DICOM study is
converted (docs/dicom.md) into out_dir/nifti/ and its lesions given as world boxes in mm (RAS+),
one --box_mm each.
Writes out_dir/predictions.csv, challenge.json and models.json (which fold models made them), and
saliency/ with --saliency. Lesions the model cannot take (another preprocessing, none of its
sequences) are refused, naming each.
An out_dir holding an earlier run's outputs (or the manifest.csv a --folder run writes there) is
refused before anything is converted or written. --overwrite replaces the outputs, and --folder's
manifest.csv, once the new run has succeeded; saliency/ also when the new run has none, and an
earlier --folder run's manifest.csv (as its models.json records) when the new run has none. nifti/
keeps every study converted into it: a study converted there before is taken from its
series.csv, with your edits (to pick one of two volumes guessed the same sequence, say), unless
--reconvert; another study of that patient there is refused unless --reconvert. An out_dir
holding a cross-validation run, or inside --folder, is always refused; so is a workdir whose run
is unfinished or evaluate-only (it has no models of its own). The run's data checks apply to the
new lesions; a mask value that none of them claims is refused (a liver label beside the tumour
would otherwise be predicted): to predict some of the lesions a patient's mask holds, pass
--allow unclaimed_mask_value.
"""
import contextlib
import os
from pathlib import Path

from absl import app, flags, logging

from fll_jax.errors import no_stray_arguments, reported_as

flags.DEFINE_string("workdir", "runs/demo", "A finished cross-validation workdir.")
flags.DEFINE_string("manifest", None, "A manifest of the new lesions (label and split may be empty).")
flags.DEFINE_string("folder", None, "A folder in the layout of docs/folders.md (labels.csv, one folder per patient).")
flags.DEFINE_bool("ignore_unknown_files", False, "With --folder: skip files in patient folders that name no sequence "
                  "(notes, a liver segmentation) instead of refusing them.")
flags.DEFINE_string("dicom", None, "A DICOM study folder of one patient (needs --box_mm).")
flags.DEFINE_multi_string("box_mm", None, "With --dicom: the lesion's box, 'x0 y0 z0 x1 y1 z1' in world mm, RAS+ "
                          "(a viewer's LPS coordinates with x and y negated); repeat it for several lesions of the "
                          "study, the k-th named <subject>_L<k>.")
flags.DEFINE_string("salt", None, "With --dicom: the de-identification salt (default: $FLL_DICOM_SALT).")
flags.DEFINE_string("id_map", None, "With --dicom: instead of a salt, a CSV patient_id,subject_id.")
flags.DEFINE_string("mapping", None, "With --dicom: a site's sequence rules (docs/dicom.md), tried before the defaults.")
flags.DEFINE_bool("reconvert", False, "With --dicom: convert the study again, replacing its earlier conversion in "
                  "out_dir/nifti/ and any edits of its series.csv.")
flags.DEFINE_string("out_dir", None, "Output folder (default: <workdir>/predict).")
flags.DEFINE_bool("saliency", False, "Also write integrated-gradients maps in each sequence's native space.")
flags.DEFINE_integer("workers", 2, "Preprocessing processes.", lower_bound=1)
flags.DEFINE_string("allow", "", "Data checks to switch off for these lesions, joined by '+' (fll_jax/data/checks.py), "
                    "e.g. unclaimed_mask_value to predict some of the lesions a patient's mask holds.")
flags.DEFINE_bool("overwrite", False, "Replace earlier outputs in --out_dir (saliency/ too, even without --saliency).")
FLAGS = flags.FLAGS
# What the inputs leave in --out_dir: --folder's manifest and --dicom's conversions.
MANIFEST, NIFTI = "manifest.csv", "nifti"


def _records(out_dir: Path, staged_manifest: Path | None) -> list:
    """The new lesions as manifest records, from whichever input was given (--folder's manifest is
    written to staged_manifest)."""
    from fll_jax.data.manifest import read_manifest

    given = [name for name in ("manifest", "folder", "dicom") if getattr(FLAGS, name)]
    if len(given) != 1:
        raise app.UsageError("give exactly one of --manifest, --folder, --dicom")
    if FLAGS.manifest:
        return read_manifest(FLAGS.manifest, labelled=False)
    if FLAGS.folder:
        from fll_jax.data.folders import build_manifest

        manifest = build_manifest(FLAGS.folder, out=staged_manifest, labelled=False, overwrite=True,
                                  ignore_unknown_files=FLAGS.ignore_unknown_files)
        return read_manifest(manifest, labelled=False)
    return _dicom_records(out_dir)


def _dicom_records(out_dir: Path) -> list:
    from fll_jax.data.boxes import parse_world_box
    from fll_jax.inference import dicom_records

    if not FLAGS.box_mm:
        raise app.UsageError("--dicom needs --box_mm: the lesion's box in world mm")
    boxes = []
    for k, text in enumerate(FLAGS.box_mm, 1):
        try:
            boxes.append(parse_world_box(text))
        except ValueError as e:
            raise app.UsageError(f"--box_mm {text!r} (lesion {k}): {e}") from None
    salt = FLAGS.salt if FLAGS.salt or FLAGS.id_map else os.environ.get("FLL_DICOM_SALT")
    records = dicom_records(FLAGS.dicom, out_dir / NIFTI, boxes, salt=salt, id_map=FLAGS.id_map,
                            mapping=FLAGS.mapping, reconvert=FLAGS.reconvert)
    print(f"{records[0].patient_id}: " + ", ".join(f"{s} <- {p.name}" for s, p in records[0].images.items()))
    return records


def _folder_runs_manifest(out_dir: Path) -> bool:
    """Whether out_dir's manifest.csv is the one an earlier --folder run wrote there (its
    models.json says so), not a file of the user's, nor the --manifest given now."""
    from fll_jax.files import StateFileError
    from fll_jax.train.workdir import made_by

    manifest = out_dir / MANIFEST
    if not manifest.exists() or (FLAGS.manifest and Path(FLAGS.manifest).resolve() == manifest.resolve()):
        return False
    try:
        return made_by(out_dir).get("inputs") == "folder"
    except StateFileError:
        return False


def main(argv):
    no_stray_arguments(argv)
    # Given with another input, they would be ignored without a word (a box never applied).
    for needed, names in (("dicom", ("box_mm", "salt", "id_map", "mapping", "reconvert")),
                          ("folder", ("ignore_unknown_files",))):
        stray = [f"--{name}" for name in names if FLAGS[name].present]
        if stray and not getattr(FLAGS, needed):
            raise app.UsageError(f"{', '.join(stray)}: used only with --{needed}, which is not given")
    logging.set_verbosity(logging.ERROR)  # orbax's INFO lines
    from fll_jax.data.checks import parse_allow
    from fll_jax.files import atomic_path, no_empty_folder_left
    from fll_jax.inference import PredictionError, check_out_dir, predict_records
    from fll_jax.train.workdir import hold_run

    out_dir = Path(FLAGS.out_dir or Path(FLAGS.workdir) / "predict")
    with reported_as("predict"):  # one line each, not under the flags' whole help
        try:
            allow = parse_allow(FLAGS.allow)
        except ValueError as e:
            raise PredictionError(f"--allow: {e}") from None
        if FLAGS.folder and out_dir.resolve().is_relative_to(Path(FLAGS.folder).resolve()):
            # It would be read as one more patient's folder, and stay one after the run.
            raise PredictionError(f"--out_dir {out_dir} lies inside --folder {FLAGS.folder}; choose a folder outside it")
        if not Path(FLAGS.workdir).is_dir():  # else the default out_dir would make it, empty
            raise PredictionError(f"--workdir {FLAGS.workdir}: no such folder (a finished training run's workdir)")
    # The output folder is held alone: two predictions into it would replace each other's files.
    with (reported_as("predict"), hold_run(FLAGS.workdir, reading=True), no_empty_folder_left(out_dir),
          hold_run(out_dir, held_by="a predict.py writing into it", remedy="give another --out_dir"),
          contextlib.ExitStack() as stack):
        check_out_dir(out_dir, FLAGS.overwrite, also=(MANIFEST,) if FLAGS.folder else ())
        # --folder's manifest, under a temporary name until the run has succeeded
        staged = stack.enter_context(atomic_path(out_dir / MANIFEST)) if FLAGS.folder else None
        inputs = next(name for name in ("manifest", "folder", "dicom") if getattr(FLAGS, name))
        stale_manifest = not FLAGS.folder and _folder_runs_manifest(out_dir)
        frame = predict_records(FLAGS.workdir, _records(out_dir, staged), out_dir, saliency=FLAGS.saliency,
                                workers=FLAGS.workers, overwrite=FLAGS.overwrite, allow=allow, inputs=inputs)
        if stale_manifest:  # an earlier --folder run's lesions must not stay beside these predictions
            (out_dir / MANIFEST).unlink()
            print(f"deleted {out_dir / MANIFEST}: the lesions of the earlier --folder run whose outputs this one replaced")
    print(frame[["lesion_id", "label", "missing", "predicted", "predicted_binary"]].to_string(index=False))
    labelled = frame[(frame["label"] != "") & ~frame["development_images"]]
    if len(labelled):
        print(f"accuracy on the {len(labelled)} labelled lesion(s) new to the run: "
              f"{(labelled['label'] == labelled['predicted']).mean():.2f}")
    print(f"wrote {out_dir / 'predictions.csv'} and {out_dir / 'challenge.json'}")


if __name__ == "__main__":
    app.run(main)
