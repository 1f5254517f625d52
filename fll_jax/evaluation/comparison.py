"""A sweep's points against a reference on the same lesions: table (Markdown and CSV) and forest plot.

For the test split (the fold models' ensemble) and the out-of-fold validation rows (each lesion
scored by the model that did not train on it), every point gets its accuracy (modified Wilson CI)
and AUC (DeLong CI), and its difference from its reference: McNemar's exact test on the correct
calls, DeLong's paired test on the AUCs, paired bootstrap intervals of both differences, all
three with each patient as one unit (lesions, and said so, where predictions.csv has no patient
ids), and Holm's correction across the sweep's points. Points that differ only in the seed also get the spread
over seeds. Intervals are at the confidence level, and accuracies' intervals under the interval
rule, that the points' own reports use (evaluation.confidence and evaluation.interval_rule in
their config.json; 0.95 and 'bcd' where none has one).

Two tasks: 'main' (seven-way accuracy, binary-head AUC: the paper's headline numbers) or a pair of
classes such as hcc:fnh (accuracy of calling the larger of the two class probabilities on lesions
of those classes, and the AUC of the first class's share of the two).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fll_jax.ablation.points import BASE
from fll_jax.ablation.runner import read_sweep
from fll_jax.constants import CLASS_NAMES, CLASSES, class_index, to_binary
from fll_jax.evaluation.discrimination import delong_auc, delong_paired, rank_auc
from fll_jax.evaluation.paired import LESIONS, PATIENTS, bootstrap_clusters, holm, mcnemar_exact, paired_bootstrap
from fll_jax.evaluation.predictions import (
    ENSEMBLE, check_patient_ids, load_predictions, probabilities,
)
from fll_jax.evaluation.report import evaluation_settings
from fll_jax.evaluation.stats import RULE_NAMES, ci_label, proportion
from fll_jax.files import read_json, save_figure, write_csv, write_text
from fll_jax.train.workdir import (
    CONFIG_FILE, EVALUATED_FILE, FINGERPRINT_FILE, evaluated_current, read_config, trained_code,
)

SPLITS = {"test": "test split (ensemble)", "val": "out-of-fold (validation rows)"}
FINISHED = ("done", "finished earlier")
RESAMPLES = 2000  # paired bootstrap resamples of the patients


class ComparisonError(ValueError):
    """Points that cannot be compared; the message names them and the problem."""


@dataclass(frozen=True)
class Task:
    """What is compared: 'main', or a pair of classes (first, second)."""

    pair: tuple[int, int] | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Task":
        """None or 'main' -> the main task; 'hcc:fnh' -> that pair (names as fll_jax.constants)."""
        if not text or text == "main":
            return cls()
        names = text.split(":")
        if len(names) != 2 or names[0] == names[1]:
            raise ComparisonError(f"a class pair is two different classes as 'first:second', not {text!r}")
        try:
            return cls((class_index(names[0]), class_index(names[1])))
        except ValueError as error:
            raise ComparisonError(f"class pair {text!r}: {error}") from None

    @property
    def name(self) -> str:
        return "main" if self.pair is None else f"{CLASSES[self.pair[0]]}-{CLASSES[self.pair[1]]}"

    @property
    def title(self) -> str:
        if self.pair is None:
            return "seven-way accuracy, benign/malignant AUC"
        first, second = (CLASS_NAMES[CLASSES[k]] for k in self.pair)
        return f"{first} against {second} (lesions of the two classes; AUC of P({first}) / (P({first}) + P({second})))"

    @property
    def metric_names(self) -> tuple[str, str]:
        return ("ACC 7-way", "AUC 2-way") if self.pair is None else ("ACC pair", "AUC pair")

    def rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame if self.pair is None else frame[frame["label7"].isin(self.pair)]

    def outcomes(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(correct call [N] bool, AUC truth [N] bool, AUC score [N]) of the ensemble columns."""
        p7, p2 = probabilities(frame, ENSEMBLE)
        label7 = frame["label7"].to_numpy()
        if self.pair is None:
            return p7.argmax(1) == label7, to_binary(label7) == 1, p2[:, 1]
        first, second = self.pair
        share = p7[:, first] / np.maximum(p7[:, first] + p7[:, second], 1e-12)
        truth = label7 == first
        return (share >= 0.5) == truth, truth, share


