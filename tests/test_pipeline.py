"""Records and input pipeline: every lesion once in evaluation, seeded shuffles, reuse without overwrite."""
import subprocess
import sys

import numpy as np
import pytest

from fll_jax.data.folds import check_folds
from fll_jax.data.manifest import read_manifest, write_manifest
from fll_jax.data.pipeline import NumpySource, make_source
from fll_jax.data.preprocess import preprocess_manifest
from tests.lesion_files import write_dataset

SIZE, FOLDS, SEED = 16, 3, 0


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("lesions"))


@pytest.fixture(scope="module")
def patches(manifest):
    return preprocess_manifest(read_manifest(manifest), size=SIZE, workers=1, num_folds=FOLDS, seed=SEED)


@pytest.fixture(scope="module")
def records_dir(manifest, tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    from fll_jax.data.records import build_records

    return build_records(manifest, tmp_path_factory.mktemp("records"), num_folds=FOLDS, seed=SEED, workers=2, size=SIZE)


@pytest.fixture(params=["numpy", "tfds"])
def source(request, patches):
    if request.param == "numpy":
        return NumpySource(patches)
    return make_source(request.getfixturevalue("records_dir"))


def eval_pass(source, folds, batch_size):
    """lesion ids of the valid rows, checking batch shapes and padding on the way."""
    ids = []
    for batch in source.eval_batches(folds, batch_size):
        assert batch["image"].shape == (batch_size, 7, SIZE, SIZE, SIZE)
        assert all(len(v) == batch_size for v in batch.values())
        assert not batch["lesion_id"][~batch["valid"]].any()  # padding rows are empty
        assert not batch["image"][~batch["valid"]].any()
        ids += batch["lesion_id"][batch["valid"]].tolist()
    return ids


@pytest.mark.parametrize("folds", [[0], [1, 2], [0, 1, 2], "test"])
def test_eval_pass_sees_every_lesion_once(source, patches, folds):
    rows = patches.fold == -1 if folds == "test" else np.isin(patches.fold, folds)
    wanted = patches.lesion_id[rows]
    ids = eval_pass(source, folds, batch_size=4)
    assert len(ids) == len(set(ids)) == len(wanted) == source.num_examples(folds)
    assert set(ids) == set(wanted)
    assert eval_pass(source, folds, batch_size=4) == ids  # fixed order


def test_train_batches_are_seeded_by_seed_and_epoch(source, patches):
    train = [0, 1]
    n, batch_size = int(np.isin(patches.fold, train).sum()), 4

    def epoch(seed, e):
        batches = list(source.train_batches(train, batch_size, seed=seed, epoch=e))
        assert all(b["valid"].all() and len(b["lesion_id"]) == batch_size for b in batches)
        return [i for b in batches for i in b["lesion_id"].tolist()]

    first = epoch(7, 0)
    assert len(first) == n // batch_size * batch_size  # the remainder is dropped
    assert len(set(first)) == len(first)
    assert set(first) <= set(patches.lesion_id[np.isin(patches.fold, train)])
    assert epoch(7, 0) == first
    assert epoch(7, 1) != first
    assert epoch(8, 0) != first


def test_records_hold_the_preprocessed_patches_and_folds(records_dir, patches):
    from fll_jax.data.records import read_folds

    source = make_source(records_dir)
    row_of = {lesion: i for i, lesion in enumerate(patches.lesion_id)}
    stored = read_folds(records_dir)
    seen = {}
    for folds in ([0, 1, 2], "test"):
        for batch in source.eval_batches(folds, batch_size=5):
            for j in np.flatnonzero(batch["valid"]):
                i = row_of[batch["lesion_id"][j]]
                np.testing.assert_array_equal(batch["image"][j], patches.image[i])
                np.testing.assert_array_equal(batch["mask"][j], patches.mask[i])
                np.testing.assert_array_equal(batch["patch_affine"][j], patches.patch_affine[i])
                assert batch["label7"][j] == patches.label7[i] and batch["label2"][j] == patches.label2[i]
                assert batch["patient_id"][j] == patches.patient_id[i]
                assert batch["fold"][j] == patches.fold[i] == stored["lesions"][batch["lesion_id"][j]]
                seen[batch["lesion_id"][j]] = (batch["patient_id"][j], batch["fold"][j])
    assert len(seen) == len(patches)
    patient_ids, folds = zip(*seen.values())
    check_folds(patient_ids, folds)  # no patient in two folds, none in dev and test
    assert stored["settings"]["num_folds"] == FOLDS and stored["settings"]["seed"] == SEED


def test_records_are_reused_and_never_silently_overwritten(records_dir, manifest, monkeypatch):
    from fll_jax.data import preprocess
    from fll_jax.data.records import RecordsError, build_records

    before = {p.name: p.stat().st_mtime_ns for p in records_dir.iterdir()}
    monkeypatch.setattr(preprocess, "preprocess_manifest", lambda *a, **k: pytest.fail("rebuilt"))
    data_dir = records_dir.parents[1]
    assert build_records(manifest, data_dir, num_folds=FOLDS, seed=SEED, size=SIZE) == records_dir
    with pytest.raises(RecordsError, match="seed: stored 0, asked 1"):
        build_records(manifest, data_dir, num_folds=FOLDS, seed=1, size=SIZE)
    assert {p.name: p.stat().st_mtime_ns for p in records_dir.iterdir()} == before


def test_overwrite_rebuilds(manifest, tmp_path):
    from fll_jax.data.records import build_records, read_folds

    small = tmp_path / "manifest.csv"
    write_manifest([r for r in read_manifest(manifest) if r.split == "dev"][:6], small)
    path = build_records(small, tmp_path / "records", num_folds=2, seed=0, workers=1, size=8)
    assert read_folds(path)["settings"]["seed"] == 0
    assert build_records(small, tmp_path / "records", num_folds=2, seed=1, workers=1, size=8, overwrite=True) == path
    assert read_folds(path)["settings"]["seed"] == 1
    assert make_source(path).num_examples([0, 1]) == 6


def test_tensorflow_sees_no_gpu(records_dir):
    from fll_jax.data import records

    assert records.tf.config.get_visible_devices("GPU") == []


def test_bad_requests_raise(patches):
    source = NumpySource(patches)
    with pytest.raises(ValueError, match=r"fold\(s\) \[7\] not in the data"):
        source.num_examples([7])
    with pytest.raises(ValueError, match="cannot fill one batch"):
        next(source.train_batches([0], batch_size=1000, seed=0, epoch=0))
    with pytest.raises(ValueError, match="'test'"):
        source.num_examples("val")


def test_numpy_source_works_without_tensorflow(patches, tmp_path):
    path = patches.save_npz(tmp_path / "patches.npz")
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
        "from fll_jax.data.pipeline import make_source\n"
        f"source = make_source({str(path)!r})\n"
        "ids = [i for b in source.eval_batches([0, 1, 2], 4) for i in b['lesion_id'][b['valid']]]\n"
        f"assert len(ids) == len(set(ids)) == {int((patches.fold >= 0).sum())}, ids\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
