"""Explaining a cross-validation workdir's models on its lesions, and scoring the maps.

For a few lesions per class: the chosen map (integrated gradients by default) of the model
that predicts them, which is the fold models' mean output on test lesions (split 'test') and,
on development lesions (split 'val'), the one fold model that held the lesion out (so scores
can use every lesion of the data set, none seen in training); sequence importance by
attribution share and by branch occlusion, a PNG overlay, an importance bar chart and NIfTI
maps in every sequence's native space. Unless the method is Grad-CAM, a Grad-CAM overlay on
the same slice too (one more forward and backward pass per model), so that every lesion shows
a gradient-path map beside the feature-map view the paper draws. With score=True also the
phantom scores (scoring.py; refused for a run on other data, where the phantom's key sequences
mean nothing). Layout under workdir/explain/<split>/:

  lesions/<lesion_id>/overlay.png, overlay_gradcam.png, importance.png, <seq>_<method>.nii.gz
                         (safe_name(lesion_id): ids with other characters than lower-case letters, digits and _.- get a hash)
  lesions.csv            one row per lesion: model, classes, F, completeness, importance per sequence, folder
  importance_by_class.png  mean attribution share per true class and sequence (paper Fig. 6)
  summary.json           settings, median completeness, what each overlay shows, and the scores when asked for
  scores.md              the scores as tables (score=True)

Maps are computed on the network's input grid (config.input_size^3, resampled from the
stored patch exactly as in evaluation) and the model in float32 whatever it trained in, so
that the completeness check measures the quadrature, not bf16 rounding.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from fll_jax.constants import (
    BINARY_CLASSES, CLASS_NAMES, CLASSES, SEQUENCE_NAMES, SEQUENCES, sequence_index, to_binary,
)
from fll_jax.data import prepare
from fll_jax.data.checks import parse_allow
from fll_jax.data.preprocess import PreprocessOptions, preprocess_lesion
from fll_jax.evaluation.predictions import ENSEMBLE, load_predictions, probabilities
from fll_jax.evaluation.report import write_report
from fll_jax.files import (
    no_empty_folder_left, read_json, save_figure, staged_folder, write_csv, write_json, write_text,
)
from fll_jax.models import build_model
from fll_jax.saliency.gradcam import grad_cam, last_stage_voxels
from fll_jax.saliency.gradients import smoothgrad, vanilla_gradient
from fll_jax.saliency.importance import SequenceImportance, attribution_shares, sequence_importance, share_label
from fll_jax.saliency.integrated_gradients import (
    BASELINES, QUADRATURES, IGResult, integrated_gradients, make_baseline,
)
from fll_jax.saliency.outputs import (
    axial_axis, importance_figure, input_grid_affine, lesion_figure, write_native_map,
)
from fll_jax.saliency.scoring import (
    lesion_focus, lesion_region, randomisation_correlation, ranking_aucs, reinitialised_variables, top_k_hit_rates,
    voxel_spacing,
)
from fll_jax.saliency.target import HEADS, OUTPUTS, ClassScore
from fll_jax.train.augment import prepare_inputs
from fll_jax.train.loop import hide_sequences
from fll_jax.train.step import rng_settings, seq_indices
from fll_jax.train.workdir import check_same_data, hold_run, models_digest, other_code_note, read_config

# Each method's name in titles, legends and the report.
MAP_NAMES = {"ig": "IG", "gradient": "gradient", "smoothgrad": "SmoothGrad", "gradcam": "Grad-CAM"}
METHODS = tuple(MAP_NAMES)
OVERLAY, GRADCAM_OVERLAY = "overlay.png", "overlay_gradcam.png"
EXPLAINED = ("predicted", "true")
SPLITS = ("test", "val")
# Sequence-importance measures scored against the key sequences: lesions.csv column prefixes.
# The lesion share counts only attribution within 5 mm of the lesion, where the phantom puts
# each class's signature.
IMPORTANCE_MEASURES = {"attribution_share": "share_", "lesion_attribution_share": "lesion_share_",
                       "occlusion": "occlusion_"}
SPLIT_NAMES = {"test": "test lesions", "val": "development lesions"}
# The Settings fields that each method's maps depend on, beyond method, head, output, explained and
# baseline (also the occlusion fill); chunk only trades memory for speed, so no method's.
METHOD_SETTINGS = {"ig": ("steps", "quadrature"), "smoothgrad": ("steps", "seed"), "gradient": (), "gradcam": ()}
# The temporary folders staged_folder leaves when killed (OOM): no user's files.
STAGING = re.compile(r"\.lesions\..+\.tmp(\.old)?")


class ExplainError(ValueError):
    """A request this job cannot carry out (an out_dir, split or --score that does not fit the run),
    named in its message (an entry point prints it without a traceback: fll_jax/errors.py)."""


@dataclass
class Settings:
    """How each lesion is explained (the flags of experiments/explain.py)."""

    method: str = "ig"
    head: str = "seven"
    output: str = "prob"
    baseline: str = "mean"
    steps: int = 64
    quadrature: str = "trapezoid"
    chunk: int = 16
    explained: str = "predicted"
    seed: int = 0

    def check(self) -> None:
        """ValueError naming each bad setting, before any model is loaded or lesion preprocessed."""
        choices = {"method": METHODS, "explained": EXPLAINED, "head": tuple(HEADS), "output": OUTPUTS,
                   "baseline": BASELINES, "quadrature": QUADRATURES}
        problems = [f"unknown {name} {getattr(self, name)!r}; known: {', '.join(known)}"
                    for name, known in choices.items() if getattr(self, name) not in known]
        # steps: IG's quadrature nodes (a trapezoid needs both ends) or SmoothGrad's samples
        least = {"ig": 1 if self.quadrature == "gauss_legendre" else 2, "smoothgrad": 1}.get(self.method, 0)
        if self.steps < least:
            problems.append(f"steps {self.steps}: {self.method} needs at least {least}")
        if self.chunk < 1:
            problems.append(f"chunk {self.chunk}: must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class LesionMap:
    """One lesion's map [S, D, H, W] with its class index, probabilities and IG details."""

    attributions: np.ndarray
    index: int
    probs: np.ndarray
    importance: SequenceImportance
    ig: IGResult | None


