"""The phantom: class signatures measured in the written NIfTI files, grids, masks, determinism."""
import collections
import filecmp

import nibabel as nib
import numpy as np
import pytest

from fll_jax.constants import CLASSES, SEQUENCES
from fll_jax.data import manifest as mf
from fll_jax.data import phantom

FOV = (110.0, 110.0, 90.0)
SCANNER = "Siemens Prisma"
# One patient per class, typical lesions of moderate size; metastases come three at once.
DIAMETERS = {"cyst": (24.0,), "fnh": (36.0,), "haemangioma": (28.0,), "abscess": (40.0,),
             "hcc": (30.0,), "icc": (40.0,), "metastasis": (28.0, 16.0, 12.0)}
BACKGROUND = {"metastasis": "fatty", "hcc": "cirrhotic"}


def _spec(cls, seed, **kw):
    fields = dict(patient_id=f"{cls}{seed}", label=CLASSES.index(cls), diameters_mm=DIAMETERS[cls],
                  scanner=SCANNER, background=BACKGROUND.get(cls, "normal"), split="dev", fov_mm=FOV,
                  seed=seed, atypical_rate=0.0)
    fields.update(kw)
    return phantom.PatientSpec(**fields)


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """class -> (records, truth) of one generated patient."""
    out = tmp_path_factory.mktemp("phantom")
    return {cls: phantom.generate_patient(_spec(cls, seed=i), out) for i, cls in enumerate(CLASSES)}


def _distance_mm(img, centre):
    """Distance of every voxel centre (world mm, through the affine) to a point."""
    ijk = np.indices(img.shape).reshape(3, -1)
    xyz = img.affine[:3, :3] @ ijk + img.affine[:3, 3:4]
    return np.linalg.norm(xyz - np.asarray(centre)[:, None], axis=0).reshape(img.shape)


def _contrast(patients, cls, seq, lo, hi, stat=np.mean):
    """stat of the lesion voxels between lo*R and hi*R from its centre, over the liver around it."""
    records, truth = patients[cls]
    record, t = records[0], truth[0]
    img = nib.load(record.images[seq])
    data = np.asarray(img.dataobj).astype(float)
    mask = np.asarray(nib.load(record.masks[seq]).dataobj)
    d, r = _distance_mm(img, t["centre_mm"][seq]), t["diameter_mm"] / 2
    lesion = (mask == record.mask_value) & (d >= lo * r) & (d < hi * r)
    liver = (mask == 0) & (d >= 1.25 * r + 3) & (d < 1.25 * r + 11)  # median: robust to vessels
    assert lesion.sum() >= 10 and liver.sum() >= 500
    return stat(data[lesion]) / np.median(data[liver])


CORE, RIM, WHOLE = (0.0, 0.4), (0.75, 1.0), (0.0, 1.0)


def test_cyst(patients):
    assert _contrast(patients, "cyst", "adc", *CORE) > 2.0
    assert _contrast(patients, "cyst", "t2w", *CORE) > 2.0
    assert _contrast(patients, "cyst", "pvp", *WHOLE) < 0.6  # no enhancement


def test_fnh(patients):
    assert _contrast(patients, "fnh", "lap", *WHOLE) > 1.4
    assert 0.75 < _contrast(patients, "fnh", "pvp", *WHOLE) < 1.3  # near iso on the portal phase


def test_haemangioma(patients):
    assert _contrast(patients, "haemangioma", "t2w", *CORE) > 1.8
    assert _contrast(patients, "haemangioma", "lap", *CORE) < 0.7
    # Discontinuous peripheral nodules: a bright minority of the arterial-phase periphery.
    assert _contrast(patients, "haemangioma", "lap", *RIM, stat=lambda x: np.percentile(x, 95)) > 1.3
    assert _contrast(patients, "haemangioma", "pvp", *RIM) > _contrast(patients, "haemangioma", "lap", *RIM)


def test_abscess(patients):
    assert _contrast(patients, "abscess", "adc", *CORE) < 0.85  # restricted diffusion
    assert _contrast(patients, "abscess", "dwi", *CORE) > 1.7
    wall, core = _contrast(patients, "abscess", "lap", *RIM), _contrast(patients, "abscess", "lap", *CORE)
    assert wall > 1.3 and wall > 1.5 * core


def test_hcc(patients):
    assert _contrast(patients, "hcc", "lap", *WHOLE) > 1.4  # arterial hyperenhancement
    assert _contrast(patients, "hcc", "dp", *CORE) < 0.85  # washout
    assert _contrast(patients, "hcc", "dp", 0.85, 1.0) > _contrast(patients, "hcc", "dp", *CORE) + 0.2  # capsule


