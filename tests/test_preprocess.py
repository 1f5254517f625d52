"""Preprocessing: world geometry through oblique anisotropic grids, the crop rule, bad inputs."""
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import fll_jax.data
from fll_jax.constants import SEQUENCES
from fll_jax.data.preprocess import (
    PreprocessError, PreprocessOptions, crop_size_mm, preprocess_lesion, preprocess_manifest,
)
from tests.lesion_files import oblique_affine, record, voxel_to_world, world_grid, write_patient, write_sequence

SIZE = 32


def patch_to_world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


def weighted_centroid_world(volume, affine):
    """Intensity-weighted centroid of a patch, in world mm."""
    grid = np.indices(volume.shape).reshape(3, -1).astype(float)
    weights = volume.reshape(-1).astype(float)
    return patch_to_world(affine, grid @ weights / weights.sum())


def side_mm(patch_affine, size=SIZE):
    return patch_affine[0, 0] * size


def test_crop_size_rule():
    assert crop_size_mm(5.0) == 32
    assert crop_size_mm(15.9) == 32
    assert crop_size_mm(16.0) == 64
    assert crop_size_mm(31.9) == 64
    assert crop_size_mm(32.0, extent_mm=60.0) == pytest.approx(1.25 * 60 + 8)
    assert crop_size_mm(100.0) == pytest.approx(133.0)
    # A large lesion never gets less context than the 64 mm class below it.
    assert crop_size_mm(33.0, extent_mm=30.0) == 64
    with pytest.raises(ValueError, match="positive"):
        crop_size_mm(float("nan"))


def test_small_lesion_lands_at_patch_centre_through_oblique_anisotropic_grid(tmp_path):
    shape, affine = (48, 48, 10), oblique_affine()
    images, masks, centres = {}, {}, {}
    for s, seq in enumerate(SEQUENCES):
        # Each sequence has its lesion elsewhere (as if shifted by breathing): at a voxel centre.
        centres[seq] = voxel_to_world(affine, (22 + s % 3, 25 - s % 2, 4 + s % 2))
        images[seq], masks[seq] = write_sequence(tmp_path, seq, shape, affine, [(centres[seq], 5.0, 2)])
    patch = preprocess_lesion(record(images, masks, mask_value=2), size=SIZE)

    assert patch.image.shape == patch.mask.shape == (7, SIZE, SIZE, SIZE)
    assert patch.image.dtype == patch.mask.dtype == np.uint8
    assert patch.diameter_mm < 16
    for s, seq in enumerate(SEQUENCES):
        assert nib.aff2axcodes(patch.patch_affine[s]) == ("R", "A", "S")
        assert side_mm(patch.patch_affine[s]) == pytest.approx(32.0)
        centre = patch_to_world(patch.patch_affine[s], [(SIZE - 1) / 2] * 3)
        assert np.linalg.norm(centre - centres[seq]) < 1.0
        assert np.linalg.norm(weighted_centroid_world(patch.mask[s], patch.patch_affine[s]) - centres[seq]) < 1.0
        # The lesion is bright in the image: its patch is brightest in the middle.
        middle = slice(SIZE // 2 - 2, SIZE // 2 + 2)
        assert patch.image[s][middle, middle, middle].mean() > 200 > patch.image[s][:4, :4, :4].mean()


def test_off_centre_landmark_keeps_its_world_position(tmp_path):
    """A blob 17 mm from the lesion must appear where the patch affine says (catches flips and swaps)."""
    shape, affine = (64, 64, 14), oblique_affine()
    lesion = voxel_to_world(affine, (30, 33, 7))
    landmark = lesion + np.array([12.0, -9.0, 7.0])

    def blob(world):  # only the landmark is visible in the image
        return 1000 * np.exp(-((world - landmark[:, None, None, None]) ** 2).sum(0) / (2 * 3.0**2))

    images, masks = write_patient(tmp_path, shape, affine, [(lesion, 9.0, 1)], image_fn=blob)
    patch = preprocess_lesion(record(images, masks), size=SIZE)
    assert 16 <= patch.diameter_mm < 32
    for s in range(len(SEQUENCES)):
        assert side_mm(patch.patch_affine[s]) == pytest.approx(64.0)
        found = weighted_centroid_world(patch.image[s], patch.patch_affine[s])
        assert np.linalg.norm(found - landmark) < 1.0
        bright = weighted_centroid_world(patch.image[s] > 127, patch.patch_affine[s])
        assert np.linalg.norm(bright - landmark) < 1.0
        assert np.linalg.norm(weighted_centroid_world(patch.mask[s], patch.patch_affine[s]) - lesion) < 1.0


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_slices_stored_in_either_order_give_the_same_patch(tmp_path, interpolation):
    """5 mm slices sampled every 1 mm put grid points on the faces between slices: nearest
    sampling had taken the slice above or below by storage order (18 % of a nearest image's
    voxels and 6 % of the mask's differed)."""
    shape, affine = (48, 48, 12), np.diag([0.78125, 0.78125, 5.0, 1.0])
    affine[:3, 3] = (-18.0, -18.0, -30.0)
    world = world_grid(shape, affine)
    image = 100 + 20 * np.random.default_rng(0).standard_normal(shape)
    lesion = ((world - np.array([3.0, -2.0, 0.0])[:, None, None, None]) ** 2).sum(0) <= 10 ** 2
    image[lesion] += 150
    flip = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, shape[2] - 1], [0, 0, 0, 1.0]])
    options = PreprocessOptions(lesion_size="longest", normalise="volume", interpolation=interpolation)
    patches = []
    for name, order, stored in (("up", slice(None), affine), ("down", slice(None, None, -1), affine @ flip)):
        nib.save(nib.Nifti1Image(image[:, :, order].astype(np.float32), stored), tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(lesion[:, :, order].astype(np.uint8), stored), tmp_path / f"{name}_mask.nii.gz")
        lesion_record = record({"t2w": tmp_path / f"{name}.nii.gz"}, {"t2w": tmp_path / f"{name}_mask.nii.gz"})
        patches.append(preprocess_lesion(lesion_record, size=64, options=options))
    np.testing.assert_array_equal(patches[0].image, patches[1].image)
    np.testing.assert_array_equal(patches[0].mask, patches[1].mask)


