"""The run's report: metrics.json, report.md and figures/, all from predictions.csv + config.json.

write_report(workdir) is what the training job calls and what experiments/report.py reruns;
it reads nothing else, so a report can be regenerated without retraining.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from fll_jax.code_version import code_version
from fll_jax.constants import BINARY_CLASSES, CLASS_NAMES, CLASSES, SEQUENCE_NAMES, SEQUENCES
from fll_jax.evaluation import discrimination as disc
from fll_jax.evaluation.cohort import COLUMNS as COHORT_COLUMNS, PATIENTS_FILE, cohort_table, with_patients
from fll_jax.evaluation.figures import plot_confusion, plot_roc
from fll_jax.evaluation.predictions import ENSEMBLE, load_predictions, missing_sequences, model_names, probabilities
from fll_jax.evaluation.stats import (
    METRIC_KEYS, RULE_NAMES, check_rule, ci_label, format_interval, format_value, likelihood_ratios,
)
from fll_jax.evaluation.subgroups import FACTORS, subgroups
from fll_jax.files import StateFileError, read_json, write_json, write_text
from fll_jax.train.workdir import (
    CONFIG_FILE, WorkdirError, fold_code_versions, folds_text, made_by, models_digest, models_folder,
    predictions_problem, read_config,
)

ROW_NAMES = {
    "accuracy": "ACC", "sensitivity": "Sensitivity", "specificity": "Specificity",
    "ppv": "PPV", "npv": "NPV", "plr": "PLR", "nlr": "NLR",
}
COLUMN_NAMES = {disc.BINARY_COLUMN: "Two-way", **{c: CLASS_NAMES[c] for c in CLASSES}}
DISPLAY_CLASSES = [CLASS_NAMES[c] for c in CLASSES]
SUMMARY_KEYS = ("accuracy_7way", "accuracy_2way", "auc_binary", "auc_macro_ovr", "macro_f1", "cohen_kappa", "challenge_score")
ARGMAX_NOTE = "argmax of each head (binary head for the two-way column, seven-way head for the others)"


def data_description(config: dict) -> dict:
    """Phantom or real, from config['data'] (lenient about missing keys and spellings)."""
    data = config.get("data") or {}
    source = str(data.get("source", "")).lower()
    manifest = data.get("manifest") or ""
    if source == "phantom":
        scale = data.get("scale", "?")
        return {"source": "phantom", "phantom": True, "text": f"synthetic phantom (scale '{scale}')"}
    if source == "manifest" or manifest:
        return {"source": "manifest", "phantom": False, "text": f"real data from manifest {manifest or '(path not recorded)'}"}
    return {"source": source or "unknown", "phantom": None, "text": "not recorded in config.json"}


def evaluation_settings(config: dict) -> tuple[float, str]:
    """(confidence, interval rule) from config['evaluation']; 0.95 and 'bcd' where the config has none."""
    settings = config.get("evaluation") or {}
    return float(settings.get("confidence", 0.95)), check_rule(settings.get("interval_rule", "bcd"))


def run_description(config: dict, workdir: Path, models: Path | None = None) -> dict:
    """The settings a reader of the report needs to know which run it describes; `models`: the
    folder of its fold models (default: models_folder(workdir))."""
    model = config.get("model") or {}
    train = config.get("train") or {}
    return {
        "workdir": str(workdir.resolve()),
        "sequences": list(config.get("sequences") or []),
        "fusion": model.get("fusion"),
        "depth": model.get("depth"),
        "width": model.get("width"),
        "input_size": config.get("input_size"),
        "epochs": train.get("epochs"),
        "folds": list(train.get("folds") or []),
        "seed": config.get("seed"),
        "hidden_sequences": list((config.get("evaluation") or {}).get("hidden_sequences") or []),
        "code": code_version(),
        "fold_code": fold_code_versions(models or models_folder(workdir), train.get("folds") or []),
    }


def _model_block(frame: pd.DataFrame, model: str, thresholds: dict | None, confidence: float, rule: str) -> dict:
    """Summary, AUCs, Table 3 columns and confusion matrices of one model on some rows."""
    p7, p2 = probabilities(frame, model)
    label7, label2 = frame["label7"].to_numpy(int), frame["label2"].to_numpy(int)
    block = disc.summary_metrics(label7, p7, label2, p2, confidence, rule)
    block["auc"] = disc.auc_table(label7, p7, label2, p2, confidence)
    block["table3_argmax"] = disc.table3(label7, p7, label2, p2, None, confidence, rule)
    if thresholds is not None:
        block["table3_validation_thresholds"] = disc.table3(label7, p7, label2, p2, thresholds, confidence, rule)
    block["confusion_7way"] = disc.confusion(label7, p7.argmax(1), len(CLASSES))
    block["confusion_2way"] = disc.confusion(label2, p2.argmax(1), 2)
    return block


def _fold_summary(frame: pd.DataFrame, model: str, confidence: float, rule: str) -> dict:
    p7, p2 = probabilities(frame, model)
    return disc.summary_metrics(frame["label7"].to_numpy(int), p7, frame["label2"].to_numpy(int), p2, confidence, rule)


def evaluate(frame: pd.DataFrame, confidence: float = 0.95, rule: str = "bcd") -> dict:
    """Every metric of the report from a checked predictions frame (see load_predictions).

    rule: the interval rule (fll_jax.evaluation.stats.RULES) of every proportion and likelihood ratio.
    """
    test, val = frame[frame["split"] == "test"], frame[frame["split"] == "val"]
    thresholds = None
    if len(val):
        vp7, vp2 = probabilities(val, ENSEMBLE)
        thresholds = disc.validation_thresholds(val["label7"].to_numpy(int), vp7, val["label2"].to_numpy(int), vp2)
    metrics: dict = {"test": {ENSEMBLE: _model_block(test, ENSEMBLE, thresholds, confidence, rule)}, "val": {},
                     "statistics": {"confidence": confidence, "interval_rule": rule}}
    for model in model_names(frame):
        cols = [f"{model}_p7_{k}" for k in range(len(CLASSES))] + [f"{model}_p2_{k}" for k in range(2)]
        on_test = test[test[cols].notna().all(axis=1)]
        if len(on_test):
            metrics["test"][model] = _fold_summary(on_test, model, confidence, rule)
    if len(val):
        metrics["val"][ENSEMBLE] = _model_block(val, ENSEMBLE, None, confidence, rule)
        for model in model_names(frame):
            own = val[val["fold"] == int(model[len("fold"):])]
            if len(own):
                metrics["val"][model] = _fold_summary(own, model, confidence, rule)
    metrics["operating_points"] = {"table3_argmax": ARGMAX_NOTE, "validation_thresholds": thresholds}
    p7, p2 = probabilities(test, ENSEMBLE)
    correct7 = p7.argmax(1) == test["label7"].to_numpy(int)
    correct2 = p2.argmax(1) == test["label2"].to_numpy(int)
    metrics["subgroups"] = subgroups(test, correct7, correct2, confidence, rule)
    metrics["missing_sequences"] = missing_counts(frame)
    metrics["cohort"] = cohort_table(frame)
    return metrics


def missing_counts(frame: pd.DataFrame) -> dict:
    """Per split ('test', 'val'): lesions, lesions lacking any sequence, and per sequence how many lack it."""
    out = {}
    for split in ("test", "val"):
        missing = [missing_sequences(text) for text in frame.loc[frame["split"] == split, "missing"]]
        out[split] = {"lesions": len(missing), "lacking_any": sum(bool(m) for m in missing),
                      "per_sequence": {s: sum(s in m for m in missing) for s in SEQUENCES}}
    return out


def missing_markdown(metrics: dict, workdir: Path, models: str | None) -> list[str]:
    """How many lesions lacked which sequence, and the ensemble with each sequence hidden at inference
    (its table only if made with `models`, the run's current_models)."""
    counts = metrics.get("missing_sequences", {})
    lines = ["## Missing sequences", ""]
    hidden = metrics.get("run", {}).get("hidden_sequences") or []
    if not any(c["lacking_any"] for c in counts.values()):
        # What the data held: a run hiding sequences says so beside it, or the line reads as a contradiction.
        lines += ["Every lesion had all seven sequences" + (f" (this run hid {', '.join(SEQUENCE_NAMES[h] for h in hidden)} "
                                                            "from every one)." if hidden else "."), ""]
    else:
        header = ["split", "lesions", "lacking any", *(SEQUENCE_NAMES[s] for s in SEQUENCES)]
        rows = [[split, str(c["lesions"]), str(c["lacking_any"]), *(str(c["per_sequence"][s]) for s in SEQUENCES)]
                for split, c in counts.items()]
        lines += ["Lesions lacking each sequence (one the model uses enters as zero features and a presence flag):", "",
                  *_markdown_table(header, rows), ""]
    path = workdir / "missing_at_inference.json"
    if not path.exists():
        return lines
    result = read_json(path, "rerun experiments/missing_sequences.py")
    if result.get("models") != models:
        return lines + [f"`{path.name}` was not made with this run's fold models (made before a fold was trained "
                        "again, or by an earlier version); rerun experiments/missing_sequences.py for its table.", ""]
    by_run = [SEQUENCE_NAMES[s] for s in result.get("hidden_by_run", [])]
    also = f" besides {', '.join(by_run)} (hidden in every row, as in this run's evaluation)" if by_run else ""
    lines += [f"Ensemble on the test split with one sequence hidden from every test lesion at inference{also}, "
              f"no retraining (trained with sequence dropout {result['sequence_dropout']:g}; "
              "experiments/missing_sequences.py):", ""]
    rows = [[SEQUENCE_NAMES.get(r["hidden"], r["hidden"]), str(r["n"]), format_value(r["accuracy_7way"]),
             format_value(r["accuracy_2way"]), format_value(r["auc_binary"])] for r in result["rows"]]
    return lines + [*_markdown_table(["hidden", "n", "ACC 7-way", "ACC 2-way", "AUC 2-way"], rows), ""]


def json_safe(value):
    """Plain JSON types; NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# ---------------------------------------------------------------- markdown


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _median_iqr(summary: dict) -> str:
    if summary["median"] is None:
        return "-"
    return f"{summary['median']:.1f} ({summary['q1']:.1f}, {summary['q3']:.1f})"


def _continuous_cells(label: str, row: dict) -> list[str]:
    return [label, *(_median_iqr(row["summary"][c]) for c in COHORT_COLUMNS), format_value(row["p"]),
            row["test"] or "-"]


def _level_cells(name: str, entry: dict) -> list[str]:
    """One level of a categorical row: n (share of the level's total) per column."""
    return [f"&nbsp;&nbsp;{name}", *(f"{entry['n'][c]} ({entry['percent_of_level'][c]:.1f}%)" for c in COHORT_COLUMNS), "", ""]


def _categorical_rows(label: str, row: dict) -> list[list[str]]:
    """A header line with the row's test, then one line per level."""
    return [[label, "", "", "", format_value(row["p"]), row["test"] or "-"],
            *(_level_cells(level, entry) for level, entry in row["levels"].items())]


def cohort_markdown(cohort: dict) -> list[str]:
    """The paper's Table 2 layout: total, development and test columns, a p-value and its test per row."""
    rows = cohort["rows"]
    unit = "per patient" if cohort["per_patient_rows"] else "per lesion: patient_id unknown"
    lines = []
    if cohort["patients"] is not None:
        lines.append(["No. of patients", *(str(cohort["patients"][c]) for c in COHORT_COLUMNS), "", ""])
    if "age" in rows:
        lines.append(_continuous_cells(f"Age (years, {unit}), median (IQR)", rows["age"]))
    if "sex" in rows:
        lines += _categorical_rows(f"Sex ({unit})", rows["sex"])
    total = cohort["lesions"]["total"]
    lines.append(["No. of lesions (%)", *(f"{cohort['lesions'][c]} ({100 * cohort['lesions'][c] / total:.1f}%)"
                                          for c in COHORT_COLUMNS), "", ""])
    lines.append(_continuous_cells("Lesion diameter (mm), median (IQR)", rows["diameter_mm"]))
    # As the paper: each class's count, then its diameters.
    lines.append(_categorical_rows("Lesion type", rows["class"])[0])
    for c, entry in rows["class"]["levels"].items():
        lines += [_level_cells(CLASS_NAMES[c], entry),
                  _continuous_cells("&nbsp;&nbsp;&nbsp;&nbsp;diameter (mm), median (IQR)", rows["diameter_mm_by_class"][c])]
    lines += _categorical_rows("Liver background", rows["background"])
    lines += _categorical_rows("Manufacturer and model", rows["scanner"])
    note = (f"Development: the out-of-fold validation rows of predictions.csv ({cohort['cohorts']['development']}); "
            "test: split 'test'. n (%): count in each column and its share of the row's total, "
            "as in the paper's Table 2 (metrics.json 'cohort' also holds each level's share of its column). "
            "Continuous rows: median (IQR), Mann-Whitney U test (the paper chose Student's t or Kruskal-Wallis "
            "by normality); categorical rows: Pearson's chi-square (Yates-corrected on 2x2 tables), or Fisher's "
            "exact test when an expected count is below 5. Levels 'unknown' are shown but left out of the tests.")
    if cohort["patients"] is not None and cohort["patients"]["in_both"]:
        note += f" {cohort['patients']['in_both']} patient(s) have lesions in both cohorts."
    header = ["Characteristic", "Total", "Development", "Test", "p", "statistical test"]
    return ["## Table 2 layout: development against test", "", note, "", *_markdown_table(header, lines), ""]


def _table3_cell(entry: dict, key: str) -> str:
    """One metric of a Table 3 column. JSON holds no infinity (json_safe made it None), so a
    likelihood ratio over zero, (inf, None, inf) in stats.likelihood_ratio, is told by its counts."""
    if key in ("plr", "nlr") and likelihood_ratios(**entry["counts"])[key][0] == math.inf:
        return format_interval((math.inf, None, math.inf))
    return format_interval(tuple(entry[key]))


def table3_markdown(table: dict, confidence: float) -> list[str]:
    """The paper's Table 3 layout: rows ACC..NLR with CIs, the two-way column then seven classes."""
    header = ["", *(COLUMN_NAMES[c] for c in disc.TABLE3_COLUMNS)]
    rows = [[f"{ROW_NAMES[k]} ({ci_label(confidence)})", *(_table3_cell(table[c], k) for c in disc.TABLE3_COLUMNS)] for k in METRIC_KEYS]
    rows.append(["TP/FP/FN/TN", *("/".join(str(table[c]["counts"][x]) for x in ("tp", "fp", "fn", "tn")) for c in disc.TABLE3_COLUMNS)])
    return _markdown_table(header, rows)


def _summary_markdown(blocks: dict, confidence: float) -> list[str]:
    ci = ci_label(confidence)
    header = ["model", "n", f"ACC 7-way ({ci})", f"ACC 2-way ({ci})", f"AUC 2-way ({ci})", "macro AUC", "macro F1", "kappa",
              "(F1+kappa)/2"]
    rows = []
    for name, b in blocks.items():
        rows.append([
            name, str(b["n"]),
            f"{b['correct_7way']}/{b['n']} = " + format_interval((b["accuracy_7way"], *b["accuracy_7way_ci"])),
            format_interval((b["accuracy_2way"], *b["accuracy_2way_ci"])),
            format_interval((b["auc_binary"], *b["auc_binary_ci"])),
            *(format_value(b[k]) for k in ("auc_macro_ovr", "macro_f1", "cohen_kappa", "challenge_score")),
        ])
    return _markdown_table(header, rows)


def _confusion_markdown(counts: list[list[int]], names: list[str]) -> list[str]:
    return _markdown_table(["true \\ predicted", *names], [[names[i], *map(str, row)] for i, row in enumerate(counts)])


def _subgroup_markdown(sub: dict, confidence: float) -> list[str]:
    ci = ci_label(confidence)
    lines = []
    for factor in FACTORS:
        seven, two = sub[factor]["seven_way"], sub[factor]["two_way"]
        lines += ["", f"**{factor.replace('_', ' ')}** (overall chi-square p: seven-way "
                  f"{format_value(seven['overall_chi2_p'])}, two-way {format_value(two['overall_chi2_p'])})", ""]
        header = ["level", "n", f"ACC 7-way ({ci})", "rest", "p chi2 (Yates)", "p Fisher",
                  f"ACC 2-way ({ci})", "rest", "p chi2 (Yates)", "p Fisher"]
        rows = []
        for level, s in seven["levels"].items():
            t = two["levels"][level]
            rows.append([
                level, str(s["n"]),
                format_interval((s["accuracy"], *s["accuracy_ci"])),
                *(format_value(s[k]) for k in ("rest_accuracy", "chi2_yates_p", "fisher_p")),
                format_interval((t["accuracy"], *t["accuracy_ci"])),
                *(format_value(t[k]) for k in ("rest_accuracy", "chi2_yates_p", "fisher_p")),
            ])
        lines += _markdown_table(header, rows)
    return lines


def _auc_markdown(auc: dict, confidence: float) -> list[str]:
    rows = [[COLUMN_NAMES[c], format_interval((auc[c]["auc"], auc[c]["lower"], auc[c]["upper"]))] for c in disc.TABLE3_COLUMNS]
    rows.append(["macro mean (one-vs-rest)", format_value(auc["macro_ovr"])])
    return _markdown_table(["task", f"AUC ({ci_label(confidence)}, DeLong)"], rows)


def overlays_markdown(lesions: pd.DataFrame, overlays: dict[str, str], split: str) -> list[str]:
    """The first explained lesion of each true class with its overlays side by side, one column per file.

    lesions: explain's lesions.csv (lesion_id, label7, true, predicted, folder); overlays: file -> map name.
    """
    first = lesions.drop_duplicates("label7").sort_values("label7")
    header = ["lesion", "true / predicted", *(f"{name} (`{file}`)" for file, name in overlays.items())]
    rows = [[str(r.lesion_id), f"{r.true} / {r.predicted}",
             *(f"![{name}: {r.lesion_id}](explain/{split}/{r.folder}/{file})" for file, name in overlays.items())]
            for r in first.itertuples()]
    shown = ", ".join(f"{name} in `{file}`" for file, name in overlays.items())
    return ["", f"The first explained lesion of each class: {shown}; every used sequence on the same slice "
            "(largest lesion area), lesion outlined in green, red for the explained class.", "",
            *_markdown_table(header, rows)]


def earlier_outputs_markdown(workdir: Path, models: str | None) -> list[str]:
    """The reader study and predict.py's default outputs in the workdir when other fold models than
    `models` (the run's current_models) made them: they no longer describe this run."""
    from fll_jax.evaluation.readers import study_models  # it reads this module's settings

    def made(read) -> str | None:
        try:
            return read()
        except StateFileError:
            return "damaged"  # a damaged record must not stop the report: its outputs are of unknown models

    stale = []
    if (workdir / "reader_study.json").exists() and made(lambda: study_models(workdir)) != models:
        stale.append("`reader_study.md`: rerun experiments/reader_study.py (with the same --readers)")
    if ((workdir / "predict" / "predictions.csv").exists()
            and made(lambda: made_by(workdir / "predict").get("models")) != models):
        stale.append("`predict/`: rerun experiments/predict.py on the same lesions with --overwrite")
    if not stale:
        return []
    return ["## Outputs of earlier fold models", "",
            "Made from other fold models than these results (a fold trained again, other folds, or before "
            "outputs recorded their models), so they do not describe this run:", "",
            *(f"- {line}" for line in stale), ""]


def current_models(workdir: Path) -> str | None:
    """The identity of the workdir's fold models (models_digest), None when it holds no finished run."""
    try:
        return models_digest(workdir)
    except WorkdirError:
        return None


def saliency_markdown(workdir: Path, models: str | None) -> list[str]:
    """The explain job's results (workdir/explain/<split>/), for each split it was run on with
    `models` (the run's current_models)."""
    lines = []
    for split, what in (("test", "test split, fold ensemble"), ("val", "development lesions, out-of-fold models")):
        folder = workdir / "explain" / split
        if not (folder / "summary.json").exists():
            continue
        try:
            summary = read_json(folder / "summary.json", f"rerun experiments/explain.py --split {split} --overwrite")
            lesions = pd.read_csv(folder / "lesions.csv", dtype={"lesion_id": str, "folder": str})
        except (StateFileError, OSError, ValueError) as error:
            # A report that failed here would leave the run unfinished, and explain refuses unfinished runs.
            lines += ["", f"### {what}", "", f"`explain/{split}/` is damaged ({error}); its maps are not shown."]
            continue
        if (summary.get("request") or {}).get("run") != models:
            lines += ["", f"### {what}", "", f"`explain/{split}/` was not made with this run's fold models (made before "
                      "a fold was trained again, or by an earlier version); rerun experiments/explain.py --split "
                      f"{split} --overwrite for its maps."]
            continue
        if summary.get("split", split) != split:  # written there with --out_dir by an earlier version
            lines += ["", f"### {what}", "", f"`explain/{split}/` holds explanations of split {summary['split']!r}, "
                      f"not {split!r}; rerun experiments/explain.py --split {split} --overwrite for its maps."]
            continue
        overlays = summary.get("overlays", {"overlay.png": summary["settings"]["method"]})
        lines += ["", f"### {what}", "",
                  f"{summary['num_lesions']} lesions in `explain/{split}/` (per lesion: {', '.join(overlays)}, "
                  "importance.png, NIfTI maps on each sequence's native grid).",
                  *(line for note in summary.get("notes", []) for line in ("", note)),
                  "", f"![importance by class](explain/{split}/importance_by_class.png)"]
        if "folder" in lesions:
            lines += overlays_markdown(lesions, overlays, split)
        scores = folder / "scores.md"
        if scores.exists():
            # Its own title is dropped and its sections nested under this one.
            body = scores.read_text().splitlines()[1:]
            lines += [("###" + line[1:]) if line.startswith("## ") else line for line in body]
        elif "completeness" in summary:
            delta = summary["completeness"]["median_relative_delta"]
            lines += ["", f"Median relative completeness delta of integrated gradients: {delta:.2%}."]
    if not lines:
        return []
    return ["## Saliency (experiments/explain.py)", *lines, ""]


def _code_markdown(run: dict) -> list[str]:
    """Which code wrote the report and trained the fold models, loudly when the folds' differ."""
    code, folds = run.get("code"), run.get("fold_code") or {}
    versions = sorted({version for trained in folds.values() for version in trained})
    if not versions:
        return [f"Code: {code} wrote this report.", ""]
    if versions == [code]:
        return [f"Code: {code} wrote this report and trained every fold model.", ""]
    if len(versions) == 1:
        return [f"Code: {versions[0]} trained every fold model; {code} wrote this report.", ""]
    return ["**Fold models trained by different versions of the code**: "
            + "; ".join(f"{fold} by {', '.join(trained)}" for fold, trained in folds.items())
            + f" (this report: {code}). To train every fold with one version, start over with --restart.", ""]


def report_markdown(metrics: dict, figures: list[str], saliency: list[str] = (), missing: list[str] = (),
                    earlier: list[str] = ()) -> str:
    """report.md from the metrics dict, the relative paths of the figures written, the saliency
    section (saliency_markdown), the missing-sequence section (missing_markdown) and the outputs
    of earlier fold models (earlier_outputs_markdown)."""
    data, run = metrics["data"], metrics["run"]
    statistics = metrics.get("statistics", {"confidence": 0.95, "interval_rule": "bcd"})
    confidence = statistics["confidence"]
    ens = metrics["test"][ENSEMBLE]
    lines = [f"# Evaluation report: {Path(run['workdir']).name}", ""]
    if data["phantom"]:
        lines += [f"> **Data: {data['text']}.** These numbers come from synthetic images; they exercise the "
                  "pipeline and are **not evidence of clinical performance**.", ""]
    elif data["phantom"] is False:
        lines += [f"> Data: {data['text']}.", ""]
    else:
        lines += ["> Data source: not recorded in config.json (phantom or real unknown); "
                  "do not read these numbers as clinical evidence without checking.", ""]
    lines += [
        f"Run: `{run['workdir']}`; sequences {', '.join(run['sequences']) or '?'}; fusion {run['fusion']}; "
        f"ResNet depth {run['depth']}, width {run['width']}; input {run['input_size']}^3; "
        f"{run['epochs']} epochs; folds {run['folds']}; seed {run['seed']}.",
        "",
        *_code_markdown(run),
        *([f"**Evaluated with {', '.join(run['hidden_sequences'])} hidden from every lesion** (test and "
           "out-of-fold), as if the lesions lacked them; the models were trained with them.", ""]
          if run.get("hidden_sequences") else []),
        f"Test split: {ens['n']} lesions; the ensemble is the mean of the fold models' probabilities. "
        "Validation rows are out-of-fold: each lesion scored by the model whose validation fold holds it. Their "
        "'ensemble' row pools these single models' scores, and each fold's best checkpoint was chosen on its own "
        "validation lesions, so these figures lean optimistic; the test split's are the unbiased estimate.",
        "",
        *cohort_markdown(metrics["cohort"]),
        "## Summary (operating point: argmax)",
        "",
        "Test split:",
        "",
        *_summary_markdown(metrics["test"], confidence),
        "",
        "Validation (out-of-fold):",
        "",
        *(_summary_markdown(metrics["val"], confidence) if metrics["val"] else ["(no validation rows in predictions.csv)"]),
        "",
        "## Table 3 layout: ensemble on the test split, argmax",
        "",
        f"Operating point: {ARGMAX_NOTE}. The seven one-vs-rest columns then come from one confusion "
        "matrix, so their false positives and false negatives both sum to the number of errors.",
        "",
        *table3_markdown(ens["table3_argmax"], confidence),
        "",
    ]
    thresholds = metrics["operating_points"]["validation_thresholds"]
    if "table3_validation_thresholds" in ens:
        shown = ", ".join(f"{COLUMN_NAMES[c]} {format_value(t)}" for c, t in thresholds.items())
        lines += [
            "## Table 3 layout: ensemble on the test split, validation thresholds",
            "",
            "Operating point: per column, the probability threshold (malignant probability for the two-way "
            "column, that class's probability for the others) maximising Youden's J on the out-of-fold "
            f"validation rows: {shown}. Columns are then independent one-vs-rest decisions. Each out-of-fold "
            "probability comes from one fold model and each test probability is the mean of all of them, which "
            "is less extreme, so a threshold may sit off the ensemble's own best point. The paper's "
            "Table 3 looks like this kind of table: its seven columns imply 49 false positives but only 4 "
            "false negatives, which no single argmax confusion matrix can give.",
            "",
            *table3_markdown(ens["table3_validation_thresholds"], confidence),
            "",
        ]
    lines += [
        "## AUC (ensemble, test split)",
        "",
        *_auc_markdown(ens["auc"], confidence),
        "",
        "## Confusion matrices (ensemble, test split, argmax)",
        "",
        *_confusion_markdown(ens["confusion_7way"]["counts"], DISPLAY_CLASSES),
        "",
        *_confusion_markdown(ens["confusion_2way"]["counts"], list(BINARY_CLASSES)),
        "",
        "## Subgroups (ensemble, test split, argmax)",
        "",
        "Accuracy per level against the rest of the test split, as the paper compares lesions with and "
        "without cirrhosis or fatty liver. p chi2 (Yates) is Pearson's chi-square with continuity "
        "correction on the 2x2 table (this reproduces the paper's subgroup p-values); p Fisher is Fisher's "
        "exact test. Size bins follow the paper's cropping rule. Lesions whose level was not recorded "
        "('unknown') are shown but are in no test, nor in another level's rest.",
        *_subgroup_markdown(metrics["subgroups"], confidence),
        "",
        "## Figures",
        "",
        *(f"![{Path(f).stem}]({f})" for f in figures),
        "",
        *missing,
        *saliency,
        *earlier,
        "## Methods",
        "",
        f"Confidence level {confidence:g}. Proportions (accuracy, sensitivity, specificity, "
        "PPV, NPV): modified Wilson interval (Brown, Cai & DasGupta 2001; one-sided Poisson bound when the "
        "count or its complement is at most x*). Likelihood ratios: log method (Simel, Samsa & Matchar 1991); "
        f"'-' marks an undefined bound; a PLR without false positives reads '∞ (-, ∞)'. Every proportion and "
        f"likelihood ratio follows {RULE_NAMES[statistics['interval_rule']]} (config evaluation.interval_rule). AUC: DeLong "
        "variance with a Wald interval clipped to [0, 1], undefined ('-') at an AUC of 0 or 1. Macro F1 and "
        "Cohen's kappa on the seven-way argmax (kappa undefined when only one class occurs); (F1 + kappa)/2 "
        "is the LLD-MMRI challenge score.",
        "",
    ]
    return "\n".join(lines)


def write_figures(frame: pd.DataFrame, metrics: dict, out_dir: Path) -> list[str]:
    """ROC and confusion figures of the test ensemble (and the out-of-fold confusion); the ROC legends'
    AUC intervals at the metrics' confidence level, as in metrics.json."""
    confidence = metrics["statistics"]["confidence"]
    test = frame[frame["split"] == "test"]
    p7, p2 = probabilities(test, ENSEMBLE)
    label7, label2 = test["label7"].to_numpy(int), test["label2"].to_numpy(int)
    paths = [
        plot_roc({"benign vs malignant": (label2 == 1, p2[:, 1])}, "Two-way ROC (test, ensemble)",
                 out_dir / "roc_test_binary.png", confidence=confidence),
        plot_roc({CLASS_NAMES[c]: (label7 == k, p7[:, k]) for k, c in enumerate(CLASSES)},
                 "Seven-way one-vs-rest ROC (test, ensemble)", out_dir / "roc_test_7way.png", confidence=confidence),
        plot_confusion(metrics["test"][ENSEMBLE]["confusion_7way"]["counts"], DISPLAY_CLASSES, "Test", out_dir / "confusion_test_7way.png"),
        plot_confusion(metrics["test"][ENSEMBLE]["confusion_2way"]["counts"], list(BINARY_CLASSES), "Test", out_dir / "confusion_test_2way.png"),
    ]
    if metrics["val"]:
        paths.append(plot_confusion(metrics["val"][ENSEMBLE]["confusion_7way"]["counts"], DISPLAY_CLASSES,
                                    "Validation (out-of-fold)", out_dir / "confusion_val_7way.png"))
    return [str(p.relative_to(out_dir.parent)) for p in paths]


def write_report(workdir: str | Path, models: Path | None = None) -> dict:
    """Read workdir/predictions.csv, config.json and the user's patients.csv if there is one (the
    patients' age and sex, cohort.with_patients); write metrics.json, report.md and figures/.
    `models`: the folder of the fold models that made the predictions (default: the run's own,
    or the trained run an evaluate-only run records).

    Returns the metrics dict (also in metrics.json): metrics['test']['ensemble'] holds the
    headline numbers (accuracy_7way, auc_binary, ...), Table 3 at argmax and at validation
    thresholds, AUCs and confusion matrices; metrics['test'][f'fold{k}'] each fold model on the
    test split; metrics['val'] the out-of-fold validation metrics; metrics['subgroups'];
    metrics['cohort'] the development-against-test table (cohort.cohort_table, the paper's Table 2).
    """
    workdir = Path(workdir)
    frame = with_patients(load_predictions(workdir / "predictions.csv"), workdir / PATIENTS_FILE)
    config = read_config(workdir).to_dict() if (workdir / CONFIG_FILE).exists() else {}
    folds = (config.get("train") or {}).get("folds")
    if folds is not None and model_names(frame) != [f"fold{f}" for f in sorted(folds)]:
        # e.g. a rerun with other folds stopped before its results: the report would name the wrong models
        raise StateFileError(f"{workdir / 'predictions.csv'} holds the predictions of "
                             f"{', '.join(model_names(frame)) or 'no fold model'}, but {CONFIG_FILE} lists folds "
                             f"{folds_text(folds)}; rerun the training command: it writes them again")
    problem = None if folds is None else predictions_problem(workdir, folds, frame)
    if problem:
        raise StateFileError(f"{problem}; rerun the training command: it writes it again from the fold models")
    metrics = evaluate(frame, *evaluation_settings(config))
    metrics = {"data": data_description(config), "run": run_description(config, workdir, models), **metrics}
    metrics = json_safe(metrics)
    figures = write_figures(frame, metrics, workdir / "figures")
    models = current_models(workdir)  # what explain's maps and the hidden-sequence table must have been made with
    earlier = earlier_outputs_markdown(workdir, models)
    if earlier:
        print(f"note: {workdir / 'report.md'} lists outputs in {workdir} that earlier fold models made")
    write_text(workdir / "report.md", report_markdown(metrics, figures, saliency_markdown(workdir, models),
                                                      missing_markdown(metrics, workdir, models), earlier))
    # Last: a run counts as finished once metrics.json exists (workdir.is_finished).
    write_json(workdir / "metrics.json", metrics)
    return metrics