def test_icc(patients):
    assert _contrast(patients, "icc", "lap", *RIM) > _contrast(patients, "icc", "lap", *CORE) + 0.5
    assert _contrast(patients, "icc", "dp", *CORE) > 1.15  # progressive central enhancement


def test_metastasis(patients):
    assert _contrast(patients, "metastasis", "dwi", *CORE) > 1.4
    rim, centre = _contrast(patients, "metastasis", "lap", *RIM), _contrast(patients, "metastasis", "lap", *CORE)
    assert rim > 1.3 and rim > centre + 0.4


def test_grids_follow_the_scanner(patients):
    scanner = phantom.SCANNER_BY_NAME[SCANNER]
    records, _ = patients["cyst"]
    for s in SEQUENCES:
        img, mask = nib.load(records[0].images[s]), nib.load(records[0].masks[s])
        voxel = scanner.t2_voxel_mm if s in ("t2w", "dwi", "adc") else scanner.t1_voxel_mm
        np.testing.assert_allclose(img.header.get_zooms(), voxel, rtol=1e-5)
        np.testing.assert_allclose(np.sign(np.diag(img.affine)[:2]), scanner.axis_signs)
        np.testing.assert_array_equal(img.affine, mask.affine)
        assert img.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
        assert img.shape == mask.shape == tuple(int(np.ceil(f / v)) for f, v in zip(FOV, voxel))


def test_masks_match_size_and_position(patients):
    for cls, (records, truth) in patients.items():
        for record, t in zip(records, truth):
            expected = np.pi / 6 * t["diameter_mm"] ** 3
            for s in SEQUENCES:
                img = nib.load(record.masks[s])
                lesion = np.asarray(img.dataobj) == record.mask_value
                volume = lesion.sum() * np.prod(img.header.get_zooms())
                assert 0.6 < volume / expected < 1.6, (cls, record.lesion_id, s, volume / expected)
                # The mask's centroid, through the affine, lands on the lesion's world centre.
                ijk = np.argwhere(lesion).mean(0)
                centroid = img.affine[:3, :3] @ ijk + img.affine[:3, 3]
                err = np.abs(centroid - t["centre_mm"][s])
                assert np.all(err < 0.1 * t["diameter_mm"] + np.array(img.header.get_zooms()) / 2), (cls, s, err)


def test_sequences_are_shifted_and_dwi_adc_share_one(patients):
    records, truth = patients["metastasis"]
    centres = {s: np.array(truth[0]["centre_mm"][s]) for s in SEQUENCES}
    shifts = [np.linalg.norm(centres[s] - centres["t1w"]) for s in ("t2w", "dwi", "lap", "pvp", "dp")]
    assert all(0 < x <= 2 * phantom._MAX_SHIFT_MM for x in shifts)
    np.testing.assert_array_equal(centres["dwi"], centres["adc"])
    dwi, adc = (np.asarray(nib.load(records[0].masks[s]).dataobj) for s in ("dwi", "adc"))
    np.testing.assert_array_equal(dwi, adc)
    assert set(np.unique(dwi)) == {0, 1, 2, 3}


def test_same_seed_same_bytes(patients, tmp_path):
    records, _ = patients["cyst"]
    again, _ = phantom.generate_patient(_spec("cyst", seed=0), tmp_path / "again")
    for s in SEQUENCES:
        assert filecmp.cmp(records[0].images[s], again[0].images[s], shallow=False)
        assert filecmp.cmp(records[0].masks[s], again[0].masks[s], shallow=False)
    other, _ = phantom.generate_patient(_spec("cyst", seed=99), tmp_path / "other")
    assert not filecmp.cmp(records[0].images["t2w"], other[0].images["t2w"], shallow=False)


def test_atypical_lesions_borrow_a_confuser(tmp_path):
    _, truth = phantom.generate_patient(_spec("hcc", seed=5, atypical_rate=1.0), tmp_path)
    atypical = truth[0]["atypical"]
    assert 1 <= len(atypical) <= 2 and set(atypical.values()) == {"fnh"}
    for s in SEQUENCES:
        cls = atypical.get(s, "hcc")
        core = truth[0]["values"][s]["core"] / phantom.SIGNATURES[cls][s]["core"]
        assert 1 - phantom.VALUE_SPREAD <= core <= 1 + phantom.VALUE_SPREAD, (s, cls)
    _, typical = phantom.generate_patient(_spec("hcc", seed=5, atypical_rate=0.0), tmp_path)
    assert typical[0]["atypical"] == {}


