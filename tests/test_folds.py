"""Patient-level folds: no patient in two folds, none in both dev and test, stratified, seeded."""
import numpy as np
import pytest

from configs import quick
from fll_jax.data.folds import TEST_FOLD, FoldError, assign_folds, check_folds, given_folds
from fll_jax.data.manifest import write_manifest
from fll_jax.data.prepare import DataError, check_data, describe_data
from tests.lesion_files import record, voxel_to_world, write_patient

AFFINE = np.diag([2.0, 2.0, 4.0, 1.0])


def cohort(seed=0, patients=60):
    """Lesions of `patients` patients, 1-4 lesions each, one class per patient, 20 % test."""
    rng = np.random.default_rng(seed)
    pid, labels, splits = [], [], []
    for p in range(patients):
        count, label = rng.integers(1, 5), p % 7
        pid += [f"P{p:03d}"] * count
        labels += [label] * count
        splits += ["test" if p % 5 == 4 else "dev"] * count
    return np.array(pid), np.array(labels), np.array(splits)


def test_folds_keep_patients_together_and_hold_out_the_test_split():
    pid, labels, splits = cohort()
    folds = assign_folds(pid, labels, splits, num_folds=5, seed=0)
    assert set(folds[splits == "test"]) == {-1}
    assert set(folds[splits == "dev"]) == {0, 1, 2, 3, 4}
    for patient in np.unique(pid):
        assert len(set(folds[pid == patient])) == 1
    assert not set(pid[folds == -1]) & set(pid[folds >= 0])
    # Stratified: every class with at least five dev patients appears in every fold.
    for label in range(7):
        dev_patients = set(pid[(labels == label) & (splits == "dev")])
        if len(dev_patients) >= 5:
            assert set(folds[(labels == label) & (splits == "dev")]) == {0, 1, 2, 3, 4}
    check_folds(pid, folds, splits)


def test_folds_are_fixed_by_the_seed():
    pid, labels, splits = cohort()
    a = assign_folds(pid, labels, splits, seed=1)
    np.testing.assert_array_equal(a, assign_folds(pid, labels, splits, seed=1))
    assert not np.array_equal(a, assign_folds(pid, labels, splits, seed=2))


def test_check_folds_rejects_leaks():
    pid = np.array(["A", "A", "B", "C"])
    with pytest.raises(FoldError, match="'A' is in folds"):
        check_folds(pid, [0, 1, 1, 2])
    with pytest.raises(FoldError, match="'A' is in both dev and test"):
        check_folds(pid, [0, -1, 1, 2])
    with pytest.raises(FoldError, match="split 'test' but fold 1"):
        check_folds(pid, [0, 0, 1, 2], ["dev", "dev", "test", "dev"])


def test_assign_folds_rejects_bad_splits():
    with pytest.raises(FoldError, match="both dev and test"):
        assign_folds(["A", "A", "B"], [0, 0, 1], ["dev", "test", "dev"], num_folds=2)
    with pytest.raises(FoldError, match="fewer than num_folds"):
        assign_folds(["A", "B"], [0, 1], ["dev", "dev"], num_folds=5)
    with pytest.raises(FoldError, match="unknown split"):
        assign_folds(["A", "B"], [0, 1], ["dev", "train"], num_folds=2)


def test_given_folds_are_checked():
    lesions, patients = ["a1", "a2", "b1", "c1", "d1"], ["a", "a", "b", "c", "d"]
    splits = ["dev", "dev", "dev", "dev", "test"]
    folds = given_folds(lesions, patients, [1, 1, 0, 1, None], splits, num_folds=2)
    assert folds.tolist() == [1, 1, 0, 1, TEST_FOLD]
    with pytest.raises(FoldError, match=r"^lesion 'b1' \(patient 'b'\): a dev lesion with no fold;"):
        given_folds(lesions, patients, [1, 1, None, 1, None], splits, num_folds=2)
    with pytest.raises(FoldError, match=r"^no dev lesion has a fold \(4 dev lesions\)"):
        given_folds(lesions, patients, [None] * 5, splits, num_folds=2)
    with pytest.raises(FoldError, match=r"the manifest's folds are \[0, 1\] but data.num_folds is 3"):
        given_folds(lesions, patients, [1, 1, 0, 1, None], splits, num_folds=3)
    with pytest.raises(FoldError, match="patient 'a' is in folds"):
        given_folds(lesions, patients, [1, 0, 0, 1, None], splits, num_folds=2)


def _dataset(folder, config):
    """Three dev patients and a test one, written with an empty fold column; `config` reads them."""
    records = []
    for p in range(4):
        lesion = (voxel_to_world(AFFINE, (3 + p, 5, 3)), 4.0, 1)  # a 4 mm ball, elsewhere in each patient
        images, masks = write_patient(folder / f"P{p}", (10, 10, 6), AFFINE, [lesion])
        records.append(record(images, masks, patient_id=f"P{p}", lesion_id=f"P{p}_L1", label=p % 2,
                              split="test" if p == 3 else "dev"))
    write_manifest(records, folder / "manifest.csv")
    config.data.source, config.data.manifest = "manifest", str(folder / "manifest.csv")
    config.data.root, config.data.workers = str(folder / "root"), 1
    return folder / "manifest.csv"


def test_the_data_check_lists_the_fold_problems_training_would_meet(tmp_path):
    config = quick.get_config()
    path = _dataset(tmp_path, config)
    config.data.folds, config.data.num_folds, config.train.folds = "manifest", 2, (0, 1)
    # An empty fold column is one problem, not one per lesion.
    assert check_data(config) == [f"{path}: fold column: no dev lesion has a fold (3 dev lesions): the manifest has "
                                  "no fold column, or an empty one; data.folds 'manifest' reads the folds from it"]
    with pytest.raises(DataError, match="no dev lesion has a fold"):
        describe_data(config)
    config.data.folds, config.data.num_folds, config.train.folds = "assigned", 4, (0, 1, 2, 3)
    assert check_data(config) == [f"{path}: folds (data.folds 'assigned'): the dev split has 3 patient(s), "
                                  "fewer than num_folds=4"]
    config.data.num_folds, config.train.folds = 3, (0, 1, 2)
    with pytest.warns(UserWarning, match="not stratified"):
        # Folds of two training lesions cannot fill the quick config's batches of 8: training would refuse them.
        problems = check_data(config)
    assert len(problems) == 3 and all("training lesion(s) cannot fill one batch" in p for p in problems)
    config.train.batch_size = 2
    with pytest.warns(UserWarning, match="not stratified"):
        assert check_data(config) == []


def test_a_manifests_own_folds_left_for_drawn_ones_are_named_in_a_warning(tmp_path):
    import dataclasses
    import warnings

    from fll_jax.data.manifest import read_manifest

    config = quick.get_config()
    path = _dataset(tmp_path, config)
    config.data.num_folds, config.train.folds = 3, (0, 1, 2)
    with warnings.catch_warnings(record=True) as caught:  # no fold column: nothing to leave
        warnings.simplefilter("always")
        describe_data(config)
    assert not [w for w in caught if "fold column" in str(w.message)]
    records = read_manifest(path)
    write_manifest([dataclasses.replace(r, fold=None if r.split == "test" else k) for k, r in enumerate(records)], path)
    with pytest.warns(UserWarning, match=f"{path} gives folds .*data.folds 'manifest'"):
        _, folds, _ = describe_data(config)
    assert sorted(folds) == [TEST_FOLD, 0, 1, 2]  # drawn, as data.folds says