def test_crop_box_by_diameter_and_large_lesion_context(tmp_path):
    spacing = np.array([2.0, 2.0, 4.0])
    shape, affine = (80, 80, 30), np.diag([*spacing, 1.0])
    small, medium, large = (voxel_to_world(affine, ijk) for ijk in ((15, 15, 6), (15, 60, 20), (52, 45, 15)))
    images, masks = write_patient(tmp_path, shape, affine, [(small, 5.0, 1), (medium, 10.0, 2), (large, 22.0, 3)])

    def patch_of(mask_value, **kwargs):
        return preprocess_lesion(record(images, masks, mask_value=mask_value, **kwargs), size=SIZE)

    assert side_mm(patch_of(1).patch_affine[0]) == pytest.approx(32.0)
    assert side_mm(patch_of(2).patch_affine[0]) == pytest.approx(64.0)
    # A diameter in the manifest overrides the measured one.
    assert side_mm(patch_of(1, diameter_mm=20.0).patch_affine[0]) == pytest.approx(64.0)

    big = patch_of(3)
    labels = np.asarray(nib.load(masks["t2w"]).dataobj)
    ijk = np.argwhere(labels == 3)
    extent = ((ijk.max(0) - ijk.min(0)) * spacing + spacing).max()  # world box side, voxels included
    assert big.diameter_mm > 32
    assert side_mm(big.patch_affine[0]) == pytest.approx(np.ceil(1.25 * extent + 8))
    # Training may zoom in until the lesion's box fills the cube (random dilation); others not at all.
    assert big.zoom_max == pytest.approx(np.ceil(1.25 * extent + 8) / extent, rel=0.02)
    assert patch_of(2).zoom_max == 1.0
    # The dilated box holds the whole lesion with a margin: the blurred mask fades out before the faces.
    mask = big.mask[0]
    assert mask.max() == 255
    for face in (mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]):
        assert face.max() == 0


@pytest.fixture
def valid_patient(tmp_path):
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    images, masks = write_patient(tmp_path, (16, 16, 6), affine, [(voxel_to_world(affine, (8, 8, 3)), 4.0, 1)])
    return images, masks


def _nan_image(path):
    nifti = nib.load(path)
    data = nifti.get_fdata()
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data.astype(np.float32), nifti.affine), path)