def test_paper_plan_matches_the_paper():
    specs = phantom.plan_cohort("paper", seed=0)
    assert len(specs) == 445
    lesions = collections.Counter()
    test_lesions = collections.Counter()
    diameters = collections.defaultdict(list)
    for p in specs:
        assert 1 <= len(p.diameters_mm) <= 6
        lesions[CLASSES[p.label]] += len(p.diameters_mm)
        test_lesions[CLASSES[p.label]] += len(p.diameters_mm) * (p.split == "test")
        diameters[CLASSES[p.label]].extend(p.diameters_mm)
    assert dict(lesions) == {"cyst": 86, "fnh": 57, "haemangioma": 101, "abscess": 88, "hcc": 78,
                             "icc": 70, "metastasis": 77}
    for cls, n in lesions.items():  # 80/20 by patient, stratified by class
        assert 0.15 <= test_lesions[cls] / n <= 0.25, cls
        assert abs(np.median(diameters[cls]) / phantom.SHAPES[cls].median_mm - 1) < 0.25, cls
    assert 0.17 <= sum(p.split == "test" for p in specs) / len(specs) <= 0.23
    assert len({p.patient_id for p in specs}) == 445
    assert phantom.plan_cohort("paper", seed=0) == specs and phantom.plan_cohort("paper", seed=1) != specs


def test_quick_plan():
    specs = phantom.plan_cohort("quick", seed=0)
    per_class = collections.Counter()
    for p in specs:
        per_class[p.label] += len(p.diameters_mm)
        assert max(p.diameters_mm) <= phantom.SCALES["quick"].max_diameter_mm
    assert set(per_class.values()) == {14}
    assert {p.split for p in specs} == {"dev", "test"}


def test_generate_phantom_writes_a_valid_manifest(tmp_path):
    tiny = phantom.Scale(lesions=(1,) * 7, patients=7, fov_mm=(80.0, 80.0, 60.0), max_diameter_mm=24.0)
    manifest = phantom.generate_phantom(tmp_path / "a", scale=tiny, seed=3, workers=2)
    records = mf.read_manifest(manifest)  # checks every file and mask value
    assert sorted(r.label for r in records) == list(range(7))
    assert (tmp_path / "a" / phantom.TRUTH_NAME).is_file()
    # Parallel and serial generation write the same bytes.
    serial = phantom.generate_phantom(tmp_path / "b", scale=tiny, seed=3, workers=1)
    assert manifest.read_text() == serial.read_text()
    for r in records[:2]:
        for s in SEQUENCES:
            twin = tmp_path / "b" / r.images[s].relative_to(tmp_path / "a")
            assert filecmp.cmp(r.images[s], twin, shallow=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        phantom.generate_phantom(tmp_path / "a", scale=tiny, seed=4, workers=1)
    phantom.generate_phantom(tmp_path / "a", scale=tiny, seed=4, workers=1, overwrite=True)
    assert manifest.read_text() != serial.read_text()
    # phantom.json tells which phantom a folder holds.
    assert phantom.phantom_differences(tmp_path / "a", tiny, seed=4) == []
    assert phantom.phantom_differences(tmp_path / "a", tiny, seed=3) == ["seed: 4, wanted 3"]
    assert [d.split(":")[0] for d in phantom.phantom_differences(tmp_path / "a", "quick", seed=4)] == ["scale"]
    (tmp_path / "b" / phantom.SETTINGS_NAME).unlink()
    assert "older than version" in phantom.phantom_differences(tmp_path / "b", tiny, seed=3)[0]


def test_a_folder_holding_another_phantom_is_refused_not_reused(tmp_path):
    """A config reads data/phantom_<scale>_seed<k>: a folder of that name holding a phantom of
    other settings (renamed, or made with other flags) must not be taken for it."""
    from configs import quick
    from fll_jax.data.prepare import DataError, manifest_path

    tiny = phantom.Scale(lesions=(1,) * 7, patients=7, fov_mm=(80.0, 80.0, 60.0), max_diameter_mm=24.0)
    config = quick.get_config()
    config.data.root = str(tmp_path)
    config.data.phantom_seed = 2
    phantom.generate_phantom(tmp_path / "phantom_quick_seed2", scale=tiny, seed=2, workers=1)
    with pytest.raises(DataError, match=r"(?s)phantom_quick_seed2 holds another phantom.*scale: .*Move or delete"):
        manifest_path(config)
