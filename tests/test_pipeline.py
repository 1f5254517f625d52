"""Records and input pipeline: every lesion once in evaluation, seeded shuffles, folds from the caller,
reuse of intact records and rebuilding of damaged ones."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from fll_jax.data.digests import FileDigests
from fll_jax.data.folds import assign_folds, check_folds
from fll_jax.data.manifest import read_manifest
from fll_jax.data.pipeline import NumpySource
from fll_jax.data.preprocess import preprocess_manifest
from tests.lesion_files import write_dataset

SIZE, FOLDS, SEED = 16, 3, 0


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    records = read_manifest(write_dataset(tmp_path_factory.mktemp("lesions")))
    # One lesion lacks ADC: the sources must carry which sequences each lesion has.
    lacking = records[1]
    records[1] = dataclasses.replace(lacking, images={s: p for s, p in lacking.images.items() if s != "adc"},
                                     masks={s: p for s, p in lacking.masks.items() if s != "adc"})
    return records


@pytest.fixture(scope="module")
def fold_of(records):
    folds = assign_folds([r.patient_id for r in records], [r.label for r in records], [r.split for r in records],
                         num_folds=FOLDS, seed=SEED)
    return {r.lesion_id: int(f) for r, f in zip(records, folds)}


@pytest.fixture(scope="module")
def patches(records):
    return preprocess_manifest(records, size=SIZE, workers=1)


@pytest.fixture(scope="module")
def records_dir(records, tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    from fll_jax.data.records import build_records

    folder = tmp_path_factory.mktemp("records")
    return build_records(records, folder / "key", FileDigests(folder / "digests.json"), size=SIZE, workers=2)


def folds_of(patches, fold_of):
    return np.array([fold_of[lesion] for lesion in patches.lesion_id.tolist()])


@pytest.fixture(params=["numpy", "tfds"])
def source(request, patches, fold_of):
    if request.param == "numpy":
        return NumpySource(patches, fold_of)
    from fll_jax.data.pipeline import TFDSSource

    return TFDSSource(request.getfixturevalue("records_dir"), fold_of)


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
def test_eval_pass_sees_every_lesion_once(source, patches, fold_of, folds):
    fold = folds_of(patches, fold_of)
    rows = fold == -1 if folds == "test" else np.isin(fold, folds)
    wanted = patches.lesion_id[rows]
    ids = eval_pass(source, folds, batch_size=4)
    assert len(ids) == len(set(ids)) == len(wanted) == source.num_examples(folds)
    assert set(ids) == set(wanted)
    assert eval_pass(source, folds, batch_size=4) == ids  # fixed order


def test_process_shares_partition_every_global_batch(source):
    whole = list(source.train_batches([0, 1], 4, seed=3, epoch=1))
    shares = [list(source.train_batches([0, 1], 4, seed=3, epoch=1, share=(k, 2))) for k in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(whole)
    for i, batch in enumerate(whole):
        # Process 0 reads the first half of each global batch, process 1 the second, nothing more.
        assert shares[0][i]["lesion_id"].tolist() + shares[1][i]["lesion_id"].tolist() == batch["lesion_id"].tolist()
        np.testing.assert_array_equal(shares[1][i]["image"], batch["image"][2:])
    with pytest.raises(ValueError, match="cannot be split into 3 equal process shares"):
        next(source.train_batches([0, 1], 4, seed=3, epoch=1, share=(0, 3)))


def test_train_batches_are_seeded_by_seed_and_epoch(source, patches, fold_of):
    train = [0, 1]
    fold = folds_of(patches, fold_of)
    n, batch_size = int(np.isin(fold, train).sum()), 4

    def epoch(seed, e):
        batches = list(source.train_batches(train, batch_size, seed=seed, epoch=e))
        assert all(b["valid"].all() and len(b["lesion_id"]) == batch_size for b in batches)
        return [i for b in batches for i in b["lesion_id"].tolist()]

    first = epoch(7, 0)
    assert len(first) == n // batch_size * batch_size  # the remainder is dropped
    assert len(set(first)) == len(first)
    assert set(first) <= set(patches.lesion_id[np.isin(fold, train)])
    assert epoch(7, 0) == first
    assert epoch(7, 1) != first
    assert epoch(8, 0) != first


def test_records_hold_the_preprocessed_patches_and_the_given_folds(records_dir, patches, fold_of):
    from fll_jax.data.pipeline import TFDSSource

    source = TFDSSource(records_dir, fold_of)
    row_of = {lesion: i for i, lesion in enumerate(patches.lesion_id)}
    seen = {}
    for folds in ([0, 1, 2], "test"):
        for batch in source.eval_batches(folds, batch_size=5):
            for j in np.flatnonzero(batch["valid"]):
                i = row_of[batch["lesion_id"][j]]
                np.testing.assert_array_equal(batch["image"][j], patches.image[i])
                np.testing.assert_array_equal(batch["mask"][j], patches.mask[i])
                np.testing.assert_array_equal(batch["patch_affine"][j], patches.patch_affine[i])
                np.testing.assert_array_equal(batch["present"][j], patches.present[i])
                assert batch["label7"][j] == patches.label7[i] and batch["label2"][j] == patches.label2[i]
                assert batch["patient_id"][j] == patches.patient_id[i]
                assert batch["fold"][j] == fold_of[batch["lesion_id"][j]]
                seen[batch["lesion_id"][j]] = (batch["patient_id"][j], batch["fold"][j])
    assert len(seen) == len(patches)
    assert patches.present.sum() == 7 * len(patches) - 1 and not patches.present[1, 2]
    patient_ids, folds = zip(*seen.values())
    check_folds(patient_ids, folds)  # no patient in two folds, none in dev and test
    # Other folds over the same records: nothing is rebuilt, the batches follow the new folds.
    moved = {lesion: (0 if fold == 1 else 1 if fold == 0 else fold) for lesion, fold in fold_of.items()}
    swapped = TFDSSource(records_dir, moved)
    ids = [i for b in swapped.eval_batches([0], 4) for i in b["lesion_id"][b["valid"]]]
    assert sorted(ids) == sorted(k for k, f in fold_of.items() if f == 1)


def test_intact_records_are_reused_and_damaged_ones_rebuilt(records, records_dir, monkeypatch, capsys):
    from fll_jax.data import preprocess
    from fll_jax.data.records import build_records

    folder = records_dir.parents[1]
    digests = FileDigests(folder.parent / "digests.json")
    shards = sorted(records_dir.glob("*.tfrecord*"))
    before = {p.name: p.read_bytes() for p in shards}
    real = preprocess.preprocess_manifest
    monkeypatch.setattr(preprocess, "preprocess_manifest", lambda *a, **k: pytest.fail("rebuilt"))
    assert build_records(records, folder, digests, size=SIZE) == records_dir
    # A truncated shard is found by its digest, reported, and built again from the images.
    shards[0].write_bytes(before[shards[0].name][: len(before[shards[0].name]) // 2])
    monkeypatch.setattr(preprocess, "preprocess_manifest", real)
    assert build_records(records, folder, digests, size=SIZE, workers=1) == records_dir
    out = capsys.readouterr().out
    assert "rebuilding the records" in out and f"missing or changed: {shards[0].name}" in out
    assert {p.name: p.read_bytes() for p in sorted(records_dir.glob("*.tfrecord*"))} == before
    # A build stopped half-way leaves no folder under the records' name, where another run sharing
    # the data folder would take it for damaged and delete it under the build.
    monkeypatch.setattr(preprocess, "preprocess_manifest", lambda *a, **k: _stopped())
    with pytest.raises(KeyboardInterrupt):
        build_records(records, folder.parent / "other", digests, size=SIZE)
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(("other", ".other"))] == []


def _stopped():
    raise KeyboardInterrupt


def test_tensorflow_sees_no_gpu(records_dir):
    from fll_jax.data import records

    assert records.tf.config.get_visible_devices("GPU") == []


def test_bad_requests_raise(patches, fold_of):
    source = NumpySource(patches, fold_of)
    with pytest.raises(ValueError, match=r"fold\(s\) \[7\] not in the data"):
        source.num_examples([7])
    with pytest.raises(ValueError, match="cannot fill one batch"):
        next(source.train_batches([0], batch_size=1000, seed=0, epoch=0))
    with pytest.raises(ValueError, match="'test'"):
        source.num_examples("val")


def test_numpy_source_works_without_tensorflow(patches, fold_of, tmp_path):
    path = patches.save_npz(tmp_path / "patches.npz")
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
        "from fll_jax.data.patchset import PatchSet\n"
        "from fll_jax.data.pipeline import NumpySource\n"
        f"source = NumpySource(PatchSet.load_npz({str(path)!r}), {fold_of!r})\n"
        "ids = [i for b in source.eval_batches([0, 1, 2], 4) for i in b['lesion_id'][b['valid']]]\n"
        f"assert len(ids) == len(set(ids)) == {sum(f >= 0 for f in fold_of.values())}, ids\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