def _trained_point(root: Path, name: str) -> str | None:
    """The sweep point whose fold models the evaluate-only point `name` evaluated, as its
    evaluated_models.json records them (by name: the sweep may have moved since); None for a
    point with models of its own."""
    path = root / name / EVALUATED_FILE
    if not path.exists():
        return None
    trained = Path(read_json(path, f"delete {root / name} and rerun the sweep: the point is evaluated again")["trained"])
    return trained.name if (root / trained.name).is_dir() else str(trained)


def load_points(root: str | Path) -> tuple[dict[str, pd.DataFrame], dict[str, str | None]]:
    """({name: predictions}, {name: trained point or None}) of a sweep's finished points: those
    sweep.json lists as finished, else (points run one by one with --point) every subfolder
    holding predictions.csv. An evaluate-only point's trained point is the one its
    evaluated_models.json names. A file whose patient ids are missing on some rows only is
    refused, naming them."""
    root = Path(root)
    if (root / FINGERPRINT_FILE).exists():
        raise ComparisonError(f"{root} is a cross-validation run, not a sweep: give the folder of a sweep's points "
                              "(ablate.py's --workdir)")
    rows = read_sweep(root)
    if rows:
        names = [r["name"] for r in rows if r["status"] in FINISHED]
        if not names:
            statuses = ", ".join(f"{r['name']} {r['status']}" for r in rows)
            raise ComparisonError(f"{root}: sweep.json lists no finished point ({statuses}); rerun the sweep")
    else:
        names = [p.parent.name for p in sorted(root.glob("*/predictions.csv"))]
        if not names:
            raise ComparisonError(f"{root}: no finished point (no sweep.json, no */predictions.csv)")
    points = {name: load_predictions(root / name / "predictions.csv") for name in names}
    for name, frame in points.items():
        check_patient_ids(frame, root / name / "predictions.csv")
    return points, {name: _trained_point(root, name) for name in names}


def sweep_notes(root: Path, names) -> list[str]:
    """What a reader of the comparison must know first: evaluate-only points whose trained point's
    models changed since, that evaluate-only points' out-of-fold rows favour their trained point,
    points whose models different versions of the code trained, and folders of finished results
    that sweep.json does not count."""
    notes = []
    for name in names:
        trained = _trained_point(root, name)
        if trained is not None and not evaluated_current(root / name, root / trained):
            notes.append(f"**`{name}` evaluated fold models of `{trained}` that have changed since** (trained again, "
                         "or other folds): its difference from them is not its setting's alone. Rerun ablate.py: it "
                         "evaluates the point again.")
    evaluated = [name for name in names if _trained_point(root, name) is not None]
    if evaluated:
        notes.append("Evaluate-only points (" + ", ".join(f"`{name}`" for name in evaluated) + ") reuse their trained "
                     "point's checkpoints, each chosen as its fold's best on those same validation lesions with "
                     "nothing hidden: on the out-of-fold rows that choice favours the trained point, so part of "
                     "their difference there is selection. Their test rows are free of it.")
    code = {name: trained_code(root / name) for name in names if (root / name / "metrics.json").exists()}
    if len({version for versions in code.values() for version in versions}) > 1:
        notes.append("**The points' models were trained by different versions of the code**, so a difference may "
                     "be the code's: " + "; ".join(f"`{name}` {', '.join(versions)}" for name, versions in code.items())
                     + ". Delete the older points' folders and rerun the sweep to train them with one.")
    listed = {row["name"]: row["status"] for row in read_sweep(root)}
    # Without sweep.json every folder of results is a point (load_points): none is left out.
    left_out = [p.parent.name for p in sorted(root.glob("*/metrics.json"))
                if listed and p.parent.name not in names and (p.parent / "predictions.csv").exists()]
    if left_out:
        notes.append("Left out: " + ", ".join(f"`{name}` ({listed.get(name, 'not in the sweep')} in sweep.json)"
                                            for name in left_out)
                     + f" {'holds' if len(left_out) == 1 else 'hold'} results that sweep.json does not count as "
                     "finished (run alone with --point since?). Rerun ablate.py: it records them, skipping what is "
                     "finished.")
    return notes


