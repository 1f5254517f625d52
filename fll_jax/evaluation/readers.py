"""The reader study: radiologists' calls against the truth and against the model (paper, Fig. 3-4, Table 4).

Readers CSV columns: reader_id, group, lesion_id, predicted_class (a class name such as 'hcc' or
'Haemangioma', or its integer 0-6). Lesions are matched to the test rows of predictions.csv.

Which test gives the paper's p-values: Fisher's exact test on the correct/incorrect counts of the
model and a reader taken as independent samples reproduces all three (90/113 against 75, 83 and
97 of 113, the abstract's accuracies: 0.035, 0.346, 0.291; the Results' per-reader ranges, whose
midpoints give 0.069, 0.430 and 0.291, disagree with the abstract for two groups). No McNemar variant (exact, mid-p, chi-square with or without
continuity correction) reproduces them with any discordant counts those accuracies allow
(tests/test_readers.py). McNemar's exact test is the right test for paired calls on the same
lesions, so it is the primary comparison here, with each patient as one unit (a patient's
lesions look alike); the Fisher p is reported as 'paper style'.
"""
from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score
from statsmodels.stats.inter_rater import cohens_kappa

from fll_jax.constants import CLASS_NAMES, CLASSES, NUM_CLASSES
from fll_jax.evaluation.figures import plot_confusion
from fll_jax.evaluation.paired import bootstrap_clusters, mcnemar_exact, paired_bootstrap
from fll_jax.evaluation.predictions import ENSEMBLE, load_predictions, probabilities
from fll_jax.evaluation.report import evaluation_settings
from fll_jax.evaluation.stats import RULE_NAMES, ci_label, format_interval, format_value, proportion
from fll_jax.files import read_json, write_csv, write_json, write_text
from fll_jax.train.workdir import CONFIG_FILE, WorkdirError, models_digest, read_config

READER_COLUMNS: tuple[str, ...] = ("reader_id", "group", "lesion_id", "predicted_class")
MODEL_FIGURE = "model"  # figures/confusion_reader_model.png is the model's, so no reader may map to it


class ReadersError(ValueError):
    """A readers CSV that cannot be used; the message names the file, the row and the problem."""


# The paper's abbreviations and the American spellings, besides CLASSES and CLASS_NAMES.
CLASS_ALIASES: dict[str, int] = {"hem": 2, "hemangioma": 2, "hep": 3, "met": 6, "metastases": 6}
# Simulated readers' group accuracies and reader counts, after the paper's reader study.
SIMULATED_GROUPS: dict[str, tuple[float, int]] = {"residents": (0.67, 2), "general": (0.74, 2), "academic": (0.86, 2)}
# Each class's most common mistaken call (abscess/metastasis/ICC, FNH/HCC, cyst/haemangioma).
COMMON_CONFUSION: tuple[int, ...] = (2, 4, 0, 6, 1, 6, 3)


def _file_name(reader_id: str) -> str:
    """A reader id made safe for a file name."""
    return re.sub(r"[^\w.-]", "_", str(reader_id))


def _check_file_names(reader_ids, path: Path) -> None:
    """ReadersError when two readers, or a reader and the model, would write the same confusion figure."""
    # Compared without case: on macOS and Windows 'R1' and 'r1' name one file.
    taken = {MODEL_FIGURE.casefold(): "the model"}
    for reader_id in sorted(reader_ids):
        key = _file_name(reader_id).casefold()
        if key in taken:
            raise ReadersError(f"{path}: reader {reader_id!r} and {taken[key]} would both write "
                               f"figures/confusion_reader_{_file_name(reader_id)}.png; rename the reader")
        taken[key] = f"reader {reader_id!r}"


def parse_class(value) -> int:
    """Class index from an integer, a digit string, a class key, its display name or an alias."""
    text = str(value).strip().lower()
    if text.isdigit() and int(text) < NUM_CLASSES:
        return int(text)
    names = {c: i for i, c in enumerate(CLASSES)}
    names.update({CLASS_NAMES[c].lower(): i for i, c in enumerate(CLASSES)})
    names.update(CLASS_ALIASES)
    if text not in names:
        raise ValueError(f"unknown class {value!r}; use 0-{NUM_CLASSES - 1} or one of {', '.join(CLASSES)}")
    return names[text]


