"""A trained workdir's fold ensemble on new lesions (experiments/predict.py).

New lesions arrive as manifest records (from a manifest, a folder of fll_jax/data/folders.py,
or a DICOM study converted by fll_jax/data/dicom.py) and are preprocessed exactly as the
training data were (fll_jax/data/preprocess.py, with the run's data checks). The ensemble is
the mean of the fold models' probabilities, as on the test split in cross-validation (with
the run's evaluation.hidden_sequences hidden from every lesion, as there).

Refused, naming the difference, before any output is written: patches from another
preprocessing version or patch size than the model's, and lesions that lack every sequence
the model uses. A lesion lacking some of them is predicted with those absent (zero features
plus presence flags, as in training); the output's `missing` column says which, and a warning
notes when the model never saw an absent sequence in training.

missing_at_inference(workdir) measures what each sequence is worth to a trained ensemble: its
test metrics with that sequence hidden from every test lesion (besides the run's own hidden
ones), without retraining.

Outputs of predict_records in out_dir: predictions.csv (one row per lesion: ids, true label when known, missing
sequences, the predicted class, whether its images are among the run's development images, both
heads' probabilities and the lesion's saliency folder),
challenge.json (the LLD-MMRI submission format, fll_jax/data/lld_mmri.py: one entry per case, a
release case's other lesions left out), models.json (the fold models that made them) and, with
saliency, saliency/<name>/ (the integrated-gradients overlay, importance chart and a NIfTI map
per sequence in its native grid; <name> is fll_jax.saliency.explain.safe_name(lesion_id)).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pandas as pd

from fll_jax.constants import BINARY_CLASSES, CLASSES, PATCH_SIZE, SEQUENCES, to_binary
from fll_jax.data.checks import parse_allow, problem_report
from fll_jax.data.digests import FileDigests
from fll_jax.data.lld_mmri import case_rows, write_predictions_json
from fll_jax.data.manifest import UNLABELLED
from fll_jax.data.numpy_source import pad_batch
from fll_jax.data.patchset import PatchSet
from fll_jax.data.prepare import preprocessing
from fll_jax.data.preprocess import PreprocessOptions, preprocess_manifest
from fll_jax.evaluation.predictions import missing_text
from fll_jax.files import staged_folder, write_csv, write_json
from fll_jax.train.loop import hide_sequences
from fll_jax.train.step import PREDICT_KEYS, rng_settings
from fll_jax.train.workdir import FINGERPRINT_FILE, MODELS_FILE, other_code_note, read_fingerprint, write_made_by

OUTPUTS = ("predictions.csv", "challenge.json", MODELS_FILE, "saliency")


class PredictionError(ValueError):
    """New lesions the trained model cannot be applied to; the message names each difference."""


@dataclasses.dataclass
class Ensemble:
    """The best model of every fold of a finished workdir."""

    workdir: Path
    config: ml_collections.ConfigDict
    model: object
    variables: list[dict]

    @functools.cached_property
    def _predict(self):
        """The evaluation's own predict program on one device: a batch's probabilities of both heads."""
        from fll_jax.train.cross_validate import build_steps

        return build_steps(self.config, steps_per_epoch=1, devices=jax.devices()[:1]).predict

    def batch_probabilities(self, batch: dict) -> dict[str, np.ndarray]:
        """p2 and p7 (and the attention fusions' sequence_weights) of a padded batch's valid rows:
        the mean over the fold models, as in cross-validation."""
        inputs = {k: batch[k] for k in PREDICT_KEYS}
        with rng_settings(self.config):
            outs = [jax.device_get(self._predict(v, inputs)) for v in self.variables]
        valid = np.asarray(batch["valid"], bool)
        return {key: np.mean([o[key] for o in outs], axis=0)[valid] for key in outs[0]}

    def probabilities(self, patches: PatchSet, batch_size: int) -> dict[str, np.ndarray]:
        """p2 [N, 2], p7 [N, 7] (and sequence_weights [N, S]) of every lesion of a PatchSet."""
        parts = [self.batch_probabilities(pad_batch(patches.select(np.arange(start, min(start + batch_size, len(patches)))),
                                                    batch_size))
                 for start in range(0, len(patches), batch_size)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def load_ensemble(workdir: str | Path) -> Ensemble:
    """The fold models of a finished cross-validation workdir (CheckpointError if one is missing or damaged)."""
    from fll_jax.train.checkpoints import load_fold_models

    model, variables, config = load_fold_models(workdir)
    return Ensemble(Path(workdir), config, model, variables)


def compatibility_problems(ensemble: Ensemble, records: Sequence) -> list[str]:
    """Why these lesions cannot be given to the model (an empty list when they can)."""
    problems = []
    trained = read_fingerprint(ensemble.workdir).get("data", {}).get("preprocessing")
    current = preprocessing(ensemble.config)
    if trained is not None and trained != current:
        problems.append(f"{ensemble.workdir} was trained on patches of preprocessing {trained}, but this code makes "
                        f"{current}: retrain, or predict with the code the model was trained with")
    # The run's hidden sequences are hidden from these lesions too (predict_records).
    hidden = set((ensemble.config.get("evaluation") or {}).get("hidden_sequences") or ())
    used = [s for s in ensemble.config.sequences if s not in hidden]
    for record in records:
        if not set(used) & set(record.sequences):
            problems.append(f"lesion {record.lesion_id!r} has none of the model's sequences ({', '.join(used)}"
                            + (f"; the run hides {', '.join(sorted(hidden))}" if hidden else "")
                            + f"); it has {', '.join(record.sequences)}")
    return problems


def absent_in_training(ensemble: Ensemble) -> int:
    """Development lesions that lacked a sequence the model uses (from the run's data fingerprint;
    entries of in-memory data list no files and count as complete)."""
    lesions = read_fingerprint(ensemble.workdir).get("data", {}).get("lesions", {})
    files = [entry["files"] for entry in lesions.values() if "files" in entry and entry.get("split") == "dev"]
    return sum(any(f"{s}_image" not in f for s in ensemble.config.sequences) for f in files)


def development_images(ensemble: Ensemble, records: Sequence) -> np.ndarray:
    """bool per record: whether any of its images is, byte for byte, an image of the run's
    development lesions (from the run's data fingerprint), which every fold model but one trained on."""
    lesions = read_fingerprint(ensemble.workdir).get("data", {}).get("lesions", {})
    seen = {f["sha256"] for entry in lesions.values() if entry.get("split") == "dev"
            for name, f in entry.get("files", {}).items() if name.endswith("_image")}
    digest = FileDigests()  # in memory: new files are hashed once each
    return np.array([any(digest(path)["sha256"] in seen for path in r.images.values()) for r in records], bool)


def prediction_frame(records: Sequence, patches: PatchSet, probs: dict[str, np.ndarray], sequences: Sequence[str],
                     saliency: bool = False, development: np.ndarray | None = None) -> pd.DataFrame:
    """predictions.csv: one row per lesion, probabilities of both heads (`probs`: the ensemble's)
    and the predicted classes, whether its images are the run's development images
    (`development`), its world box when a box gives it, with saliency each lesion's folder of
    maps (its id made a file name, so not guessable), and the learned weight of each of
    `sequences` where the fusion learns them."""
    p2, p7 = probs["p2"], probs["p7"]
    folders = [""] * len(records)
    if saliency:
        from fll_jax.saliency.explain import safe_name  # the maps' module: plotting, loaded only with them

        folders = [f"saliency/{safe_name(r.lesion_id)}" for r in records]
    frame = pd.DataFrame({
        "patient_id": [r.patient_id for r in records],
        "lesion_id": [r.lesion_id for r in records],
        "label": ["" if r.label == UNLABELLED else CLASSES[r.label] for r in records],
        "missing": [missing_text(row) for row in patches.present],
        "predicted": [CLASSES[k] for k in p7.argmax(1)],
        "predicted_binary": [BINARY_CLASSES[k] for k in p2.argmax(1)],
        "development_images": np.zeros(len(records), bool) if development is None else development,
        "box_mm": ["" if r.box_mm is None else " ".join(f"{v:g}" for v in r.box_mm) for r in records],
        "saliency": folders,
    })
    for k, name in enumerate(BINARY_CLASSES):
        frame[f"p_{name}"] = p2[:, k]
    for k, name in enumerate(CLASSES):
        frame[f"p_{name}"] = p7[:, k]
    if "sequence_weights" in probs:
        for k, name in enumerate(sequences):
            frame[f"w_{name}"] = probs["sequence_weights"][:, k]
    return frame


def check_out_dir(out_dir: str | Path, overwrite: bool, also: Sequence[str] = ()) -> None:
    """FileExistsError naming an earlier run's outputs (OUTPUTS and `also`) in out_dir, unless
    overwrite; always for a folder that holds a cross-validation run (its predictions.csv is the run's)."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder; choose another output folder")
    if (Path(out_dir) / FINGERPRINT_FILE).exists():
        raise FileExistsError(f"{out_dir} holds a cross-validation run: its predictions.csv is the run's and is "
                              "never replaced by new lesions'; choose another output folder (by default WORKDIR/predict)")
    existing = [Path(out_dir) / name for name in (*OUTPUTS, *also) if (Path(out_dir) / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))} exist(s); choose another output folder "
                              "or pass --overwrite to replace them")


def predict_records(
    workdir: str | Path,
    records: Sequence,
    out_dir: str | Path,
    *,
    saliency: bool = False,
    workers: int = 2,
    overwrite: bool = False,
    allow: frozenset[str] = frozenset(),
    inputs: str = "manifest",
) -> pd.DataFrame:
    """Preprocess new lesions, run the workdir's ensemble, write out_dir; returns predictions.csv's frame.

    allow: data checks switched off for these lesions besides the run's own (config.data.allow),
    e.g. unclaimed_mask_value to predict some of the lesions a patient's mask holds.
    inputs: what the records came from ('manifest', 'folder', 'dicom'), for models.json.

    The saliency maps are made in a temporary folder; the outputs of an earlier run (overwrite)
    are replaced only when this run has succeeded, an earlier saliency/ also without saliency.

    Raises:
        PredictionError: lesions the model cannot take (all listed), before anything is written.
        FileExistsError: out_dir holds earlier predictions and overwrite is False.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    ensemble = load_ensemble(workdir)
    problems = compatibility_problems(ensemble, records)
    if problems:
        raise PredictionError(problem_report(f"cannot predict with {workdir}:", problems))
    config = ensemble.config
    note = other_code_note(workdir, config.train.folds)
    if note:
        print(f"note: {note}")
    # An unclaimed mask value stays refused: 1 = liver beside 2 = tumour would predict the liver.
    allow = parse_allow(config.data.allow) | allow
    patches = preprocess_manifest(records, PATCH_SIZE, workers, allow=allow,
                                  options=PreprocessOptions.from_config(config.data))
    hidden = list((config.get("evaluation") or {}).get("hidden_sequences") or ())
    if hidden:
        # As the run was evaluated: its metrics describe the ensemble without these sequences.
        print(f"{', '.join(hidden)} hidden from every lesion, as in the run's evaluation (evaluation.hidden_sequences)")
        patches = dataclasses.replace(patches, present=hide_sequences({"present": patches.present}, hidden)["present"])
    probs = ensemble.probabilities(patches, config.train.eval_batch_size)
    p7 = probs["p7"]
    development = development_images(ensemble, records)
    if development.any():
        ids = [r.lesion_id for r, seen in zip(records, development) if seen]
        print(f"warning: {len(ids)} lesion(s) have images of the run's development lesions, which its fold models "
              f"trained on (column development_images), e.g. {', '.join(ids[:3])}: their predictions are not "
              "those of unseen cases")
    frame = prediction_frame(records, patches, probs, config.sequences, saliency, development)
    used = [SEQUENCES.index(s) for s in config.sequences]
    lacking = int((~patches.present[:, used]).any(axis=1).sum())
    if lacking and config.train.sequence_dropout == 0 and not absent_in_training(ensemble):
        print(f"warning: {lacking} lesion(s) lack sequences the model uses, which it never met in training "
              "(train.sequence_dropout 0, complete training data): their predictions are less reliable")
    # An earlier run's maps must not stay beside these predictions, nor go before this run succeeds.
    with staged_folder(out_dir / "saliency") as maps:
        if saliency:
            write_saliency(ensemble, records, patches, maps, p7.argmax(1))
        write_csv(frame, out_dir / "predictions.csv")
        cases = case_rows(frame["patient_id"].tolist(), frame["lesion_id"].tolist())
        write_predictions_json(out_dir / "challenge.json", frame["lesion_id"].iloc[cases].tolist(), p7[cases])
        write_made_by(out_dir, workdir, inputs)  # the run's report names these predictions once its models change
    return frame


def write_saliency(ensemble: Ensemble, records: Sequence, patches: PatchSet, folder: Path,
                   predicted: np.ndarray) -> None:
    """Integrated gradients of each lesion's predicted class (predictions.csv's: the maps' float32
    model could break a near tie of a bfloat16 one the other way), as explain.py draws them."""
    from fll_jax.saliency.explain import (
        Settings, compute_map, float32_model, lesion_affines, lesion_input, safe_name, write_lesion_maps,
    )
    from fll_jax.saliency.target import ClassScore

    config, settings = ensemble.config, Settings()
    score = ClassScore.from_model(float32_model(config), ensemble.variables, chunk=settings.chunk)
    with rng_settings(config):
        for i, record in enumerate(records):
            x = lesion_input(patches.image[i], patches.mask[i], config)
            lesion = compute_map(score, x, config.sequences, settings, predicted[i])
            affines = lesion_affines(patches.patch_affine[i], patches.size, config)
            title = f"{record.lesion_id}: predicted {CLASSES[lesion.index]} (p = {lesion.probs[lesion.index]:.2f})"
            write_lesion_maps(folder / safe_name(record.lesion_id), record, x, lesion, affines, config.sequences,
                              settings.method, title, f"{record.lesion_id}: {CLASSES[lesion.index]} (ig)")


def missing_at_inference(workdir: str | Path, source=None) -> dict:
    """The ensemble's test metrics as the run was evaluated, then with each further used sequence
    hidden from every test lesion (no retraining); written to workdir/missing_at_inference.json.

    The run's own evaluation.hidden_sequences stay hidden in every row (the "none" row is the
    run's report), and get no row of their own. The data must be those the run was trained on
    (checked against its fingerprint); `source` defaults to the run config's data.
    """
    from sklearn.metrics import roc_auc_score

    from fll_jax.data.prepare import prepare_source
    from fll_jax.train.workdir import check_same_data, models_digest

    workdir = Path(workdir)
    ensemble = load_ensemble(workdir)
    config = ensemble.config
    source = source or prepare_source(config)
    check_same_data(workdir, source.fingerprint)
    by_run = list((config.get("evaluation") or {}).get("hidden_sequences") or ())
    rows = []
    for hidden in (None, *(s for s in config.sequences if s not in by_run)):
        p2, p7, label7 = [], [], []
        for batch in source.eval_batches("test", config.train.eval_batch_size):
            probs = ensemble.batch_probabilities(hide_sequences(batch, by_run + ([hidden] if hidden else [])))
            p2.append(probs["p2"])
            p7.append(probs["p7"])
            label7.append(batch["label7"][batch["valid"]])
        p2, p7, label7 = np.concatenate(p2), np.concatenate(p7), np.concatenate(label7)
        label2 = to_binary(label7)
        rows.append({
            "hidden": hidden or "none", "n": int(len(label7)),
            "accuracy_7way": float(np.mean(p7.argmax(1) == label7)),
            "accuracy_2way": float(np.mean(p2.argmax(1) == label2)),
            "auc_binary": float(roc_auc_score(label2, p2[:, 1])) if len(set(label2)) == 2 else None,
        })
    result = {"sequence_dropout": float(config.train.sequence_dropout), "hidden_by_run": by_run, "rows": rows,
              "models": models_digest(workdir)}
    write_json(workdir / "missing_at_inference.json", result)
    return result


def dicom_records(study: str | Path, nifti_dir: str | Path, boxes: Sequence[Sequence[float]], *,
                  salt: str | None = None, id_map: str | Path | None = None, mapping: str | Path | None = None,
                  reconvert: bool = False) -> list:
    """One patient's DICOM study as lesion records, lesion k (<subject>_L<k>, from 1) given by the
    k-th world box (RAS+ mm), a volume per sequence picked by the patient's series.csv under nifti_dir.

    This study converted there before keeps that conversion, with any edits of its series.csv
    (the remedy for an ambiguous sequence), unless reconvert; another study of the patient
    converted there is refused unless reconvert; otherwise the study is converted
    there (fll_jax/data/dicom.py, with the site's sequence rules of `mapping`) and the
    conversion stays even when the study is then refused.

    Raises:
        DicomError: the study holds several patients (nothing converted), another study of the
            patient (or `mapping` without reconvert) meets an earlier conversion, the study cannot
            be converted, or a sequence is ambiguous.
    """
    from fll_jax.data.dicom import DicomError, convert_study, converted_studies, read_series_table, study_subjects
    from fll_jax.data.manifest import LesionRecord

    subjects = study_subjects(study, salt=salt, id_map=id_map)
    if len(subjects) != 1:
        raise DicomError(f"{study}: holds {len(subjects)} patients; give one patient's study with its box")
    (subject, studies), = subjects.items()
    subject_dir = Path(nifti_dir) / subject
    if (subject_dir / "series.csv").exists() and not reconvert:
        if converted_studies(subject_dir) != studies - {""}:
            raise DicomError(f"{subject_dir} holds a conversion of another study of this patient (or one that does "
                             "not record its study); --reconvert replaces it and any edits of its series.csv, or "
                             "give another output folder")
        if mapping is not None:
            raise DicomError(f"--mapping takes effect when a study is converted, and {subject_dir} holds this "
                             "study's conversion: add --reconvert (it replaces any edits of its series.csv)")
        print(f"{subject}: its earlier conversion of this study in {subject_dir} is used, with any edits of its "
              "series.csv (--reconvert converts the study again)")
    else:
        convert_study(study, nifti_dir, salt=salt, id_map=id_map, mapping=mapping, overwrite=reconvert)
    images = read_series_table(subject_dir)
    return [LesionRecord(patient_id=subject, lesion_id=f"{subject}_L{k}", label=UNLABELLED, mask_value=1,
                         images=images, masks={}, scanner="unknown", field_strength=None, background="unknown",
                         diameter_mm=None, split="", box_mm=tuple(box)) for k, box in enumerate(boxes, 1)]