def _resave(path, transform):
    nifti = nib.load(path)
    data, affine = transform(np.asarray(nifti.dataobj), nifti.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def _shift_affine(data, affine):
    affine[0, 3] += 5.0
    return data, affine


def _nan_origin(data, affine):
    affine[0, 3] = np.nan  # a damaged header: it had been blamed on the lesion's size
    return data, affine


@pytest.mark.parametrize("case, which, damage, message", [
    ("missing", "images", lambda p: p.unlink(), "not found"),
    ("corrupt", "images", lambda p: p.write_bytes(b"not a nifti file"), "cannot read"),
    ("nan", "images", _nan_image, "NaN"),
    ("4d", "images", lambda p: _resave(p, lambda d, a: (np.stack([d, d], -1), a)), "expected a 3D"),
    ("shape", "masks", lambda p: _resave(p, lambda d, a: (d[:, :, :4], a)), "shape"),
    ("affine", "masks", lambda p: _resave(p, _shift_affine), "affine"),
    ("nan_affine", "images", lambda p: _resave(p, _nan_origin), "affine holds non-finite values"),
    ("empty", "masks", lambda p: _resave(p, lambda d, a: (np.zeros_like(d), a)), "absent"),
])
def test_bad_inputs_raise_errors_naming_the_file(valid_patient, case, which, damage, message):
    images, masks = valid_patient
    bad = (images if which == "images" else masks)["adc"]
    damage(bad)
    with pytest.raises(PreprocessError, match=message) as error:
        preprocess_lesion(record(images, masks), size=8)
    assert str(bad) in str(error.value)


def test_a_header_in_metres_or_microns_gives_the_lesion_of_one_in_millimetres(valid_patient):
    images, masks = valid_patient
    expected = preprocess_lesion(record(images, masks), size=8)
    files = {path: (np.asarray(nib.load(path).dataobj), nib.load(path).affine) for path in (*images.values(), *masks.values())}
    for unit, per_mm in (("meter", 1e-3), ("micron", 1e3)):
        for path, (data, mm) in files.items():
            affine = mm.copy()
            affine[:3] *= per_mm
            rewritten = nib.Nifti1Image(data, affine)
            rewritten.header.set_xyzt_units(unit)
            nib.save(rewritten, path)
        patch = preprocess_lesion(record(images, masks), size=8)
        assert patch.diameter_mm == pytest.approx(expected.diameter_mm)
        np.testing.assert_allclose(patch.image, expected.image, atol=1e-5)


def test_a_header_without_orientation_is_read_with_a_warning_naming_the_file(valid_patient):
    images, masks = valid_patient
    expected = preprocess_lesion(record(images, masks), size=8)
    for path in (images["t2w"], masks["t2w"]):
        nifti = nib.load(path)
        nifti.set_qform(None, code=0)
        nifti.set_sform(None, code=0)
        nib.save(nifti, path)
    # DWI as ANALYZE 7.5 files, whose header has no orientation field at all.
    for files in (images, masks):
        nifti = nib.load(files["dwi"])
        files["dwi"] = files["dwi"].with_name(files["dwi"].name.replace(".nii.gz", ".img"))
        nib.save(nib.AnalyzeImage(np.asarray(nifti.dataobj), nifti.affine), files["dwi"])
    with pytest.warns(UserWarning, match="no orientation") as caught:
        patch = preprocess_lesion(record(images, masks), size=8)
    named = {str(w.message).split(": ")[0] for w in caught}
    assert {str(images["t2w"]), str(masks["t2w"]), str(images["dwi"])} <= named
    assert not any(str(images["adc"]) in str(w.message) for w in caught)
    assert patch.present.all() and patch.diameter_mm == pytest.approx(expected.diameter_mm, rel=0.05)


def test_preprocess_manifest_pool_matches_one_process_in_manifest_order(tmp_path):
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    centres = [voxel_to_world(affine, (5, 5, 3)), voxel_to_world(affine, (11, 10, 3))]
    records = []
    for p in range(6):
        lesions = [(centres[i], 3.0 + p / 3, i + 1) for i in range(1 + p % 2)]
        images, masks = write_patient(tmp_path / f"P{p}", (16, 16, 6), affine, lesions,
                                      image_fn=lambda w, p=p: 100 + p * 10 + w[0])
        records += [record(images, masks, patient_id=f"P{p}", lesion_id=f"P{p}_L{i}", label=p % 7,
                           mask_value=i + 1, split="test" if p == 5 else "dev") for i in range(len(lesions))]
    pooled = preprocess_manifest(records, size=8, workers=2)
    single = preprocess_manifest(records, size=8, workers=1)
    np.testing.assert_array_equal(pooled.image, single.image)
    np.testing.assert_array_equal(pooled.mask, single.mask)
    assert list(pooled.lesion_id) == [r.lesion_id for r in records]
    assert list(pooled.label2) == [int(r.label >= 4) for r in records]


def test_patchset_npz_round_trip(tmp_path, valid_patient):
    images, masks = valid_patient
    records = [record(images, masks, patient_id=f"P{i}", lesion_id=f"L{i}", label=i) for i in range(3)]
    patches = preprocess_manifest(records, size=8, workers=1)
    loaded = type(patches).load_npz(patches.save_npz(tmp_path / "p.npz"))
    for name in ("image", "mask", "lesion_id", "patch_affine", "diameter_mm", "present"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(patches, name))


def test_a_lesion_cache_reuses_intact_patches_and_preprocesses_damaged_ones_again(tmp_path, valid_patient,
                                                                                  monkeypatch, capsys):
    from fll_jax.data import preprocess
    from fll_jax.data.lesion_cache import LesionCache

    images, masks = valid_patient
    records = [record(images, masks, patient_id=f"P{i}", lesion_id=f"L{i}", label=i) for i in range(3)]
    cache = LesionCache(tmp_path / "cache", {f"L{i}": f"key{i}" for i in range(3)})
    first = preprocess_manifest(records, size=8, workers=1, cache=cache)
    damaged = tmp_path / "cache" / "key1.npz"
    damaged.write_bytes(damaged.read_bytes()[:300])
    made = []
    real = preprocess._preprocess
    monkeypatch.setattr(preprocess, "_preprocess", lambda record, *a: made.append(record.lesion_id) or real(record, *a))
    capsys.readouterr()
    again = preprocess_manifest(records, size=8, workers=1, cache=cache)
    out = capsys.readouterr().out
    assert made == ["L1"] and f"preprocessing lesion 'L1' again: {damaged}: damaged" in out
    assert "reused the patches of 2 of 3 lesions" in out
    for name in ("image", "mask", "patch_affine", "diameter_mm", "present", "zoom_max"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    # Patches of another size under the same key are not taken for these.
    assert cache.load("L0", 16) is None and "image is uint8 (7, 8, 8, 8), not uint8 (7, 16, 16, 16)" in (
        capsys.readouterr().out)


def test_preprocessing_needs_neither_tensorflow_nor_jax():
    # TensorFlow blocked: preprocessing, folds and the numpy source still import and run.
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None; "
        "import fll_jax.data.preprocess, fll_jax.data.folds, fll_jax.data.numpy_source; "
        "from fll_jax.data.preprocess import crop_size_mm; assert crop_size_mm(10.0) == 32"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # The package's __init__ may import JAX; these modules themselves never do.
    for name in ("preprocess", "folds", "numpy_source", "patchset"):
        source = (Path(fll_jax.data.__file__).parent / f"{name}.py").read_text()
        assert "import jax" not in source and "from jax" not in source and "tensorflow" not in source


# --- boxes and absent sequences -----------------------------------------------------------------

def test_a_box_gives_the_same_lesion_as_its_mask(tmp_path):
    """A ball given by its mask, by its voxel box (oblique grid) or by its world box: same place and size."""
    shape, affine = (48, 48, 12), oblique_affine(spacing=(1.5, 1.5, 4.0))
    centre = voxel_to_world(affine, (24, 23, 6))
    images, masks = write_patient(tmp_path, shape, affine, [(centre, 7.0, 1)])
    by_mask = preprocess_lesion(record(images, masks), size=SIZE)

    labels = np.asarray(nib.load(masks["t2w"]).dataobj)
    ijk = np.argwhere(labels == 1)
    box = (*ijk.min(0).tolist(), *ijk.max(0).tolist())
    by_box = preprocess_lesion(record(images, {}, boxes={s: box for s in SEQUENCES}), size=SIZE)
    world = (-7.0 + centre, 7.0 + centre)
    by_world = preprocess_lesion(record(images, {}, box_mm=(*world[0], *world[1])), size=SIZE)

    # The world box of a 7 mm ball is 14 mm a side: its ellipsoid is the ball itself.
    assert by_world.diameter_mm == pytest.approx(14.0)
    # The voxel box spans the ball's voxels: its sides are 14 mm to within a voxel (4 mm slices).
    assert by_box.diameter_mm == pytest.approx(14.0, abs=2.0)
    assert by_mask.diameter_mm == pytest.approx(14.0, rel=0.1)
    for patch in (by_box, by_world):
        for s in range(len(SEQUENCES)):
            found = weighted_centroid_world(patch.mask[s], patch.patch_affine[s])
            assert np.linalg.norm(found - centre) < 1.0
            assert side_mm(patch.patch_affine[s]) == side_mm(by_mask.patch_affine[s])


def test_a_world_box_is_the_ellipsoid_of_every_voxel_centre_on_oblique_grids():
    """Evaluated on the voxels between the box's corners only (the whole grid had taken 80 bytes a
    voxel), it must still be every voxel centre of the grid inside the ellipsoid."""
    from fll_jax.data.boxes import world_box_ellipsoid

    rng = np.random.default_rng(0)
    for _ in range(50):
        affine = np.eye(4)
        affine[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0] @ np.diag(rng.uniform(0.5, 3, 3))
        affine[:3, 3] = rng.normal(size=3) * 20
        shape = tuple(rng.integers(5, 25, 3))
        # Centres about the grid's, so that boxes lie inside, across an edge or outside.
        centre = affine[:3, :3] @ (np.array(shape) / 2) + affine[:3, 3] + rng.normal(size=3) * 15
        half = rng.uniform(1, 20, 3)
        world = affine[:3, :3] @ np.indices(shape).reshape(3, -1) + affine[:3, 3:]
        expected = (((world - centre[:, None]) / half[:, None]) ** 2).sum(0) <= 1
        mask = world_box_ellipsoid((*(centre - half), *(centre + half)), shape, affine)
        np.testing.assert_array_equal(mask, expected.reshape(shape))


def test_a_box_that_misses_every_voxel_is_named(tmp_path, valid_patient):
    images, _ = valid_patient
    tiny = voxel_to_world(np.diag([2.0, 2.0, 4.0, 1.0]), (8.5, 8.5, 3.5))  # between voxel centres
    with pytest.raises(PreprocessError, match="box holds no voxel centre") as error:
        preprocess_lesion(record(images, {}, box_mm=(*(tiny - 0.2), *(tiny + 0.2))), size=8)
    assert str(images["t2w"]) in str(error.value)


def test_a_world_box_reaching_outside_the_image_is_refused_unless_allowed(valid_patient):
    """Such a box (a coordinate mistyped or left in LPS) had been clipped silently: the patch centred
    on the part inside, sized by the whole box. A voxel box is refused alike (the manifest check)."""
    from fll_jax.data.boxes import world_box_overhang

    images, _ = valid_patient
    affine = np.diag([2.0, 2.0, 4.0, 1.0])  # 16 x 16 x 6 voxels: x and y from -1 mm to 31 mm
    inside = (*voxel_to_world(affine, (6, 6, 2)), *voxel_to_world(affine, (10, 10, 4)))
    assert world_box_overhang(inside, (16, 16, 6), affine) == 0
    edge = (*voxel_to_world(affine, (12, 6, 2)), *(voxel_to_world(affine, (15.5, 10, 4))))
    assert world_box_overhang(edge, (16, 16, 6), affine) == 0  # to the last voxel's outer face
    outside = (*voxel_to_world(affine, (12, 6, 2)), *voxel_to_world(affine, (18.5, 10, 4)))
    assert world_box_overhang(outside, (16, 16, 6), affine) == pytest.approx(3.0)
    # Turned 45 degrees about z, a grid's edge meets the inscribed ellipsoid, not the box's corners.
    turned = oblique_affine((2.0, 2.0, 4.0), angles_deg=(45.0, 0.0))
    centre, half = turned[:3, :3] @ np.array([7.5, 7.5, 2.5]) + turned[:3, 3], np.array([12.0, 12.0, 8.0])
    assert world_box_overhang((*(centre - half), *(centre + half)), (16, 16, 6), turned) == pytest.approx(0, abs=1e-9)
    with pytest.raises(PreprocessError, match=r"box_mm 24 12 8 37 20 16 reaches 3.0 voxel\(s\) outside") as error:
        preprocess_lesion(record(images, {}, box_mm=outside), size=8)
    assert str(images["t2w"]) in str(error.value) and "--config.data.allow box_outside" in str(error.value)
    preprocess_lesion(record(images, {}, box_mm=outside), size=8, allow=frozenset({"box_outside"}))


def test_absent_sequences_are_zero_and_flagged(valid_patient):
    images, masks = valid_patient
    absent = ("adc", "lap")
    full = preprocess_lesion(record(images, masks), size=8)
    patch = preprocess_lesion(record({s: p for s, p in images.items() if s not in absent},
                                     {s: p for s, p in masks.items() if s not in absent}), size=8)
    for s, seq in enumerate(SEQUENCES):
        assert patch.present[s] == (seq not in absent)
        if seq in absent:
            assert not patch.image[s].any() and not patch.mask[s].any() and not patch.patch_affine[s].any()
        else:
            np.testing.assert_array_equal(patch.image[s], full.image[s])
    assert patch.diameter_mm == pytest.approx(full.diameter_mm)


# --- lesion size as radiologists measure it, crops that never cut, the paper's intensity ------------

def test_crop_never_cuts_an_elongated_lesion():
    # A 37 x 9 x 9 mm lesion has an equivalent diameter of 14.4 mm: the 32 mm cube would cut it.
    assert crop_size_mm(14.4, extent_mm=37.0) == 64
    assert crop_size_mm(14.4, extent_mm=60.0) == pytest.approx(1.25 * 60 + 8)
    assert crop_size_mm(20.0, extent_mm=70.0) == pytest.approx(1.25 * 70 + 8)
    assert crop_size_mm(14.4, extent_mm=31.0) == 32


def _rod(tmp_path, affine, shape, half_lengths, direction):
    """An ellipsoidal lesion with the given half-lengths (mm) along `direction` and across it."""
    from tests.lesion_files import world_grid

    centre = voxel_to_world(affine, [(n - 1) / 2 for n in shape])
    axis = np.asarray(direction, float) / np.linalg.norm(direction)
    offset = world_grid(shape, affine) - centre[:, None, None, None]
    along = np.tensordot(axis, offset, axes=1)
    across = np.linalg.norm(offset - axis[:, None, None, None] * along, axis=0)
    inside = (along / half_lengths[0]) ** 2 + (across / half_lengths[1]) ** 2 <= 1
    images, masks = {}, {}
    for seq in SEQUENCES:
        images[seq], masks[seq] = tmp_path / f"{seq}.nii.gz", tmp_path / f"{seq}_mask.nii.gz"
        nib.save(nib.Nifti1Image(np.where(inside, 300.0, 100.0).astype(np.float32), affine), images[seq])
        nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), masks[seq])
    return images, masks, centre, axis