def load_readers(path: str | Path) -> pd.DataFrame:
    """Read and check a readers CSV; adds the integer column 'call'. Errors name file and row."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ReadersError(f"{path}: cannot read the readers CSV ({type(error).__name__}: {error})") from None
    missing = [c for c in READER_COLUMNS if c not in frame.columns]
    if missing:
        raise ReadersError(f"{path}: missing columns {', '.join(missing)} (need {', '.join(READER_COLUMNS)})")
    empty = frame[list(READER_COLUMNS)].isna().any(axis=1)
    if empty.any():
        raise ReadersError(f"{path}: row {int(np.flatnonzero(empty)[0]) + 2}: empty field")
    calls = []
    for row, value in enumerate(frame["predicted_class"]):
        try:
            calls.append(parse_class(value))
        except ValueError as error:
            raise ReadersError(f"{path}: row {row + 2}: {error}") from None
    frame["call"] = calls
    duplicated = frame.duplicated(["reader_id", "lesion_id"])
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise ReadersError(f"{path}: row {row + 2}: reader {frame['reader_id'].iloc[row]} reads lesion {frame['lesion_id'].iloc[row]} twice")
    groups = frame.groupby("reader_id")["group"].nunique()
    if (groups > 1).any():
        raise ReadersError(f"{path}: reader {groups[groups > 1].index[0]} appears in more than one group")
    _check_file_names(frame["reader_id"].unique(), path)
    return frame


def _test_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    test = predictions[predictions["split"] == "test"].copy()
    p7, _ = probabilities(test, ENSEMBLE)
    test["model_call"] = p7.argmax(1)
    return test.set_index("lesion_id")


def compare_paired(truth: np.ndarray, model: np.ndarray, reader: np.ndarray, clusters: np.ndarray | None = None
                   ) -> dict:
    """Model against one reader on the same lesions: McNemar exact (paired; each patient one unit
    when `clusters` gives the lesions' patients) and Fisher (the paper's style)."""
    model_ok, reader_ok = model == truth, reader == truth
    paired = mcnemar_exact(model_ok, reader_ok, clusters)
    n = len(truth)
    unpaired = [[int(model_ok.sum()), n - int(model_ok.sum())], [int(reader_ok.sum()), n - int(reader_ok.sum())]]
    return {
        "model_correct": int(model_ok.sum()),
        "reader_correct": int(reader_ok.sum()),
        "model_only_correct": paired["a_only"],
        "reader_only_correct": paired["b_only"],
        "mcnemar_exact_p": paired["p"],
        "fisher_unpaired_p": float(stats.fisher_exact(unpaired).pvalue),
    }


def agreement(calls_a: np.ndarray, calls_b: np.ndarray) -> dict:
    """Cohen's kappa between two readers, with the z score and p under kappa = 0 (Table 4); each
    None where undefined (both readers calling one and the same class throughout: 0/0)."""
    n = int(len(calls_a))
    if len(np.unique(np.r_[calls_a, calls_b])) < 2:
        return {"n": n, "kappa": None, "z": None, "p": None}
    result = cohens_kappa(confusion_matrix(calls_a, calls_b, labels=list(range(NUM_CLASSES))))
    z, p = float(result.z_value), float(result.pvalue_two_sided)
    return {"n": n, "kappa": float(cohen_kappa_score(calls_a, calls_b)),
            "z": z if np.isfinite(z) else None, "p": p if np.isfinite(p) else None}


def reader_study(predictions: pd.DataFrame, readers: pd.DataFrame, confidence: float = 0.95,
                 rule: str = "bcd") -> dict:
    """Per reader and group accuracy, confusion matrices, model comparisons and agreement; the
    accuracies' intervals follow the interval rule (fll_jax.evaluation.stats.RULES)."""
    test = _test_rows(predictions)
    unknown = sorted(set(readers["lesion_id"]) - set(test.index))
    if unknown:
        raise ReadersError(f"readers CSV names {len(unknown)} lesions not in the test split, e.g. {', '.join(unknown[:5])}")
    clusters, unit = bootstrap_clusters(test)
    clusters = pd.Series(clusters, index=test.index)
    out: dict = {"confidence": confidence, "interval_rule": rule, "bootstrap_unit": unit, "readers": {}, "groups": {}}
    for reader_id, rows in readers.groupby("reader_id", sort=True):
        lesions = test.loc[rows["lesion_id"]]
        truth, calls, model = lesions["label7"].to_numpy(int), rows["call"].to_numpy(int), lesions["model_call"].to_numpy(int)
        est, lo, hi = proportion(int(np.sum(calls == truth)), len(truth), confidence, rule)
        m_est, m_lo, m_hi = proportion(int(np.sum(model == truth)), len(truth), confidence, rule)
        out["readers"][reader_id] = {
            "group": rows["group"].iloc[0],
            "n": len(truth),
            "accuracy": est, "accuracy_ci": [lo, hi],
            "model_accuracy": m_est, "model_accuracy_ci": [m_lo, m_hi],
            # Over the classes in the reader's lesions or calls, as the model's macro F1.
            "macro_f1": float(f1_score(truth, calls, labels=np.unique(np.r_[truth, calls]), average="macro",
                                       zero_division=0)),
            "confusion": confusion_matrix(truth, calls, labels=list(range(NUM_CLASSES))).tolist(),
            "vs_model": compare_paired(truth, model, calls, clusters.loc[rows["lesion_id"]].to_numpy()),
        }
    for group, rows in readers.groupby("group", sort=False):
        ids = sorted(rows["reader_id"].unique())
        members = {r: out["readers"][r] for r in ids}
        correct = [m["vs_model"]["reader_correct"] for m in members.values()]
        n_reads = sum(m["n"] for m in members.values())
        lesions = sorted(set(rows["lesion_id"]))
        truth = test.loc[lesions, "label7"].to_numpy(int)
        model_correct = int(np.sum(test.loc[lesions, "model_call"].to_numpy(int) == truth))
        mean = float(np.mean([m["vs_model"]["reader_correct"] / m["n"] for m in members.values()])) * len(lesions)
        mean_correct = math.floor(mean + 0.5)  # half up, as the paper's 96.5 -> 97 (round() takes 96.5 to 96)
        # The reads of one patient are drawn together: readers agree, and a patient's lesions look
        # alike, so neither reads nor a patient's lesions are independent.
        read_correct = rows["call"].to_numpy(int) == test.loc[rows["lesion_id"], "label7"].to_numpy(int)
        pooled = (sum(correct) / n_reads,
                  *paired_bootstrap(lambda reads: read_correct[reads].mean(), clusters.loc[rows["lesion_id"]].to_numpy(),
                                    confidence))
        kappas = {}
        for a, b in itertools.combinations(ids, 2):
            pair = rows.pivot(index="lesion_id", columns="reader_id", values="call")[[a, b]].dropna()
            if len(pair):
                kappas[f"{a} vs {b}"] = agreement(pair[a].to_numpy(int), pair[b].to_numpy(int))
        out["groups"][group] = {
            "readers": ids,
            "n_lesions": len(lesions),
            "correct_range": [min(correct), max(correct)],
            "mean_accuracy": float(np.mean([m["accuracy"] for m in members.values()])),
            "pooled_accuracy": pooled[0], "pooled_accuracy_ci": list(pooled[1:]),
            "model_correct": model_correct,
            "mean_correct": mean_correct,
            # The paper's style: model and the group's mean reader as two independent samples.
            "fisher_unpaired_p": float(stats.fisher_exact(
                [[model_correct, len(lesions) - model_correct], [mean_correct, len(lesions) - mean_correct]]).pvalue),
            "mcnemar_exact_p": {r: members[r]["vs_model"]["mcnemar_exact_p"] for r in ids},
            "agreement": kappas,
        }
    read = sorted(set(readers["lesion_id"]))
    truth = test.loc[read, "label7"].to_numpy(int)
    model_calls = test.loc[read, "model_call"].to_numpy(int)
    est, lo, hi = proportion(int(np.sum(model_calls == truth)), len(read), confidence, rule)
    out["model"] = {
        "n": len(read), "correct": int(np.sum(model_calls == truth)), "accuracy": est, "accuracy_ci": [lo, hi],
        "confusion": confusion_matrix(truth, model_calls, labels=list(range(NUM_CLASSES))).tolist(),
    }
    return out