def lesion_input(image: np.ndarray, mask: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
    """Network input [S_used, M, M, M, 2] from one lesion's stored uint8 patches [7, N, N, N], with
    the run's evaluation.hidden_sequences hidden (zeros), as its predictions were made."""
    hidden = (config.get("evaluation") or {}).get("hidden_sequences") or ()
    batch = hide_sequences({"image": np.asarray(image)[None], "mask": np.asarray(mask)[None],
                            "present": np.ones((1, len(SEQUENCES)), bool)}, hidden)
    return np.asarray(prepare_inputs(batch, seq_indices(config), config.input_size))[0]


def input_present(x: np.ndarray) -> np.ndarray:
    """bool [S]: the sequences of a network input [S, D, H, W, 2] that it holds (a lesion mask)."""
    return np.asarray(x)[..., 1].reshape(len(x), -1).max(axis=1) > 0


def attribution_map(
    score: ClassScore, x: np.ndarray, sequences: Sequence[str], settings: Settings, index: int
) -> tuple[np.ndarray, np.ndarray, IGResult | None]:
    """(map [S, D, H, W], baseline image, IG details or None) of class `index`."""
    settings.check()
    if settings.method == "ig":
        ig = integrated_gradients(
            score, x, index=index, baseline=settings.baseline, steps=settings.steps, quadrature=settings.quadrature
        )
        return ig.attributions, ig.baseline, ig
    baseline = make_baseline(x[..., 0], settings.baseline)
    if settings.method == "gradient":
        return vanilla_gradient(score, x, index=index), baseline, None
    if settings.method == "smoothgrad":
        return smoothgrad(score, x, index=index, samples=settings.steps, seed=settings.seed), baseline, None
    return grad_cam(score, x, sequences, index=index), baseline, None


def compute_map(
    score: ClassScore, x: np.ndarray, sequences: Sequence[str], settings: Settings, index: int | None = None
) -> LesionMap:
    """The settings' map of class `index` (default: predicted) and both importance measures."""
    probs = score.predict(x)
    index = int(np.argmax(probs)) if index is None else int(index)
    attributions, baseline, ig = attribution_map(score, x, sequences, settings, index)
    importance = sequence_importance(score, x, attributions, baseline, sequences, index=index, present=input_present(x))
    return LesionMap(attributions, index, probs, importance, ig)


def pick_lesions(records: Sequence, num_per_class: int | None, lesion_ids: set[str] | None = None) -> list:
    """The first num_per_class (None: all) lesions of each class among lesion_ids, in manifest order."""
    picked, count = [], {}
    for record in records:
        if lesion_ids is not None and record.lesion_id not in lesion_ids:
            continue
        if num_per_class is None or count.get(record.label, 0) < num_per_class:
            count[record.label] = count.get(record.label, 0) + 1
            picked.append(record)
    return picked


def lesion_models(workdir: Path, split: str, folds: Sequence[int], head: str = "seven") -> dict[str, tuple[str, int]]:
    """lesion_id -> (model, the class of `head` it predicted): 'ensemble' (split 'test') or 'fold<k>'
    that held it out (split 'val').

    Read from predictions.csv, so the lesions, folds and predicted classes are those the training
    job reported (the maps' float32 model could break a near tie of a bfloat16 one the other way).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    frame = load_predictions(workdir / "predictions.csv")
    rows = frame[frame["split"] == split]
    if split != "test":
        rows = rows[rows["fold"].astype(int).isin(list(folds))]
    models = [ENSEMBLE if split == "test" else f"fold{int(fold)}" for fold in rows["fold"]]
    predicted = {}
    for model in set(models):
        p7, p2 = probabilities(rows, model)
        predicted[model] = (p2 if head == "binary" else p7).argmax(1)
    return {lesion: (model, int(predicted[model][i]))
            for i, (lesion, model) in enumerate(zip(rows["lesion_id"], models))}


def float32_model(config: ml_collections.ConfigDict):
    """The config's model computing in float32 (maps measure the quadrature, not bf16 rounding)."""
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.dtype = "float32"
    return build_model(model_config, config.sequences)


def safe_name(text: str) -> str:
    """A lesion id as a folder name, one per id: the id itself when it is a plain name already
    (lower-case letters, digits, '_', '.', '-', not starting with '.'), else its other characters
    replaced by '_' and a hash of the id appended, so that 'P01 L1', 'P01/L1' and 'P01_L1' keep
    apart, as do 'P01_L1' and 'p01_l1' on file systems that ignore case (macOS, Windows)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    if name == text and text and not text.startswith(".") and text == text.lower():
        return text
    return f"{name}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


def request_settings(settings: Settings, score: bool) -> dict:
    """The settings the explanations depend on: those of the chosen method (and the seed of the
    randomisation check's model with score): not chunk nor another method's, which a rerun may change unrefused."""
    used = ("method", "head", "output", "baseline", "explained") + METHOD_SETTINGS[settings.method]
    return {k: v for k, v in vars(settings).items() if k in used or (k == "seed" and score)}


def _class_names(head: str) -> list[str]:
    return list(BINARY_CLASSES) if head == "binary" else [CLASS_NAMES[c] for c in CLASSES]


def explain_workdir(
    workdir: str | Path,
    *,
    num_per_class: int | None = 2,
    split: str = "test",
    score: bool = False,
    settings: Settings | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Explain num_per_class (None: all) lesions per class of a split; write workdir/explain/<split>/.

    Needs a finished workdir (fold checkpoints, predictions.csv) and the config's manifest
    (fll_jax.data.prepare.manifest_path). An output folder holding explanations asked for
    differently, or other files but no summary.json, is refused unless overwrite=True, which
    replaces them once this run has succeeded: no lesion folder or scores.md of the earlier request
    stays. out_dir inside workdir/explain must be workdir/explain/<split> (then report.md is
    rewritten, as for the default). score=True is refused unless the run's data is the phantom.
    Returns summary.json's content.
    """
    settings = settings or Settings()
    settings.check()
    if num_per_class is not None and num_per_class < 1:
        raise ValueError(f"num_per_class {num_per_class}: must be at least 1, or None for every lesion")
    workdir = Path(workdir)
    run = models_digest(workdir)  # refuses a folder without a finished run before holding it
    out, default = _out_folder(workdir, split, out_dir)
    # The run is held for reading its models: training or a --restart (which would delete the maps)
    # waits, evaluate-only points of a sweep read it meanwhile. The output folder is held alone:
    # two requests into it would replace each other's maps unsaid.
    with (hold_run(workdir, reading=True), no_empty_folder_left(out.parent), no_empty_folder_left(out),
          hold_run(out, held_by="an explain.py writing into it", remedy="give another --out_dir")):
        return _explain(workdir, run, num_per_class, split, score, settings, out, default, overwrite)


def _explain(workdir: Path, run: str, num_per_class: int | None, split: str, score: bool, settings: Settings,
             out: Path, default: bool, overwrite: bool) -> dict:
    # Looked up at call time: the training code owns it (and tests stand in for it).
    from fll_jax.train.checkpoints import load_fold_models

    request = json.loads(json.dumps({"run": run, "split": split, "num_per_class": num_per_class,
                                     "score": score, "settings": request_settings(settings, score)}))
    run_config = read_config(workdir)  # what load_fold_models reads, here without loading any model
    _check_phantom(workdir, run_config, score)
    # From predictions.csv, so that an empty split costs no model loading nor data fingerprinting.
    models = lesion_models(workdir, split, run_config.train.folds, settings.head)
    if not models:
        raise ExplainError(f"{workdir / 'predictions.csv'}: no lesion of split {split!r} to explain")
    _check_previous(out, request, overwrite)
    _, variables, config = load_fold_models(workdir)
    with rng_settings(config):
        records, _, data = prepare.describe_data(config)
        check_same_data(workdir, data)
        records = pick_lesions(records, num_per_class, set(models))
        if not records:
            raise ExplainError(f"{workdir}: no lesion of split {split!r} in the manifest "
                               f"{prepare.manifest_path(config)}")
        model = float32_model(config)
        ens = ClassScore.from_model(model, variables, head=settings.head, output=settings.output, chunk=settings.chunk)
        notes, gradcam_overlay = _gradcam_notes(ens, config, settings)
        code_note = other_code_note(workdir, config.train.folds)
        if code_note:
            print(f"note: {code_note}")
            notes.append(code_note)
        scores = {ENSEMBLE: ens} | {f"fold{f}": ens.with_variables(v) for f, v in zip(config.train.folds, variables)}
        random_score = None
        if score:
            # One re-initialised model is the reference map of the randomisation check.
            shape = (len(config.sequences),) + (config.input_size,) * 3 + (2,)
            fresh = reinitialised_variables(model, variables[0], np.zeros(shape, np.float32), seed=settings.seed + 1)
            random_score = ens.with_variables(fresh)
        # An earlier request's lesion folders and scores must not stay beside these (overwrite), nor
        # go before this run has succeeded.
        with staged_folder(out / "lesions") as lesions:
            rows = [_explain_record(record, config, *models[record.lesion_id], scores[models[record.lesion_id][0]],
                                    random_score, settings, lesions, gradcam_overlay)
                    for record in tqdm(records, desc="explain", unit="lesion", dynamic_ncols=True)]
            frame = pd.DataFrame(rows)
            summary = {"request": request, "workdir": str(workdir.resolve())} | _summary(
                frame, config, settings, config.sequences, split, score, gradcam_overlay) | {"notes": notes}
            # Stopped from here on, the folder holds no summary: the report shows none, a rerun needs overwrite.
            (out / "summary.json").unlink(missing_ok=True)
        write_csv(frame, out / "lesions.csv")
        class_importance_figure(frame, config.sequences, out / "importance_by_class.png", MAP_NAMES[settings.method])
        if score:
            write_text(out / "scores.md", scores_markdown(summary))
        else:
            (out / "scores.md").unlink(missing_ok=True)
        write_json(out / "summary.json", summary)  # last: it marks the folder complete
        if default:
            write_report(workdir)  # report.md gains the saliency section
        return summary


def _out_folder(workdir: Path, split: str, out_dir: str | Path | None) -> tuple[Path, bool]:
    """(output folder, whether it is workdir/explain/<split>, which the report shows as that split)."""
    default = workdir / "explain" / split
    if out_dir is None:
        return default, True
    out = Path(out_dir)
    if out.resolve() == default.resolve():
        return out, True
    # The report reads explain/<name>/ as split <name>'s maps: no other split's, nor other folders, there.
    if out.resolve().is_relative_to((workdir / "explain").resolve()):
        raise ExplainError(f"out_dir {out} is inside {workdir / 'explain'}, where the report shows explain/<split>/ "
                           f"as that split's explanations; for split {split!r} leave out_dir out (it is {default}) "
                           "or name a folder outside it")
    return out, False


def _check_phantom(workdir: Path, config: ml_collections.ConfigDict, score: bool) -> None:
    """Refuse score=True unless the run's data is the phantom: its key sequences are the phantom's signatures."""
    source = config.data.source
    if score and source != "phantom":
        raise ExplainError(f"score=True (--score) scores the maps against the synthetic phantom's key sequences "
                           f"(the signatures it draws into each class); the run in {workdir} was trained on "
                           f"data.source {source!r} ({config.data.get('manifest') or 'no manifest recorded'}), "
                           "where they mean nothing. Explain it without --score")


def _request_changes(previous: dict, request: dict) -> list[str]:
    """'key old -> new' for each argument of `request` that differs from the earlier `previous`, settings
    compared as request_settings keeps them (an earlier version stored chunk and every method's)."""
    old = previous.get("settings") or {}
    if old.get("method") in METHOD_SETTINGS:
        old = request_settings(Settings(**{k: v for k, v in old.items() if k in vars(Settings())}),
                               bool(previous.get("score")))
    flat_old = {k: v for k, v in previous.items() if k not in ("run", "settings")} | {
        f"settings.{k}": v for k, v in old.items()}
    flat_new = {k: v for k, v in request.items() if k not in ("run", "settings")} | {
        f"settings.{k}": v for k, v in request["settings"].items()}
    return [f"{k} {flat_old.get(k, '(absent)')} -> {flat_new.get(k, '(absent)')}"
            for k in sorted(set(flat_old) | set(flat_new)) if flat_old.get(k) != flat_new.get(k)]


def _check_previous(out: Path, request: dict, overwrite: bool) -> None:
    """Refuse to replace explanations of another run, or asked for with other arguments, or a folder of other files."""
    path = out / "summary.json"
    if out.exists() and not out.is_dir():
        raise ExplainError(f"out_dir {out} is a file, not a folder")
    if overwrite:
        return
    if not path.exists():
        # lesions/, lesions.csv, ... would replace a folder's own ones whole: not unasked.
        if out.is_dir() and any(not STAGING.fullmatch(p.name) for p in out.iterdir()):
            raise FileExistsError(f"{out} holds files but no summary.json (not this job's explanations, or an "
                                  "explanation stopped before it finished); its lesions/, lesions.csv, scores.md, "
                                  "importance_by_class.png would be replaced: pass overwrite=True (--overwrite) to "
                                  "replace them, or another out_dir (--out_dir)")
        return
    summary = read_json(path, "pass overwrite=True (--overwrite) to replace it")
    previous = summary.get("request") or {}
    changes = _request_changes(previous, request)
    if previous.get("run") != request["run"]:
        what = (f"explanations of other fold models ({summary.get('workdir', 'made before runs were recorded')}: "
                "another run, or this one before it was trained again)")
    elif changes:
        what = f"explanations made with other arguments: {'; '.join(changes)}"
    else:
        return
    raise FileExistsError(f"{out} holds {what}; pass overwrite=True (--overwrite) to replace them, or another "
                          "out_dir (--out_dir)")


def _gradcam_notes(score: ClassScore, config: ml_collections.ConfigDict, settings: Settings) -> tuple[list[str], bool]:
    """(notes for the summary and report, whether to draw the Grad-CAM overlay beside another method's).

    On a last stage of one voxel (inputs under 64^3) a Grad-CAM map is one value per sequence:
    drawn beside another map it would show nothing, and as the method only its shares mean anything.
    """
    voxels = last_stage_voxels(score, config.sequences, (len(config.sequences), *(config.input_size,) * 3, 2))
    if min(voxels) > 1:
        return [], settings.method != "gradcam"
    grid = " x ".join(map(str, voxels))
    if settings.method == "gradcam":
        note = (f"Grad-CAM is made on each branch's last stage, {grid} voxels at input {config.input_size}^3: each "
                "sequence's map is one value, so only the per-sequence shares carry information (64^3 gives 2 x 2 x 2).")
        print(f"note: {note}")
        return [note], False
    return [f"No Grad-CAM overlay: each branch's last stage is {grid} voxels at input {config.input_size}^3, so its "
            "map would be one value per sequence."], False


def _explain_record(record, config, model_name: str, pred: int, model_score: ClassScore,
                    random_score: ClassScore | None, settings: Settings, folder: Path, gradcam_overlay: bool) -> dict:
    """One lesion by one model (or the ensemble) that predicted class `pred`: map, importance,
    (scores), files (with the Grad-CAM overlay if `gradcam_overlay`); its lesions.csv row."""
    sequences = tuple(config.sequences)
    names = _class_names(settings.head)
    options = PreprocessOptions.from_config(config.data)
    patch = preprocess_lesion(record, allow=parse_allow(config.data.allow), options=options)
    x = lesion_input(patch.image, patch.mask, config)
    true = int(record.label) if settings.head == "seven" else int(to_binary(record.label))
    lesion = compute_map(model_score, x, sequences, settings, true if settings.explained == "true" else pred)
    affines = lesion_affines(patch.patch_affine, patch.image.shape[-1], config)
    row = {
        "lesion_id": record.lesion_id, "patient_id": record.patient_id, "model": model_name,
        "label7": int(record.label),
        "true": names[true], "predicted": names[pred], "p_predicted": float(lesion.probs[pred]),
        "explained": names[lesion.index], "method": settings.method,
        "folder": f"lesions/{safe_name(record.lesion_id)}",
    }
    if lesion.ig is not None:
        row.update(f_x=lesion.ig.f_x, f_baseline=lesion.ig.f_baseline, delta=lesion.ig.delta,
                   relative_delta=lesion.ig.relative_delta)
    region = lesion_region(x[..., 1], [voxel_spacing(a) for a in affines])
    near = attribution_shares(lesion.attributions * region, input_present(x))
    for r, near_lesion in zip(lesion.importance.as_rows(), near):
        row[f"share_{r['sequence']}"] = r["attribution_share"]
        row[f"lesion_share_{r['sequence']}"] = near_lesion
        row[f"occlusion_{r['sequence']}"] = r["occlusion_drop"]
    if random_score is not None:
        random_map = attribution_map(random_score, x, sequences, settings, lesion.index)[0]
        row["randomisation_spearman"] = randomisation_correlation(lesion.attributions, random_map,
                                                                  present=input_present(x))
        row["focus_share"], row["focus_volume_share"] = lesion_focus(lesion.attributions, region)
    caption = f"{record.lesion_id}: true {row['true']}, predicted {row['predicted']} (p = {row['p_predicted']:.2f})"
    gradcam = grad_cam(model_score, x, sequences, index=lesion.index) if gradcam_overlay else None
    write_lesion_maps(folder / safe_name(record.lesion_id), record, x, lesion, affines, sequences, settings.method,
                      f"{caption}; {MAP_NAMES[settings.method]} for {row['explained']}",
                      f"{record.lesion_id}: {row['explained']} ({MAP_NAMES[settings.method]})",
                      gradcam=gradcam, gradcam_title=f"{caption}; Grad-CAM for {row['explained']}")
    return row


def lesion_affines(patch_affine: np.ndarray, stored: int, config: ml_collections.ConfigDict) -> list[np.ndarray]:
    """Network input voxel -> world mm, per used sequence, from a lesion's patch affines [7, 4, 4] of
    its stored patches (stored^3)."""
    return [input_grid_affine(patch_affine[sequence_index(s)], stored, config.input_size) for s in config.sequences]


def write_lesion_maps(folder: Path, record, x: np.ndarray, lesion: LesionMap, affines: Sequence[np.ndarray],
                      sequences: Sequence[str], method: str, title: str, importance_title: str, *,
                      gradcam: np.ndarray | None = None, gradcam_title: str = "") -> None:
    """A lesion's overlay and importance PNGs, and its map in the native grid of each sequence it has.

    gradcam: a Grad-CAM map [S, D, H, W] drawn as overlay_gradcam.png on the overlay's slice.
    """
    folder.mkdir(parents=True, exist_ok=True)
    present = np.flatnonzero(input_present(x)).tolist()  # not the lesion's absent or the run's hidden sequences
    axis = axial_axis(affines[present[0]])
    shown = lesion_figure(x[..., 0], x[..., 1], lesion.attributions, sequences, folder / OVERLAY, title=title, axis=axis)
    if gradcam is not None:
        lesion_figure(x[..., 0], x[..., 1], gradcam, sequences, folder / GRADCAM_OVERLAY, title=gradcam_title,
                      axis=axis, slice_index=shown)
    importance_figure(lesion.importance, folder / "importance.png", title=importance_title,
                      share_label=share_label(MAP_NAMES[method]), present=input_present(x))
    for i in present:
        s = sequences[i]
        write_native_map(lesion.attributions[i], affines[i], record.images[s], folder / f"{s}_{method}.nii.gz")


def class_importance_figure(frame: pd.DataFrame, sequences: Sequence[str], path: Path, map_name: str) -> None:
    """Heat map of the mean attribution share of the map `map_name` per true class (rows) and sequence (columns)."""
    shares = frame.groupby("label7")[[f"share_{s}" for s in sequences]].mean().sort_index()
    fig = Figure(figsize=(1.2 + 0.7 * len(sequences), 1.0 + 0.45 * len(shares)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares.to_numpy(), cmap="Reds", vmin=0.0, aspect="auto")
    ax.set_xticks(range(len(sequences)), [SEQUENCE_NAMES[s] for s in sequences])
    ax.set_yticks(range(len(shares)), [CLASS_NAMES[CLASSES[i]] for i in shares.index])
    fig.colorbar(image, ax=ax, label=f"mean {share_label(map_name)}")
    save_figure(fig, path, dpi=110)


def _median(values) -> float:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else float("nan")


def _summary(frame: pd.DataFrame, config, settings: Settings, sequences, split: str, score: bool,
             gradcam_overlay: bool = False) -> dict:
    summary = {
        "data": "synthetic phantom (not clinical evidence)" if config.data.source == "phantom" else config.data.manifest,
        "split": split,
        "models": (f"the mean of {len(config.train.folds)} fold models" if split == "test"
                   else "each lesion by the fold model that held it out"),
        "settings": vars(settings),
        "sequences": list(sequences),
        "num_lesions": int(len(frame)),
        "accuracy": float(np.mean(frame["true"] == frame["predicted"])),
        "overlays": {OVERLAY: MAP_NAMES[settings.method]} | ({GRADCAM_OVERLAY: MAP_NAMES["gradcam"]} if gradcam_overlay else {}),
    }
    if "relative_delta" in frame:
        summary["completeness"] = {
            "median_relative_delta": _median(frame["relative_delta"]),
            "max_relative_delta": float(frame["relative_delta"].max()),
            "median_abs_delta": _median(np.abs(frame["delta"])),
        }
    if not score:
        return summary
    # A map of another class than the lesion's (a wrong prediction explained) says why the model
    # saw that class, not whether it found this one's key sequences: it is not scored.
    own = frame[frame["explained"] == frame["true"]]
    summary["scored"] = {"lesions": int(len(own)), "other_class": int(len(frame) - len(own))}
    labels = own["label7"].to_numpy()
    # A sequence no explained lesion holds (the run hides it) is not ranked; a lesion lacking one
    # that others hold has NaN there and is left out of the scores (their n).
    scored = [s for s in sequences if frame[f"share_{s}"].notna().any()]
    tables, rankings = {}, {}
    for measure, prefix in IMPORTANCE_MEASURES.items():
        importance = own[[prefix + s for s in scored]].to_numpy()
        tables[measure] = top_k_hit_rates(importance, labels, scored, k=3)
        rankings[measure] = ranking_aucs(importance, labels, scored)
    summary["hit_rates"] = tables
    summary["ranking_auc"] = rankings
    summary["lesion_focus"] = {
        "median_share_inside": _median(frame["focus_share"]),
        "median_volume_share": _median(frame["focus_volume_share"]),
        "margin_mm": 5.0,
    }
    summary["randomisation"] = {
        "median_spearman": _median(frame["randomisation_spearman"]),
        "note": "rank correlation of |map| between the trained model(s) and one re-initialised model; "
                "low values mean the map depends on what the model learned",
    }
    return summary


def scores_markdown(summary: dict) -> str:
    """The scores of summary.json as Markdown tables."""
    lines = [f"# Explanation scores ({summary['data']})", ""]
    s = summary["settings"]
    how = {"ig": f", baseline {s['baseline']}, {s['steps']} steps ({s['quadrature']})",
           "smoothgrad": f", {s['steps']} noisy samples"}.get(s["method"], "")
    lines.append(f"Method {s['method']} on the {s['head']} head ({s['output']}){how}; {summary['num_lesions']} "
                 f"{SPLIT_NAMES[summary['split']]}, {summary['models']}; accuracy on them {summary['accuracy']:.2f}.")
    if "completeness" in summary:
        lines.append(f"Median relative completeness delta: {summary['completeness']['median_relative_delta']:.2%}.")
    other = summary["scored"]["other_class"]
    lines.append(f"Key sequences are scored on the {summary['scored']['lesions']} lesions whose map explains their own "
                 f"class; {other} whose map explains another (a wrong prediction) are left out." if other else
                 "Every map explains its lesion's own class, and every one is scored.")
    for measure, table in summary["hit_rates"].items():
        lines += ["", f"## Key-sequence hit rate in the top 3 ({measure})", "",
                  "| class | n | key sequences: hit rate | mean | chance | p (mean > chance) |",
                  "|---|---|---|---|---|---|"]
        for name, entry in table.items():
            hits = ", ".join(f"{SEQUENCE_NAMES[q]} {r:.2f}" for q, r in entry["hits"].items())
            lines.append(f"| {CLASS_NAMES[name]} | {entry['n']} | {hits} | {entry['mean']:.2f} | {entry['chance']:.2f} "
                         f"| {entry['p_above_chance']:.3f} |")
        lines.append("")
        lines.append("p: one-sided binomial test of all (lesion, key sequence) hits of the class against chance.")
        ranking = summary.get("ranking_auc", {}).get(measure)
        if ranking is None:
            continue
        lines += ["", f"## Ranking AUC of the key sequences ({measure})", "",
                  "| class | n | key items | mean ranking AUC | chance | p (> chance) |", "|---|---|---|---|---|---|"]
        groups = set()
        for name, entry in ranking.items():
            items = {i: "/".join(SEQUENCE_NAMES[q] for q in i.split("+"))
                     for i in entry["key_items"] + entry["other_items"]}
            groups.update(g for g in items.values() if "/" in g)
            numbers = (f"{entry['mean']:.2f} | {entry['chance']:.2f} | {entry['p_above_chance']:.3f}" if entry["n"]
                       else "- | - | -")
            lines.append(f"| {CLASS_NAMES[name]} | {entry['n']} | {', '.join(items[i] for i in entry['key_items'])} "
                         f"| {numbers} |")
        lines += ["", "Per lesion, the probability that a random key item outranks a random other one (ties 1/2), "
                  + (f"{' and '.join(sorted(groups))} scored as one item (the larger importance: they carry "
                     "one signal); " if groups else "")
                  + "chance: its mean over random orderings of each lesion's sequences; p: exact one-sided permutation "
                  "test of the class mean, each lesion's importance shuffled across its sequences."]
    focus = summary["lesion_focus"]
    lines += ["", "## Lesion focus", "",
              f"Median share of |attribution| within {focus['margin_mm']:.0f} mm of the lesion: "
              f"{focus['median_share_inside']:.2f}, against a volume share of {focus['median_volume_share']:.2f}.",
              "", "## Model randomisation (Adebayo et al. 2018)", "",
              f"Median Spearman correlation, trained vs re-initialised: {summary['randomisation']['median_spearman']:.2f}.",
              ""]
    return "\n".join(lines)