@pytest.mark.parametrize("direction", [(1.0, 0.0, 0.0), (1.0, 1.0, 1.0)])
def test_elongated_and_oblique_lesions_measure_their_longest_axis_and_stay_whole(tmp_path, direction):
    from fll_jax.data.preprocess import PreprocessOptions

    affine = oblique_affine(spacing=(1.0, 1.0, 2.0), angles_deg=(20.0, 10.0))
    images, masks, centre, axis = _rod(tmp_path, affine, (72, 72, 36), (18.5, 4.5), direction)
    longest = preprocess_lesion(record(images, masks), size=SIZE, options=PreprocessOptions(lesion_size="longest"))
    equivalent = preprocess_lesion(record(images, masks), size=SIZE)
    # 37 mm long, 9 mm across: the longest diameter (to within a voxel), against about 14 mm.
    assert longest.diameter_mm == pytest.approx(37.0, abs=2.5)
    assert equivalent.diameter_mm == pytest.approx(np.cbrt(37 * 9 * 9), rel=0.1)
    assert side_mm(longest.patch_affine[0]) >= 64  # 37 mm: the dilated rule
    # Along x the 32 mm cube of a 14 mm lesion would cut it, so it takes the dilated rule too;
    # along the diagonal the lesion's world box (about 26 mm a side) fits the 32 mm cube.
    assert side_mm(equivalent.patch_affine[0]) == (64 if direction[1] == 0 else 32)
    for patch in (longest, equivalent):
        mask = patch.mask[0]
        for face in (mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]):
            assert face.max() < 128  # the lesion (blurred mask above half) stays inside the cube