def simulate_readers(predictions: pd.DataFrame, seed: int = 0, path: str | Path | None = None) -> pd.DataFrame:
    """Six simulated radiologists (two per group) reading every test lesion; written to path if given.

    Each group shares a consensus call (right with the group's accuracy, else usually the class's
    common confusion); each reader keeps it 90 % of the time, so readers of a group agree well,
    as the paper's Table 4. For demonstrating the reader study only: these are not real readers.
    """
    rng = np.random.default_rng(seed)
    test = predictions[predictions["split"] == "test"]
    truth, lesions = test["label7"].to_numpy(int), test["lesion_id"].astype(str).to_numpy()

    def draw(accuracy: float) -> np.ndarray:
        wrong_common = np.take(COMMON_CONFUSION, truth)
        wrong_any = (truth + rng.integers(1, NUM_CLASSES, len(truth))) % NUM_CLASSES
        wrong = np.where(rng.random(len(truth)) < 0.6, wrong_common, wrong_any)
        return np.where(rng.random(len(truth)) < accuracy, truth, wrong)

    rows, number = [], 1
    for group, (accuracy, count) in SIMULATED_GROUPS.items():
        consensus = draw(accuracy)
        for _ in range(count):
            calls = np.where(rng.random(len(truth)) < 0.9, consensus, draw(accuracy))
            rows += [{"reader_id": f"R{number}", "group": group, "lesion_id": lesion, "predicted_class": CLASSES[call]}
                     for lesion, call in zip(lesions, calls)]
            number += 1
    frame = pd.DataFrame(rows, columns=list(READER_COLUMNS))
    if path is not None:
        write_csv(frame, path)
    return frame