def sweep_statistics(root: str | Path, names) -> tuple[float, str]:
    """(confidence, interval rule) of the points' intervals: evaluation.confidence and
    evaluation.interval_rule in their config.json, as their reports use them; 0.95 and 'bcd' where
    no point has a config.json. ComparisonError if points disagree."""
    settings = {name: evaluation_settings(read_config(Path(root) / name).to_dict())
                for name in names if (Path(root) / name / CONFIG_FILE).exists()}
    for index, field in enumerate(("confidence", "interval_rule")):
        values = {name: setting[index] for name, setting in settings.items()}
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{name!r} {value}" for name, value in values.items())
            raise ComparisonError(f"{root}: the points' reports use different evaluation.{field} ({listed}); "
                                  f"compare points of one evaluation.{field}")
    return next(iter(settings.values()), (0.95, "bcd"))


def _split(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    return frame[frame["split"] == split].set_index("lesion_id").sort_index()


def _shared_folds(point: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Out-of-fold rows of the folds both points validated, and those folds ('' when they are the
    same folds: a folds= point validates fewer than the base). Test rows pass as they are."""
    folds = set(point["fold"]) & set(reference["fold"])
    if folds == set(point["fold"]) == set(reference["fold"]):
        return point, reference, ""
    return (point[point["fold"].isin(folds)], reference[reference["fold"].isin(folds)],
            "+".join(str(int(f)) for f in sorted(folds)) or "none")


def _paired(point: pd.DataFrame, reference: pd.DataFrame, names: tuple[str, str], split: str) -> None:
    """ComparisonError unless both hold the same lesions with the same labels."""
    if not point.index.equals(reference.index):
        raise ComparisonError(f"points {names[0]!r} and {names[1]!r} hold different {split} lesions "
                              f"({len(point)} against {len(reference)}): were they run on the same data?")
    if not (point["label7"] == reference["label7"]).all():
        raise ComparisonError(f"points {names[0]!r} and {names[1]!r} disagree on {split} labels")


def _point_metrics(frame: pd.DataFrame, task: Task, confidence: float, rule: str) -> dict:
    correct, truth, score = task.outcomes(frame)
    acc, acc_lo, acc_hi = proportion(int(correct.sum()), len(correct), confidence, rule)
    auc = delong_auc(truth, score, confidence)
    return {"n": len(correct), "acc": acc, "acc_lo": acc_lo, "acc_hi": acc_hi,
            "auc": auc["auc"], "auc_lo": auc["lower"], "auc_hi": auc["upper"]}


def _clusters(frame: pd.DataFrame, name: str, split: str) -> tuple[np.ndarray, str]:
    """Each lesion's bootstrap cluster and their kind (paired.bootstrap_clusters)."""
    try:
        return bootstrap_clusters(frame)
    except ValueError as error:
        raise ComparisonError(f"point {name!r}: {split} {error}") from None


def _difference(frame: pd.DataFrame, reference: pd.DataFrame, task: Task, seed: int, resamples: int,
                clusters: tuple[np.ndarray, str], confidence: float) -> dict:
    correct, truth, score = task.outcomes(frame)
    ref_correct, _, ref_score = task.outcomes(reference)
    if not len(correct):  # no lesion of the task in this split: nothing to test, nor to count in Holm's correction
        return {k: None for k in ("d_acc", "d_acc_lo", "d_acc_hi", "only_point", "only_reference", "mcnemar_p",
                                  "d_auc", "d_auc_lo", "d_auc_hi", "delong_p")} | {"bootstrap_unit": clusters[1]}
    groups, unit = clusters
    mc = mcnemar_exact(correct, ref_correct, groups)
    dl = delong_paired(truth, score, ref_score, clusters=groups)

    def d_acc(rows: np.ndarray) -> float:
        return float(np.mean(correct[rows]) - np.mean(ref_correct[rows]))

    def d_auc(rows: np.ndarray) -> float:
        # Defined where DeLong's difference is: at least two lesions of each class.
        positives = int(np.sum(truth[rows]))
        if min(positives, len(rows) - positives) < 2:
            return math.nan
        a = rank_auc(truth[rows], score[rows])
        b = rank_auc(truth[rows], ref_score[rows])
        return math.nan if a is None or b is None else a - b

    acc_ci = paired_bootstrap(d_acc, groups, confidence, resamples, seed)
    auc_ci = paired_bootstrap(d_auc, groups, confidence, resamples, seed)
    return {
        "d_acc": float(np.mean(correct) - np.mean(ref_correct)), "d_acc_lo": acc_ci[0], "d_acc_hi": acc_ci[1],
        "only_point": mc["a_only"], "only_reference": mc["b_only"], "mcnemar_p": mc["p"],
        "d_auc": dl["difference"], "d_auc_lo": auc_ci[0], "d_auc_hi": auc_ci[1], "delong_p": dl["p"],
        "bootstrap_unit": unit,
    }


def compare(points: dict[str, pd.DataFrame], trained: dict[str, str | None], reference: str | None = None,
            task: Task = Task(), seed: int = 0, resamples: int = RESAMPLES, confidence: float = 0.95,
            rule: str = "bcd") -> pd.DataFrame:
    """One row per point and split: metrics, the paired comparison with its reference, Holm's p.

    A point's reference is `reference` if given, else for an evaluate-only point its trained
    point, else 'base'. Holm's correction runs over the compared points of each split and test.
    The bootstrap draws the point's patients, or its lesions where it has no patient ids
    (column bootstrap_unit: 'patients' or 'lesions'). Intervals are at level `confidence`, the
    accuracy's under the interval rule `rule` (fll_jax.evaluation.stats.RULES).
    """
    if reference is not None and reference not in points:
        raise ComparisonError(f"reference {reference!r} is not a finished point; finished: {', '.join(points)}")
    records = []
    for split in SPLITS:
        for name, frame in points.items():
            ref = reference or trained.get(name) or BASE
            rows = task.rows(_split(frame, split))
            record = {"split": split, "point": name, "reference": ref if ref != name else ""}
            compared, paired = ref != name and ref in points, rows
            if compared:
                paired, ref_rows, folds = _shared_folds(rows, task.rows(_split(points[ref], split)))
                _paired(paired, ref_rows, (name, ref), split)
            # n, ACC and AUC on the lesions the differences are on (the folds both validated)
            record.update(_point_metrics(paired if len(paired) else rows, task, confidence, rule))
            if compared:
                record["paired_folds"] = folds
                if len(paired):
                    record.update(_difference(paired, ref_rows, task, seed, resamples,
                                              _clusters(paired, name, split), confidence))
            records.append(record)
    table = pd.DataFrame.from_records(records)
    if "bootstrap_unit" not in table:
        table["bootstrap_unit"] = None
    for column in ("mcnemar_p", "delong_p"):
        if column not in table:
            table[column] = np.nan
        table[f"{column}_holm"] = np.nan
        for split in SPLITS:
            rows = (table["split"] == split) & table[column].notna()
            table.loc[rows, f"{column}_holm"] = holm(table.loc[rows, column].tolist())
    return table


def seed_spread(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD over seeds of each metric, for points that differ only in 'seed=' (>= 2 seeds)."""
    group = table["point"].map(lambda name: re.sub(r"(^|,)seed=\d+", "", name).strip(",") or BASE)
    records = []
    for (split, name), rows in table.groupby([table["split"], group], sort=False):
        if len(rows) < 2:
            continue
        records.append({"split": split, "setting": name, "seeds": len(rows),
                        "acc_mean": rows["acc"].mean(), "acc_sd": rows["acc"].std(ddof=1),
                        "auc_mean": rows["auc"].mean(), "auc_sd": rows["auc"].std(ddof=1),
                        "acc_ci_width": (rows["acc_hi"] - rows["acc_lo"]).mean()})
    return pd.DataFrame.from_records(records)


def _f(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _ci(row: pd.Series, key: str) -> str:
    return f"{_f(row[key])} ({_f(row[key + '_lo'])}, {_f(row[key + '_hi'])})"


def _p(row: pd.Series, key: str) -> str:
    if not math.isfinite(row.get(key, math.nan)):
        return ""
    holm_p = row[f"{key}_holm"]
    mark = " *" if holm_p < 0.05 else ""
    return f"{_f(row[key])} ({_f(holm_p)}){mark}"


def _bootstrap_note(table: pd.DataFrame, resamples: int) -> str:
    """The unit of the Δ intervals and tests: patients, or lesions one by one for points without patient ids."""
    by_lesion = sorted(set(table.loc[table["bootstrap_unit"] == LESIONS, "point"]))
    by_patient = set(table.loc[table["bootstrap_unit"] == PATIENTS, "point"])
    caveat = ("no patient_id in predictions.csv, so each lesion counts as its own patient; where patients have "
              "several lesions these intervals are too narrow and these p too small")
    if not by_lesion:
        return (f"Δ intervals by a paired bootstrap over patients ({resamples:,} resamples), and the tests below "
                "with each patient as one unit.")
    if not by_patient:
        return f"Δ intervals by a paired bootstrap over lesions ({resamples:,} resamples), tests over lesions: {caveat}."
    points = ", ".join(f"`{name}`" for name in by_lesion)
    return (f"Δ intervals by a paired bootstrap over patients ({resamples:,} resamples), and the tests below "
            f"with each patient as one unit, except over lesions for {points}: {caveat}.")


def comparison_markdown(table: pd.DataFrame, spread: pd.DataFrame, task: Task, sweep: str,
                        resamples: int = RESAMPLES, confidence: float = 0.95, notes: Sequence[str] = (),
                        rule: str = "bcd") -> str:
    """comparison.md; `notes`: paragraphs on what the reader must know first (sweep_notes)."""
    acc, auc = task.metric_names
    lines = [f"# Sweep comparison: {sweep}", "", f"Task: {task.title}.", "",
             "Each point against its reference on the same lesions. Intervals are "
             f"{ci_label(confidence)}s: for accuracy {RULE_NAMES[rule]} (config evaluation.interval_rule), "
             f"DeLong for AUC. {_bootstrap_note(table, resamples)} p: McNemar's exact test (ACC; exact over "
             "sign flips of each patient's discordant lesions) and DeLong's paired test (AUC; Obuchowski's "
             "variance for clustered data), Holm-adjusted over the sweep's points in brackets; * marks Holm p < 0.05. "
             "A point validated on other folds than its reference is compared on the folds both validated, "
             "named beside n; its n, accuracy and AUC are then those of these folds.", ""]
    for note in notes:
        lines += [note, ""]
    unfinished = sorted(set(table["reference"]) - set(table["point"]) - {""})
    if unfinished:
        lines += [f"Not compared: reference(s) {', '.join(f'`{r}`' for r in unfinished)} did not finish "
                  "(failed or not run; see sweep.json), so their points have no differences below.", ""]
    header = ["point", "ref.", "n", acc, f"Δ {acc}", "only point/ref. right", "McNemar p (Holm)", auc, f"Δ {auc}",
              "DeLong p (Holm)"]
    for split, title in SPLITS.items():
        lines += [f"## {title[0].upper()}{title[1:]}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for _, row in table[table["split"] == split].iterrows():
            compared = math.isfinite(row.get("mcnemar_p", math.nan))
            folds = row.get("paired_folds")
            n = f"{row['n']} (folds {folds})" if isinstance(folds, str) and folds else str(row["n"])
            cells = [f"`{row['point']}`", f"`{row['reference']}`" if row["reference"] else "", n,
                     _ci(row, "acc"), _ci(row, "d_acc") if compared else "",
                     f"{int(row['only_point'])}/{int(row['only_reference'])}" if compared else "",
                     _p(row, "mcnemar_p"), _ci(row, "auc"), _ci(row, "d_auc") if compared else "",
                     _p(row, "delong_p")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if len(spread):
        lines += ["## Spread over seeds", "", f"| split | setting | seeds | {acc} mean ± SD | mean CI width | "
                  f"{auc} mean ± SD |", "|---|---|---|---|---|---|"]
        for _, row in spread.iterrows():
            lines.append(f"| {row['split']} | `{row['setting']}` | {row['seeds']} | {_f(row['acc_mean'])} ± "
                         f"{_f(row['acc_sd'])} | {_f(row['acc_ci_width'])} | {_f(row['auc_mean'])} ± {_f(row['auc_sd'])} |")
        lines.append("")
    return "\n".join(lines)


def plot_forest(table: pd.DataFrame, task: Task, path: Path, confidence: float = 0.95) -> Path:
    """Δ accuracy and Δ AUC of every compared point with their bootstrap intervals, test and out-of-fold."""
    compared = table[table["mcnemar_p"].notna()]
    names = list(dict.fromkeys(compared["point"]))
    units = " or ".join(sorted(set(compared["bootstrap_unit"]), reverse=True))
    fig = Figure(figsize=(10, 1.4 + 0.38 * len(names)), layout="constrained")
    for i, (key, label) in enumerate(zip(("d_acc", "d_auc"), task.metric_names)):
        ax = fig.add_subplot(1, 2, i + 1)
        for offset, (split, marker, colour) in zip((-0.15, 0.15), (("test", "o", "C0"), ("val", "s", "C1"))):
            rows = compared[compared["split"] == split].set_index("point").reindex(names)
            y = np.arange(len(names)) + offset
            value = rows[key].to_numpy(float)
            lo = np.nan_to_num(value - rows[f"{key}_lo"].to_numpy(float))
            hi = np.nan_to_num(rows[f"{key}_hi"].to_numpy(float) - value)
            ax.errorbar(value, y, xerr=[lo, hi], fmt=marker, color=colour, ms=4, capsize=2, lw=1,
                        label=SPLITS[split])
        ax.axvline(0, color="0.5", lw=0.8, ls="--")
        ax.set_yticks(range(len(names)), names if i == 0 else [], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel=f"Δ {label} against the reference ({ci_label(confidence)}, paired bootstrap over {units})")
        ax.xaxis.label.set_fontsize(8)
    fig.axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(task.title, fontsize=9)
    return save_figure(fig, path, dpi=120)


def write_comparison(root: str | Path, reference: str | None = None, task: Task = Task(),
                     resamples: int = RESAMPLES) -> list[Path]:
    """comparison[_vs_<reference>][_<pair>].md, .csv and forest[...].png in the sweep's folder, at
    the points' confidence level and interval rule (sweep_statistics); returns their paths. A reference given by name
    has files of its own, so the default comparison stays. The forest plot is left out (and an
    earlier one removed) when no point was paired with its reference."""
    root = Path(root)
    points, trained = load_points(root)
    confidence, rule = sweep_statistics(root, points)
    table = compare(points, trained, reference, task, resamples=resamples, confidence=confidence, rule=rule)
    spread = seed_spread(table)
    suffix = ("" if reference is None else f"_vs_{reference}") + ("" if task.pair is None else f"_{task.name}")
    markdown = comparison_markdown(table, spread, task, root.name, resamples, confidence, sweep_notes(root, points),
                                   rule)
    paths = [write_text(root / f"comparison{suffix}.md", markdown), write_csv(table, root / f"comparison{suffix}.csv")]
    forest = root / f"forest{suffix}.png"
    if table["mcnemar_p"].notna().any():
        paths.append(plot_forest(table, task, forest, confidence))
    else:  # no point paired with its reference: an earlier comparison's plot must not pass for this one's
        forest.unlink(missing_ok=True)
    return paths
