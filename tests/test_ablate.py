"""Sweeps: point names, running with skip-on-rerun and failure isolation, evaluate-only points, SLURM scripts."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from configs.ablations import attention, base_config, fusions, loso, missing, sequences_and_fusions, single, subsets
from fll_jax.ablation.points import BASE, SweepError, check_points, collect_points, load_sweep
from fll_jax.ablation.runner import PointError, read_sweep, run_point, run_sweep, subprocess_runner
from fll_jax.ablation.slurm import EVAL_SCRIPT, SUBMIT_SCRIPT, TRAIN_SCRIPT, Resources, write_slurm
from fll_jax.code_version import code_version
from fll_jax.config_string import apply_config_string
from fll_jax.constants import SEQUENCES
from fll_jax.files import write_json
from tests.helpers import TRAINED, synthetic_source, tiny_config

REPO = Path(__file__).parent.parent


def test_points_are_named_from_what_differs_from_the_base():
    base = base_config("quick")
    names = [p.name for p in collect_points(loso.sweep, "quick", base)]
    assert names == [BASE] + [f"sequences=all-{s}" for s in SEQUENCES]
    both = collect_points(sequences_and_fusions.sweep, "quick", base)
    # The base is in both sweeps and runs once; 'paper' is the base's own fusion.
    assert [p.name for p in both].count(BASE) == 1 and "fusion=paper" not in [p.name for p in both]
    assert {"sequences=all-pvp-dp", "fusion=attention", "fusion=shared"} <= {p.name for p in both}
    late = next(p for p in both if p.name == "sequences=all-pvp-dp")
    assert late.config.sequences == ("t2w", "dwi", "adc", "t1w", "lap")
    assert [p.name for p in collect_points(fusions.sweep, None, base_config())][1:] == [
        "fusion=concat", "fusion=attention", "fusion=late", "fusion=shared"]
    with pytest.raises(ValueError, match="unknown base"):
        base_config("huge")


def test_the_attention_sweep_sets_the_scoring_width_of_the_attention_fusion():
    points = collect_points(attention.sweep, "quick", base_config("quick"))
    assert [p.name for p in points] == [BASE, "fusion=attention"] + [
        f"attention_hidden={h},fusion=attention" for h in (16, 32, 256, 512)]
    assert [p.config.model.attention_hidden for p in points] == [None, None, 16, 32, 256, 512]
    check_points(points)
    with pytest.raises(ValueError, match=r"^config string item attention_hidden=wide: attention_hidden must be an integer$"):
        apply_config_string(base_config("quick"), "attention_hidden=wide")


def test_evaluate_only_points_follow_the_points_whose_models_they_use():
    points = collect_points(missing.sweep, "quick", base_config("quick"))
    trained = [p for p in points if p.trained is None]
    assert [p.name for p in trained] == [BASE, "sequence_dropout=0.3"]
    hidden = {p.name: p for p in points if p.trained is not None}
    assert hidden["hide=lap"].trained == BASE and hidden["hide=lap"].config.evaluation.hidden_sequences == ("lap",)
    assert hidden["hide=dp,sequence_dropout=0.3"].trained == "sequence_dropout=0.3"
    assert points.index(hidden["hide=t2w"]) > points.index(trained[-1])
    # A hidden point whose trained point the sweep forgot gets it added.
    alone = collect_points(lambda add, arg: add(hide="adc"), None, base_config("quick"))
    assert [(p.name, p.trained) for p in alone] == [(BASE, None), ("hide=adc", BASE)]


def test_sequence_sweeps_vary_the_sequences_of_the_base():
    """A base without ADC (LLD-MMRI's six sequences): no point puts ADC back or hides it."""
    base = base_config("quick")
    base.sequences = tuple(s for s in SEQUENCES if s != "adc")
    for sweep in (loso, missing, single, subsets, sequences_and_fusions):
        for point in collect_points(sweep.sweep, "quick", base):
            assert set(point.config.sequences) <= set(base.sequences), (sweep.__name__, point.name)
    left_out = collect_points(loso.sweep, "quick", base)
    assert [set(base.sequences) - set(p.config.sequences) for p in left_out] == [set()] + [{s} for s in base.sequences]
    # Names say which of all seven a point used, whatever the base.
    assert [p.name for p in left_out][1:3] == ["sequences=all-t2w-adc", "sequences=all-dwi-adc"]
    hidden = [p.config.evaluation.hidden_sequences for p in collect_points(missing.sweep, "quick", base) if p.trained]
    assert hidden == [(s,) for s in base.sequences] * 2
    # A base of one sequence has none to leave out or hide.
    base.sequences = ("dwi",)
    assert [p.name for p in collect_points(loso.sweep, "quick", base)] == [BASE]
    assert [p.name for p in collect_points(missing.sweep, "quick", base)] == [BASE, "sequence_dropout=0.3"]


def test_a_sequence_named_twice_or_a_bad_number_is_refused():
    # A sweep file's mistake is a SweepError (one line from ablate.py) naming the add() call.
    with pytest.raises(SweepError, match=r"^add\(hide=\('lap', 'lap'\)\): .*hide=lap\+lap names lap more than once"):
        collect_points(lambda add, arg: add(hide=("lap", "lap")), None, base_config("quick"))
    with pytest.raises(ValueError, match=r"sequences=t2w\+dwi\+t2w\+dwi names t2w, dwi more than once"):
        apply_config_string(base_config("quick"), "sequences=t2w+dwi+t2w+dwi")
    # A number that is not one is named by its item, not by int()'s message.
    with pytest.raises(ValueError, match=r"^config string item seed=x: seed must be an integer$"):
        apply_config_string(base_config("quick"), "seed=x")
    with pytest.raises(ValueError, match=r"^config string item folds=0\+a: folds must be distinct fold indices joined "):
        apply_config_string(base_config("quick"), "folds=0+a")
    with pytest.raises(ValueError, match=r"^config string item folds=0\+0: folds must be distinct"):
        apply_config_string(base_config("quick"), "folds=0+0")
    # A key set twice had silently taken its last value; folds in another order named another point.
    with pytest.raises(ValueError, match=r"sets train.folds twice \(folds=0 and fold=3\)"):
        apply_config_string(base_config("quick"), "folds=0,fold=3")
    with pytest.raises(ValueError, match=r"sets model.fusion twice"):
        apply_config_string(base_config("quick"), "fusion=attention,fusion=late")
    assert [p.name for p in collect_points(lambda add, arg: (add(folds=(0, 1)), add(folds=(1, 0))), None,
                                           base_config("quick"))] == ["folds=0+1"]


def test_a_bad_ablation_config_is_named(tmp_path):
    with pytest.raises(SweepError, match="no sweep"):
        load_sweep(REPO / "configs" / "quick.py")
    with pytest.raises(ValueError, match="unknown sequence 'lapp'"):
        collect_points(lambda add, arg: add(sequences=["lapp"]), None, base_config("quick"))
    # An empty sweep had run nothing, exited 0, and --emit had written an array of "0--1".
    with pytest.raises(SweepError, match=r"the sweep added no point \(arg 'papr'\)"):
        collect_points(lambda add, arg: None, "papr", base_config("quick"))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A three-point sweep on synthetic lesions: one trains, one fails its config check, one
    evaluates the first's models with DWI hidden; then the same sweep again."""
    source = synthetic_source()
    base = tiny_config(f"folds=0,{TRAINED}")
    base.train.epochs = 1
    base.data.source = "synthetic (tests)"

    def sweep(add, arg):
        add()
        add(fusion="no_such_fusion")
        add(hide="dwi")

    points = collect_points(sweep, None, base)
    root = tmp_path_factory.mktemp("sweep")
    calls = []

    def run(point):
        calls.append(point.name)
        run_point(point, root, source)

    first = run_sweep(points, root, run, lambda config: source.fingerprint)
    second = run_sweep(points, root, run, lambda config: source.fingerprint)
    return root, points, first, second, calls


def test_a_failed_point_is_reported_and_the_others_go_on(ran):
    root, points, first, _, _ = ran
    status = {row["name"]: row for row in first}
    assert [p.name for p in points] == [BASE, "fusion=no_such_fusion", "hide=dwi"]
    assert status[BASE]["status"] == "done" and status["hide=dwi"]["status"] == "done"
    assert status["fusion=no_such_fusion"]["status"] == "failed"
    assert "unknown fusion 'no_such_fusion'" in status["fusion=no_such_fusion"]["error"]
    assert not (root / "fusion=no_such_fusion").exists()  # refused before anything was written


def test_finished_points_are_skipped_on_rerun(ran):
    root, _, _, second, calls = ran
    assert [row["status"] for row in second] == ["finished earlier", "failed", "finished earlier"]
    assert calls == [BASE, "fusion=no_such_fusion", "hide=dwi", "fusion=no_such_fusion"]
    assert [row["status"] for row in read_sweep(root)] == ["finished earlier", "failed", "finished earlier"]


def test_a_second_sweep_on_a_running_sweeps_folder_is_refused_touching_nothing(ran, tmp_path):
    """It had rewritten the running point's log and recorded that point failed in sweep.json."""
    from fll_jax.ablation.runner import run_sweep
    from fll_jax.train.workdir import WorkdirError, hold_run

    root, points, *_ = ran
    copy = tmp_path / "sweep"
    shutil.copytree(root, copy)
    before = {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    ran_points = []
    with hold_run(copy, held_by="an ablate.py running this sweep"):  # the first sweep, still running
        with pytest.raises(WorkdirError, match=r"sweep is in use by another command \(an ablate.py running this "
                                               r"sweep\); nothing was changed.*another --workdir for this sweep"):
            run_sweep(points, copy, ran_points.append, lambda config: {})
    assert not ran_points
    assert {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_the_evaluate_only_point_hides_the_sequence_from_the_trained_models(ran):
    root, *_ = ran
    assert not list((root / "hide=dwi").glob("fold*"))  # no models of its own
    full = pd.read_csv(root / BASE / "predictions.csv").set_index(["split", "lesion_id"])
    hidden = pd.read_csv(root / "hide=dwi" / "predictions.csv").set_index(["split", "lesion_id"])
    assert hidden.index.equals(full.index)
    columns = [c for c in full.columns if c.startswith("ensemble_p7_")]
    assert (hidden[columns] - full[columns]).abs().to_numpy().max() > 1e-4
    assert "hidden from every lesion" in (root / "hide=dwi" / "report.md").read_text()
    assert "Every lesion had all seven sequences (this run hid DWI from every one)." in (
        root / "hide=dwi" / "report.md").read_text()
    # Its first report names the code of the models it evaluated (they are the trained point's).
    trained_by = json.loads((root / BASE / "metrics.json").read_text())["run"]["fold_code"]
    assert json.loads((root / "hide=dwi" / "metrics.json").read_text())["run"]["fold_code"] == trained_by == {
        "fold0": [code_version()]}


def test_an_evaluation_of_other_folds_than_the_trained_runs_results_is_refused(ran, tmp_path):
    """A trained run's results may be of other folds since a rerun (its fold list is no part of its
    fingerprint): a one-fold ensemble compared with its two-fold one would pass the difference
    for the hidden sequence's."""
    from fll_jax.train.cross_validate import evaluate_trained
    from fll_jax.train.workdir import WorkdirError

    root, points, *_ = ran
    shutil.copytree(root / BASE, tmp_path / BASE)
    config = json.loads((tmp_path / BASE / "config.json").read_text())
    write_json(tmp_path / BASE / "config.json", {**config, "train": {**config["train"], "folds": [0, 1]}})
    hide = next(p for p in points if p.name == "hide=dwi")
    with pytest.raises(WorkdirError, match=r"holds results of folds 0\+1, and this evaluation lists folds 0; give it"):
        evaluate_trained(hide.config, tmp_path / "hide", tmp_path / BASE, synthetic_source())
    assert not (tmp_path / "hide").exists()


def test_collecting_records_the_points_tasks_left_so_each_keeps_its_trained_point(ran, tmp_path):
    """What the SLURM comparison job does: no sweep.json (the array tasks write none), so it records
    what each task left; an evaluate-only point keeps its trained point, from its
    evaluated_models.json, with or without sweep.json, and in a moved copy of the sweep."""
    from fll_jax.ablation.runner import not_run
    from fll_jax.evaluation.comparison import load_points

    root, points, *_ = ran
    copy = tmp_path / "sweep"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("sweep.json"))
    assert load_points(copy)[1] == {BASE: None, "hide=dwi": BASE}
    rows = run_sweep(points, copy, not_run, lambda config: synthetic_source().fingerprint)
    assert [row["status"] for row in rows] == ["finished earlier", "failed", "finished earlier"]
    assert "not finished" in rows[1]["error"]
    assert load_points(copy)[1] == {BASE: None, "hide=dwi": BASE}


def test_a_rerun_with_other_settings_is_refused_before_any_point_runs_or_sweep_json_changes(ran, tmp_path):
    root, points, *_ = ran
    copy = shutil.copytree(root, tmp_path / "sweep")
    before = (copy / "sweep.json").read_bytes()
    changed = []
    for point in points:  # as after --config.train.epochs 2 on the command line
        config = point.config.copy_and_resolve_references()
        config.train.epochs = 2
        changed.append(type(point)(point.name, config, point.trained))
    calls = []
    with pytest.raises(SweepError, match=rf"(?s)holds runs of other settings .*\n  {BASE}: setting train.epochs: 1 -> 2"
                                         r"\n  hide=dwi: setting train.epochs: 1 -> 2\nUse another --workdir"):
        run_sweep(changed, copy, calls.append, lambda config: synthetic_source().fingerprint)
    assert calls == [] and (copy / "sweep.json").read_bytes() == before


def test_points_reused_after_the_code_changed_say_so_and_their_comparison_flags_it(ran, tmp_path, monkeypatch):
    """A rerun after a code change had skipped every finished point without a word, and compared
    them with points the new code trained."""
    from fll_jax.ablation.runner import not_run
    from fll_jax.evaluation.comparison import write_comparison

    root, points, *_ = ran
    copy = tmp_path / "sweep"
    shutil.copytree(root, copy)
    monkeypatch.setattr("fll_jax.ablation.runner.code_version", lambda: "fll_jax later")
    rows = run_sweep(points, copy, not_run, lambda config: synthetic_source().fingerprint)
    assert [row.get("note") for row in rows] == [
        f"its models were trained by {code_version()}; this is fll_jax later", None,
        f"its models were trained by {code_version()}; this is fll_jax later"]
    [comparison] = [p for p in write_comparison(copy, resamples=50) if p.suffix == ".md"]
    assert "different versions of the code" not in comparison.read_text()
    # As if hide=dwi had been evaluated again by the later code.
    metrics = json.loads((copy / "hide=dwi" / "metrics.json").read_text())
    metrics["run"]["fold_code"] = {"fold0": ["fll_jax later"]}
    write_json(copy / "hide=dwi" / "metrics.json", metrics)
    [comparison] = [p for p in write_comparison(copy, resamples=50) if p.suffix == ".md"]
    assert (f"trained by different versions of the code**, so a difference may be the code's: `{BASE}` "
            f"{code_version()}; `hide=dwi` fll_jax later.") in comparison.read_text()
    # A point that sweep.json lists as failed, finished since on its own (ablate.py --point): it had
    # been left out of the comparison without a word.
    sweep = json.loads((copy / "sweep.json").read_text())
    sweep["points"][2]["status"] = "failed"
    write_json(copy / "sweep.json", sweep)
    [comparison] = [p for p in write_comparison(copy, resamples=50) if p.suffix == ".md"]
    assert "Left out: `hide=dwi` (failed in sweep.json) holds results" in comparison.read_text()


def test_an_evaluate_only_point_is_evaluated_again_once_its_trained_models_change(ran, tmp_path):
    """The trained point's models changed under the same settings (a fold trained again after a
    lost checkpoint, a --restart): its predictions differ, so the evaluate-only point's results
    are another model's and the sweep evaluates it again instead of reporting it finished."""
    from fll_jax.evaluation.comparison import write_comparison

    root, points, *_ = ran
    copy = tmp_path / "sweep"
    shutil.copytree(root, copy)
    source = synthetic_source()
    predictions = pd.read_csv(copy / BASE / "predictions.csv")
    column = next(c for c in predictions.columns if c.startswith("ensemble_p7_"))
    predictions[column] = predictions[column] * 0.5  # stands in for the retrained models' outputs
    predictions.to_csv(copy / BASE / "predictions.csv", index=False)
    hidden = copy / "hide=dwi"
    evaluated_before = (hidden / "evaluated_models.json").read_text()
    # Compared before it is: the comparison says its difference is not the hidden sequence's alone.
    [comparison] = [p for p in write_comparison(copy, resamples=50) if p.suffix == ".md"]
    assert f"**`hide=dwi` evaluated fold models of `{BASE}` that have changed since**" in comparison.read_text()
    # Its out-of-fold rows meet checkpoints chosen for the base on those lesions: the comparison says so.
    assert ("Evaluate-only points (`hide=dwi`) reuse their trained point's checkpoints, each chosen as its fold's "
            "best on those same validation lesions") in comparison.read_text()

    def run(point):
        run_point(point, copy, source)

    rows = run_sweep(points, copy, run, lambda config: source.fingerprint)
    assert [row["status"] for row in rows] == ["finished earlier", "failed", "done"]
    assert (hidden / "evaluated_models.json").read_text() != evaluated_before
    again = run_sweep(points, copy, run, lambda config: source.fingerprint)
    assert [row["status"] for row in again] == ["finished earlier", "failed", "finished earlier"]


def test_a_point_that_fails_in_its_own_process_is_reported(tmp_path):
    point = collect_points(lambda add, arg: add(), None, base_config("quick"))[0]
    crash = ["-c", "import sys; print('step 1'); print('out of memory', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(PointError, match=r"(?s)exit status 3.*out of memory"):
        subprocess_runner(crash, tmp_path)(point)
    assert "step 1" in (tmp_path / "logs" / "base.log").read_text()


def test_a_sweep_driver_stopped_by_sigterm_lets_its_point_clean_up_and_keeps_its_log(tmp_path):
    point = ("import sys, time\nfrom fll_jax.errors import reported_as\nwith reported_as('point'):\n"
             "    try:\n        print('training', flush=True)\n        time.sleep(120)\n"
             "    finally:\n        print('cleaned up', flush=True)\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "base.log").write_text("the finished run's log\n")
    driver = ("import sys, types\nfrom fll_jax.ablation.runner import subprocess_runner\nfrom fll_jax.errors import "
              "reported_as\nwith reported_as('ablate'):\n"
              f"    subprocess_runner(['-c', {point!r}], sys.argv[1])(types.SimpleNamespace(name='base'))\n")
    process = subprocess.Popen([sys.executable, "-c", driver, str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "logs" / "base.log"
    while "\ntraining\n" not in log.read_text():  # the line the point prints, not its code in the header
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    process.terminate()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1 and "ablate: stopped by SIGTERM" in stderr
    # The point ended through its own cleanup, not SIGKILL; the earlier log is kept, the attempt appended.
    text = log.read_text()
    assert text.startswith("the finished run's log\n--- ") and "--point=base\n" in text
    assert text.endswith("\ntraining\ncleaned up\npoint: stopped by SIGTERM; rerun the same command to go on\n")


def test_the_slurm_scripts_run_one_multi_host_task_per_point(tmp_path):
    points = collect_points(missing.sweep, "quick", base_config("quick"))
    command = ["python", "experiments/ablate.py", "--config=configs/ablations/missing.py:quick",
               f"--workdir={tmp_path}", "--reference=sequence_dropout=0.3"]
    resources = Resources(nodes=2, gpus_per_node=8, time="02:00:00", partition="gpu", parallel=4)
    paths = write_slurm(points, tmp_path, command, resources, REPO)
    assert [p.name for p in paths] == [TRAIN_SCRIPT, EVAL_SCRIPT, SUBMIT_SCRIPT]
    for path in paths:
        subprocess.run(["bash", "-n", str(path)], check=True)
    train = paths[0].read_text()
    options = dict(line[len("#SBATCH --"):].split("=", 1) for line in train.splitlines() if line.startswith("#SBATCH"))
    assert options["array"] == "0-1%4" and options["nodes"] == "2" and options["ntasks-per-node"] == "1"
    assert options["gpus-per-node"] == "8" and options["time"] == "02:00:00" and options["partition"] == "gpu"
    assert "account" not in options
    # The array index picks a point by name, read the way bash reads the script.
    listed = subprocess.run(["bash", "-c", f"eval \"$(sed -n '/^POINTS=(/,/^)/p' {shlex.quote(str(paths[0]))})\"; "
                             "printf '%s\\n' \"${POINTS[@]}\""], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == [BASE, "sequence_dropout=0.3"]
    evaluated = subprocess.run(["bash", "-c", f"eval \"$(sed -n '/^POINTS=(/,/^)/p' {shlex.quote(str(paths[1]))})\"; "
                                "printf '%s\\n' \"${POINTS[@]}\""], capture_output=True, text=True, check=True)
    assert len(evaluated.stdout.split()) == 2 * len(SEQUENCES) and "hide=lap" in evaluated.stdout.split()
    srun = shlex.split(next(line for line in train.splitlines() if line.startswith("srun ")))
    assert srun[1:4] == command[:3] and "--distributed" in srun
    assert srun[-1] == '--point=${POINTS[$SLURM_ARRAY_TASK_ID]}'
    # srun gets the task's cores (Slurm 22.05-23.02 does not pass #SBATCH --cpus-per-task on), and
    # a job without them still runs under set -u.
    lines = train.splitlines()
    [export] = [i for i, line in enumerate(lines) if "SRUN_CPUS_PER_TASK" in line]
    assert lines[export + 1].startswith("srun ")
    for env, cores in (({"SLURM_CPUS_PER_TASK": "8"}, "8"), ({}, "")):
        shown = subprocess.run(["bash", "-c", f'set -euo pipefail; {lines[export]}; echo "${{SRUN_CPUS_PER_TASK:-}}"'],
                               env=env, capture_output=True, text=True, check=True)
        assert shown.stdout.strip() == cores
    submit = paths[2].read_text().splitlines()
    order = [line for line in submit if "sbatch" in line]
    assert "--prepare_only" in order[0] and "afterok:$prepare" in order[1] and TRAIN_SCRIPT in order[1]
    assert "afterany:$last" in order[2] and EVAL_SCRIPT in order[2]
    # The comparison runs ablate.py --collect: sweep.json then pairs every evaluate-only point with
    # its trained point, and the sweep's own --reference holds.
    compare = shlex.split(shlex.split(order[3])[-1].split("=", 1)[1])
    assert "afterany:$last" in order[3] and compare == [*command, "--collect"]
    # submit.sh with a stand-in sbatch that logs its arguments and answers job ids 1, 2, 3, 4.
    fake, log = tmp_path / "bin", tmp_path / "sbatch.log"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\nprintf "%q " "$@" >> "$SBATCH_LOG"\necho >> "$SBATCH_LOG"\n'
                                 'wc -l < "$SBATCH_LOG"\n')
    (fake / "sbatch").chmod(0o755)
    subprocess.run(["bash", str(paths[2])], check=True,
                   env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SBATCH_LOG": str(log)})
    prepare, training, evaluation, comparison = [shlex.split(line) for line in log.read_text().splitlines()]
    # A failed preparation cancels both arrays instead of leaving them and the comparison pending forever...
    assert {"--kill-on-invalid-dep=yes", "--dependency=afterok:1"} <= set(training)
    assert {"--kill-on-invalid-dep=yes", "--dependency=afterany:2,afterok:1"} <= set(evaluation)
    # ...and the comparison, after them whatever their end, records it in sweep.json.
    assert [a for a in comparison if a.startswith("--dependency")] == ["--dependency=afterany:3"]
    assert not any(a.startswith("--dependency") for a in prepare)
    # The host jobs carry the arrays' partition (a cluster may require it), time and memory, no GPUs.
    for job in (prepare, comparison):
        assert {"--partition=gpu", "--time=02:00:00", "--mem=64G", "--cpus-per-task=8"} <= set(job)
        assert not any("gpus" in a for a in job)
    assert not any("sbatch" in line and "ablate_compare" in line
                   for line in write_slurm(points, tmp_path / "nocompare", command, resources, REPO, compare=False)[-1]
                   .read_text().splitlines())


def test_slurm_points_are_checked_on_the_jobs_devices_before_any_script_is_written():
    points = collect_points(loso.sweep, "paper", base_config("paper"))
    check_points(points, num_devices=16)
    check_points(points, num_devices=0)  # --slurm_gpus_per_node=0: CPU tasks
    # Batches of 32 do not split over 3 GPUs: every point would fail after its queue wait.
    with pytest.raises(SweepError) as error:
        check_points(points, num_devices=3)
    lines = str(error.value).splitlines()
    assert lines[0] == "point base: invalid config:" and len([x for x in lines if x.startswith("point ")]) == len(points)
    assert "train.batch_size = 32: must divide evenly over the 3 devices" in lines


def test_ablate_writes_slurm_scripts_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "experiments/ablate.py", "--config=configs/ablations/loso.py:paper",
                             f"--workdir={tmp_path}", "--emit", "slurm", "--slurm_nodes=4"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    train = (tmp_path / TRAIN_SCRIPT).read_text()
    assert "#SBATCH --array=0-7" in train and "#SBATCH --nodes=4" in train
    srun = shlex.split(next(line for line in train.splitlines() if line.startswith("srun ")))
    # The mode flags are not passed on to the tasks; the sweep's own are.
    assert "--emit" not in srun and "slurm" not in srun and not any(a.startswith("--slurm") for a in srun)
    assert f"--workdir={tmp_path}" in srun and not (tmp_path / EVAL_SCRIPT).exists()


def test_a_sweep_of_a_bad_base_config_is_refused_before_its_folder_is_made(tmp_path):
    result = subprocess.run([sys.executable, "experiments/ablate.py", "--config=configs/ablations/fusions.py:quick",
                             "--config.train.epochs=0", f"--config.data.root={tmp_path / 'data'}",
                             f"--workdir={tmp_path / 'sweep'}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "ablate: point base: invalid config:\ntrain.epochs = 0: must be an integer >= 1" in result.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "data").exists()
    # Checked on the devices the points will have (the suite's four), not one.
    result = subprocess.run([sys.executable, "experiments/ablate.py", "--config=configs/ablations/fusions.py:quick",
                             "--config.train.batch_size=6", f"--config.data.root={tmp_path / 'data'}",
                             f"--workdir={tmp_path / 'sweep'}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "train.batch_size = 6: must divide evenly over the 4 devices" in result.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "data").exists()


def test_an_evaluate_only_point_needs_its_finished_trained_point(ran, tmp_path):
    from fll_jax.train.workdir import WorkdirError

    root, points, *_ = ran
    source = synthetic_source()
    hidden = points[-1]
    with pytest.raises(WorkdirError, match="holds no run"):
        run_point(hidden, tmp_path, source)
    other = hidden.config.copy_and_resolve_references()
    other.train.epochs = 3
    with pytest.raises(WorkdirError, match=r"(?s)other settings.*train.epochs: 1 -> 3"):
        run_point(type(hidden)(hidden.name, other, hidden.trained), root, source)
    assert not (tmp_path / hidden.name).exists()
    # A trained point of other settings: the remedy is ablate.py's, which has no --restart.
    with pytest.raises(WorkdirError, match=r"(?s)train.epochs: 1 -> 3.*delete .*/base and rerun the sweep") as refused:
        run_point(type(points[0])(points[0].name, other), root, source)
    assert "--restart" not in str(refused.value)
    # A trained point whose fold is being trained again (its done.json not written yet) lends no models.
    copy = shutil.copytree(root, tmp_path / "copy")
    (copy / BASE / "fold0" / "done.json").unlink()
    with pytest.raises(WorkdirError, match=r"unfinished run \(fold\(s\) 0 not finished\)"):
        run_point(hidden, copy, source)


def test_a_point_without_its_fold_models_or_with_other_report_settings_is_not_finished(ran, tmp_path):
    """A damaged checkpoint's remedy (delete the fold folder, rerun) trains the fold again; new
    interval settings rewrite the point's report instead of keeping the earlier one."""
    from fll_jax.ablation.runner import point_finished

    root, points, *_ = ran
    fingerprint = synthetic_source().fingerprint
    copy = shutil.copytree(root, tmp_path / "copy")
    base, hidden = points[0], points[-1]
    assert point_finished(base, copy, fingerprint) and point_finished(hidden, copy, fingerprint)
    at_90 = base.config.copy_and_resolve_references()
    at_90.evaluation.confidence = 0.9
    assert not point_finished(type(base)(base.name, at_90), copy, fingerprint)
    # Nor once a rerun at 0.9 has rewritten config.json and was stopped before the report: the
    # report's own metrics.json says it was made at 0.95.
    write_json(copy / BASE / "config.json", json.loads(at_90.to_json()))
    assert not point_finished(type(base)(base.name, at_90), copy, fingerprint)
    shutil.rmtree(copy / BASE / "fold0")
    assert not point_finished(base, copy, fingerprint)
    assert point_finished(hidden, copy, fingerprint)  # an evaluate-only point has no fold folders of its own