def reader_markdown(study: dict, source_note: str) -> str:
    """reader_study.md: accuracy per reader and group, model comparisons, Table 4."""
    model = study["model"]
    ci = ci_label(study["confidence"])
    lines = [
        "# Reader study", "", source_note, "",
        f"Model (test ensemble, argmax) on the {model['n']} lesions read: {model['correct']}/{model['n']} = "
        + format_interval((model["accuracy"], *model["accuracy_ci"])), "",
        "## Readers", "",
        f"Accuracy intervals follow {RULE_NAMES[study['interval_rule']]} (config evaluation.interval_rule). "
        f"McNemar: exact test on the paired calls, each {study['bootstrap_unit'][:-1]} one unit (primary). "
        "Fisher (paper style): Fisher's exact test on the correct/incorrect counts as two independent samples, "
        "the test that reproduces the paper's p-values.", "",
        f"| reader | group | n | ACC ({ci}) | model ACC | model only right | reader only right | p McNemar exact | p Fisher (paper style) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for reader_id, r in study["readers"].items():
        v = r["vs_model"]
        lines.append(
            f"| {reader_id} | {r['group']} | {r['n']} | {v['reader_correct']}/{r['n']} = "
            f"{format_interval((r['accuracy'], *r['accuracy_ci']))} | {v['model_correct']}/{r['n']} | "
            f"{v['model_only_correct']} | {v['reader_only_correct']} | {v['mcnemar_exact_p']:.3f} | {v['fisher_unpaired_p']:.3f} |"
        )
    lines += [
        "", "## Groups", "",
        f"| group | readers | correct (range) | mean ACC | pooled ACC ({ci}, {study['bootstrap_unit']} resampled) | model correct | p Fisher, model vs mean reader (paper style) |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, g in study["groups"].items():
        lo, hi = g["correct_range"]
        lines.append(
            f"| {group} | {', '.join(g['readers'])} | {lo}-{hi} of {g['n_lesions']} | {g['mean_accuracy']:.3f} | "
            f"{format_interval((g['pooled_accuracy'], *g['pooled_accuracy_ci']))} | {g['model_correct']} | {g['fisher_unpaired_p']:.3f} |"
        )
    lines += ["", "## Agreement within groups (Table 4 layout)", "",
              "| group | readers | n | kappa | Z score | p value |", "|---|---|---|---|---|---|"]
    for group, g in study["groups"].items():
        for pair, k in g["agreement"].items():
            p = "< 0.001" if k["p"] is not None and k["p"] < 0.001 else format_value(k["p"])
            lines.append(f"| {group} | {pair} | {k['n']} | {format_value(k['kappa'])} | {format_value(k['z'])} | {p} |")
    lines += ["", "## Confusion matrices", ""]
    lines += [f"![{name}](figures/confusion_reader_{_file_name(name)}.png)" for name in [MODEL_FIGURE, *study["readers"]]]
    return "\n".join(lines) + "\n"


def _models(workdir: Path) -> str | None:
    """The identity of the fold models whose predictions the study reads (None outside a run's folder)."""
    try:
        return models_digest(workdir)
    except WorkdirError:
        return None


def study_models(workdir: str | Path) -> str | None:
    """The fold models (models_digest) whose predictions the workdir's reader study read; None
    when it recorded none (made before studies recorded them)."""
    return read_json(Path(workdir) / "reader_study.json", "rerun experiments/reader_study.py").get("models")


def _real_readers(workdir: Path) -> str | None:
    """The readers CSV of the study in workdir if its readers were real, else None (no study, or
    simulated readers)."""
    path = workdir / "reader_study.json"
    if not path.exists():
        return None
    study = read_json(path, "delete it to make a new study")
    if "readers_csv" in study or "simulated_seed" in study:
        return study.get("readers_csv")
    # Written before studies recorded their readers: its report says whether they were simulated.
    report = workdir / "reader_study.md"
    simulated = report.exists() and "**Simulated readers**" in report.read_text(encoding="utf-8")
    return None if simulated else "their CSV was not recorded"


def write_reader_study(workdir: str | Path, readers_csv: str | Path | None = None, seed: int = 0,
                       overwrite: bool = False) -> dict:
    """Reader study of a workdir: reader_study.md, reader_study.json and figures/confusion_reader_*.png.

    Without readers_csv, simulated readers are written to workdir/simulated_readers.csv and used,
    and the report says so. Intervals are at the run's evaluation.confidence and follow its
    evaluation.interval_rule, as in its report.
    The figures of an earlier study's readers go; its files are replaced only after this study
    has been computed.

    Raises:
        FileExistsError: simulated readers would replace a study of real readers (unless overwrite).
    """
    workdir = Path(workdir)
    predictions = load_predictions(workdir / "predictions.csv")
    config = read_config(workdir).to_dict() if (workdir / CONFIG_FILE).exists() else {}
    confidence, rule = evaluation_settings(config)
    earlier = workdir / "reader_study.json"
    if readers_csv is None:
        real = _real_readers(workdir)
        if real and not overwrite:
            raise FileExistsError(f"{earlier} is a study of real readers ({real}); simulated readers would replace "
                                  "it. Give --readers with their CSV to redo it, or --overwrite to replace it")
        readers_csv = workdir / "simulated_readers.csv"
        simulate_readers(predictions, seed, readers_csv)
        note = f"> **Simulated readers** ({readers_csv.name}, seed {seed}): a demonstration of the analysis, not a reader study."
        source = {"readers_csv": None, "simulated_seed": seed}
    else:
        note = f"Readers: `{readers_csv}`."
        source = {"readers_csv": str(readers_csv)}
    if str((config.get("data") or {}).get("source", "")).lower() == "phantom":
        note += "\n\n> **Data: synthetic phantom.** These results are not evidence of clinical performance."
    study = {**reader_study(predictions, load_readers(readers_csv), confidence, rule), **source,
             "models": _models(workdir)}
    names = [CLASS_NAMES[c] for c in CLASSES]
    figures = workdir / "figures"
    for stale in figures.glob("confusion_reader_*.png"):  # an earlier study's readers must not pass for this one's
        stale.unlink()
    plot_confusion(study["model"]["confusion"], names, "Model", figures / f"confusion_reader_{MODEL_FIGURE}.png")
    for reader_id, r in study["readers"].items():
        plot_confusion(r["confusion"], names, f"{reader_id} ({r['group']})", figures / f"confusion_reader_{_file_name(reader_id)}.png")
    write_json(earlier, study)
    write_text(workdir / "reader_study.md", reader_markdown(study, note))
    return study
