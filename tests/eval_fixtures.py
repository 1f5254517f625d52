"""A seeded synthetic predictions.csv (the training job's exact format) for the evaluation tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fll_jax.constants import NUM_CLASSES, to_binary

# The paper's test split (Table 2): cyst 16, FNH 11, haemangioma 22, abscess 21, HCC 15, ICC 11, metastasis 17.
TEST_COUNTS: tuple[int, ...] = (16, 11, 22, 21, 15, 11, 17)
SCANNERS = ("GE Signa", "GE Discovery MR750w", "Philips Ingenia", "Siemens Prisma", "Siemens TrioTim")
MEDIAN_DIAMETER_MM = (13, 34, 20, 63, 29, 52, 28)
# Each class's most likely confusion (the paper's: abscess/metastasis/ICC, FNH/HCC, cyst/haemangioma).
CONFUSER = (2, 4, 0, 6, 1, 6, 3)
NUM_FOLDS = 5


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _lesions(labels: np.ndarray, first_patient: int, rng: np.random.Generator) -> pd.DataFrame:
    """Metadata of lesions grouped into patients of one class (1-3 lesions each)."""
    rows, patient = [], first_patient
    i = 0
    while i < len(labels):
        size = 1
        while size < 3 and i + size < len(labels) and labels[i + size] == labels[i] and rng.random() < 0.3:
            size += 1
        for j in range(size):
            label = int(labels[i + j])
            rows.append({
                "patient_id": f"P{patient:04d}",
                "lesion_id": f"P{patient:04d}_L{j + 1}",
                "label7": label,
                "background": rng.choice(["normal", "cirrhotic", "fatty"], p=[0.7, 0.15, 0.15] if label != 4 else [0.4, 0.5, 0.1]),
                "scanner": rng.choice(SCANNERS),
                "diameter_mm": round(float(MEDIAN_DIAMETER_MM[label] * rng.lognormal(0, 0.35)), 1),
            })
        i, patient = i + size, patient + 1
    frame = pd.DataFrame(rows)
    frame.insert(3, "label2", to_binary(frame["label7"].to_numpy()))
    return frame


def _logits(labels: np.ndarray, rng: np.random.Generator, signal: float) -> np.ndarray:
    logits = rng.normal(0.0, 1.0, (len(labels), NUM_CLASSES))
    logits[np.arange(len(labels)), labels] += signal
    confused = rng.random(len(labels)) < 0.35
    logits[np.flatnonzero(confused), np.take(CONFUSER, labels[confused])] += signal * 0.8
    return logits


def _prob_columns(model: str, p7: np.ndarray, p2: np.ndarray) -> dict[str, np.ndarray]:
    cols = {f"{model}_p2_{k}": p2[:, k] for k in range(2)}
    cols.update({f"{model}_p7_{k}": p7[:, k] for k in range(NUM_CLASSES)})
    return cols


def _model_probs(base: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One fold model's p7 and p2: shared lesion logits plus model noise; p2 from its own head."""
    p7 = _softmax(base + rng.normal(0, 0.6, base.shape))
    malignant = p7[:, 4:].sum(1)
    logit = np.log(malignant / (1 - malignant + 1e-9) + 1e-9) + rng.normal(0, 0.7, len(base))
    p2 = _softmax(np.stack([np.zeros_like(logit), logit], axis=1))
    return p7, p2


def synthetic_predictions(seed: int = 0, dev_per_fold: int = 40, signal: float = 2.6) -> pd.DataFrame:
    """Test rows (the paper's 113 lesions) and out-of-fold validation rows, as the trainer writes them."""
    rng = np.random.default_rng(seed)
    test_labels = np.repeat(np.arange(NUM_CLASSES), TEST_COUNTS)
    test = _lesions(test_labels, 1, rng)
    dev_labels = np.sort(np.arange(NUM_FOLDS * dev_per_fold) % NUM_CLASSES)
    dev = _lesions(dev_labels, int(test["patient_id"].str[1:].astype(int).max()) + 1, rng)
    test.insert(0, "fold", -1)
    test.insert(0, "split", "test")
    base = _logits(test["label7"].to_numpy(), rng, signal)
    probs = [_model_probs(base, rng) for _ in range(NUM_FOLDS)]
    for k, (p7, p2) in enumerate(probs):
        test = test.assign(**_prob_columns(f"fold{k}", p7, p2))
    mean7, mean2 = np.mean([p[0] for p in probs], 0), np.mean([p[1] for p in probs], 0)
    test = test.assign(**_prob_columns("ensemble", mean7, mean2))
    # Whole patients per fold, as the trainer's patient-level folds.
    patients = dev["patient_id"].unique()
    fold_of = dict(zip(patients, rng.permutation(len(patients)) % NUM_FOLDS))
    vals = []
    for k in range(NUM_FOLDS):
        rows = dev[dev["patient_id"].map(fold_of) == k].copy()
        rows.insert(0, "fold", k)
        rows.insert(0, "split", "val")
        p7, p2 = _model_probs(_logits(rows["label7"].to_numpy(), rng, signal), rng)
        vals.append(rows.assign(**_prob_columns(f"fold{k}", p7, p2), **_prob_columns("ensemble", p7, p2)))
    frame = pd.concat([test, *vals], ignore_index=True)
    ordered = [c for c in frame.columns if not c.startswith(("fold", "ensemble")) or c == "fold"]
    models = [f"fold{k}" for k in range(NUM_FOLDS)] + ["ensemble"]
    prob_cols = [c for m in models for c in (*(f"{m}_p2_{k}" for k in range(2)), *(f"{m}_p7_{k}" for k in range(NUM_CLASSES)))]
    return frame[ordered + prob_cols]


def write_synthetic_workdir(workdir: Path, seed: int = 0, source: str = "phantom") -> Path:
    """A workdir holding predictions.csv and a config.json like the trainer's."""
    workdir.mkdir(parents=True, exist_ok=True)
    synthetic_predictions(seed).to_csv(workdir / "predictions.csv", index=False)
    config = {
        "seed": 0,
        "sequences": ["t2w", "dwi", "adc", "t1w", "lap", "pvp", "dp"],
        "data": {"source": source, "scale": "quick", "manifest": "" if source == "phantom" else "/data/manifest.csv"},
        "model": {"depth": 18, "width": 8, "fusion": "paper"},
        "input_size": 32,
        "train": {"epochs": 8, "folds": list(range(NUM_FOLDS))},
    }
    (workdir / "config.json").write_text(json.dumps(config, indent=2))
    return workdir