def test_the_papers_intensity_and_interpolation(tmp_path):
    """'volume' keeps the contrast between two lesions that per-patch scaling sets equal;
    'nearest' leaves only values of the image itself."""
    from fll_jax.data.preprocess import PreprocessOptions

    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    bright, dim = voxel_to_world(affine, (8, 8, 3)), voxel_to_world(affine, (24, 24, 3))

    def image(world):  # liver 100, one lesion at 800, the other at 400
        near = lambda c: ((world - c[:, None, None, None]) ** 2).sum(0) <= 25
        return np.where(near(bright), 800.0, np.where(near(dim), 400.0, 100.0))

    images, masks = write_patient(tmp_path, (32, 32, 7), affine, [(bright, 5.0, 1), (dim, 5.0, 2)], image_fn=image)
    paper = PreprocessOptions(normalise="volume", interpolation="nearest")
    centre = slice(SIZE // 2 - 1, SIZE // 2 + 1)
    cores = {}
    for options in (PreprocessOptions(), paper):
        cores[options] = [preprocess_lesion(record(images, masks, mask_value=v), size=SIZE, options=options)
                          .image[0][centre, centre, centre].mean() for v in (1, 2)]
    assert cores[PreprocessOptions()][0] == pytest.approx(cores[PreprocessOptions()][1], abs=3)  # both 255
    assert cores[paper][0] > 250 and cores[paper][1] == pytest.approx(255 * 300 / 700, abs=3)
    patch = preprocess_lesion(record(images, masks), size=SIZE, options=paper)
    levels = np.rint(np.array([0.0, 300.0, 700.0]) / 700 * 255)
    assert np.isin(np.unique(patch.image[0]), levels).all()


def _ball(diameter: float, spacing) -> tuple[np.ndarray, np.ndarray]:
    """A ball's mask on a grid of the given spacing (centred off the voxel centres), and its affine."""
    spacing = np.asarray(spacing, float)
    shape = (np.ceil(diameter / spacing) + 6).astype(int)
    centre = (shape - 1) / 2 * spacing + np.array([0.3, 0.2, 0.4]) * spacing
    points = np.indices(shape).reshape(3, -1).T * spacing
    return (np.linalg.norm(points - centre, axis=1) <= diameter / 2).reshape(shape), np.diag([*spacing, 1.0])


def test_the_longest_diameter_is_taken_as_calipers_take_it():
    """Corner to corner of the extreme voxels, a 15 mm ball had measured 16.5 mm (and a 12 mm
    one in 6 mm slices 16.5 mm): the 64 mm crop of lesions from 16 mm up instead of 32 mm."""
    from fll_jax.data.preprocess import longest_diameter_mm

    for diameter, spacing in ((15.0, (1.0, 1.0, 1.0)), (12.0, (0.7, 0.7, 6.0))):
        assert diameter - 1.0 < longest_diameter_mm(*_ball(diameter, spacing)) < 16.0
    assert longest_diameter_mm(*_ball(30.0, (0.8, 0.8, 1.0))) == pytest.approx(30.0, abs=1.0)


def test_a_lesion_in_an_edge_slice_keeps_all_of_it_and_beyond_the_scan_is_black(tmp_path):
    """The volume reaches the outer face of its last 7 mm slice: the lesion there is sampled whole
    (as in mid-volume), and beyond the scan the image is 0 even for a volume with negative values
    (sampled as 0 before normalising, it had become 0.25 of the range)."""
    from fll_jax.data.preprocess import PreprocessOptions

    affine = np.diag([1.0, 1.0, 7.0, 1.0])
    options = PreprocessOptions(lesion_size="equivalent", normalise="volume", interpolation="nearest")

    def image_fn(world):
        return np.where(world[0] < 1.0, -100.0, 100.0)  # one column below zero: the volume's minimum

    patches = {}
    for name, slices in (("edge", 4), ("middle", 9)):
        centre = voxel_to_world(affine, (20, 20, slices - 1 if name == "edge" else 4))
        images, masks = write_patient(tmp_path / name, (40, 40, slices), affine, [(centre, 5.0, 1)], image_fn)
        patches[name] = preprocess_lesion(record(images, masks, diameter_mm=10.0), size=SIZE, options=options)
    edge, middle = patches["edge"], patches["middle"]
    assert edge.mask[0].sum() == middle.mask[0].sum() > 0
    # The patch's upper half lies beyond the last slice's outer face (3.5 mm above the lesion's centre).
    above = np.arange(SIZE) * side_mm(edge.patch_affine[0]) / SIZE > side_mm(edge.patch_affine[0]) / 2 + 4
    assert not edge.image[0][:, :, above].any() and edge.image[0][:, :, ~above].any()


def test_a_lesion_the_sampling_grid_misses_is_an_error_not_an_absent_sequence(tmp_path):
    affine = np.diag([0.3, 0.3, 0.3, 1.0])
    centre = voxel_to_world(affine, (10, 10, 10))  # one 0.3 mm voxel, between the 1 mm grid's points
    images, masks = write_patient(tmp_path, (21, 21, 21), affine, [(centre, 0.1, 1)])
    with pytest.raises(PreprocessError, match="no voxel of its lesion reaches the patch's 1 mm sampling grid"):
        preprocess_lesion(record(images, masks, diameter_mm=5.0), size=SIZE)


def test_a_mask_value_no_lesion_claims_is_refused_unless_allowed(tmp_path):
    """A liver label beside the lesion (1 liver, 2 tumour) with a manifest naming only the
    tumour: value 1 is no lesion's, and would have been taken for a lesion had the row kept the
    default mask_value 1. A patient's patches kept from earlier still claim their values."""
    from fll_jax.data.lesion_cache import LesionCache
    from fll_jax.data.preprocess import lesion_problems

    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    lesions = [(voxel_to_world(affine, (5, 5, 3)), 4.0, 1), (voxel_to_world(affine, (11, 11, 3)), 4.0, 2)]
    images, masks = write_patient(tmp_path / "P0", (16, 16, 6), affine, lesions)
    tumour = record(images, masks, lesion_id="P0_L2", mask_value=2)
    expected = (f"lesion 'P0_L2': {masks['t2w']}: value(s) 1 mark no lesion of patient 'P0' in the manifest (its "
                "lesions claim 2)")
    with pytest.raises(PreprocessError, match=re.escape(expected)):
        preprocess_manifest([tumour], size=8, workers=1)
    assert any(p.startswith(expected) for p in lesion_problems([tumour], workers=1))
    assert lesion_problems([tumour], workers=1, allow=frozenset({"unclaimed_mask_value"})) == []
    both = [record(images, masks, lesion_id="P0_L1", mask_value=1), tumour]
    cache = LesionCache(tmp_path / "cache", {"P0_L1": "one", "P0_L2": "two"})
    preprocess_manifest(both, size=8, workers=1, cache=cache)
    (tmp_path / "cache" / "two.npz").unlink()
    assert preprocess_manifest(both, size=8, workers=1, cache=cache).lesion_id.tolist() == ["P0_L1", "P0_L2"]


def test_one_mask_value_marking_two_lesions_is_refused_unless_allowed(tmp_path):
    """A binary mask of two lesions: taken as one, the patch had been centred on the liver between
    them and sized by both. A speck of the segmentation beside one lesion still passes."""
    from fll_jax.data.checks import separate_part_problems
    from fll_jax.data.preprocess import lesion_problems

    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    lesions = [(voxel_to_world(affine, (4, 4, 3)), 4.0, 1), (voxel_to_world(affine, (12, 12, 3)), 3.0, 1)]
    images, masks = write_patient(tmp_path / "P0", (16, 16, 6), affine, lesions)
    both = record(images, masks)
    problems = lesion_problems([both], workers=1)
    assert len(problems) == 7 and all("lesion P0_L1's mask value marks 2 separate parts" in p for p in problems)
    assert f"{masks['t2w']}: lesion P0_L1's" in problems[0] and "separate_parts" in problems[0]
    with pytest.raises(PreprocessError, match="marks 2 separate parts"):
        preprocess_manifest([both], size=8, workers=1)
    assert lesion_problems([both], workers=1, allow=frozenset({"separate_parts"})) == []
    speck = [lesions[0], (voxel_to_world(affine, (12, 12, 3)), 0.5, 1)]
    images, masks = write_patient(tmp_path / "P1", (16, 16, 6), affine, speck)
    with_speck = record(images, masks, patient_id="P1", lesion_id="P1_L1")
    assert lesion_problems([with_speck], workers=1) == []
    # The speck is no part of the lesion: the same patches as the same images with it erased.
    clean = {}
    for s, path in masks.items():
        mask = nib.load(path)
        data = np.asarray(mask.dataobj).copy()
        assert data[12, 12, 3] == 1
        data[12, 12, 3] = 0
        clean[s] = tmp_path / f"{s}_clean_mask.nii.gz"
        nib.save(nib.Nifti1Image(data, mask.affine), clean[s])
    a, b = (preprocess_manifest([r], size=8, workers=1) for r in (with_speck, record(images, clean, patient_id="P1",
                                                                                        lesion_id="P1_L1")))
    np.testing.assert_array_equal(a.patch_affine, b.patch_affine)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    # A five-voxel lesion on a thick-slice grid and a one-voxel speck (3.2 mm^3, under a 3 mm ball's
    # 14 mm^3): a fifth of the lesion, yet no second lesion.
    small = np.zeros((12, 12, 5), np.uint8)
    small[4:6, 4:6, 2], small[5, 5, 3], small[9, 9, 2] = 1, 1, 1
    thick = np.diag([0.8, 0.8, 5.0, 1.0])
    assert separate_part_problems(small, thick, Path("m.nii.gz"), "L1", frozenset()) == []
    assert separate_part_problems(small, np.diag([3.0, 3.0, 3.0, 1.0]), Path("m.nii.gz"), "L1", frozenset())
