"""On-device input preparation: exact resampling for evaluation, shared geometry in training."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import quick
from fll_jax.train.augment import drop_sequences, prepare_inputs


def _batch(seed=0, n=2, size=16):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (n, 7, size, size, size), dtype=np.uint8)
    return {"image": image, "mask": image.copy()}


def test_evaluation_halving_is_a_2x2x2_mean():
    batch = _batch()
    x = np.asarray(prepare_inputs(batch, (0, 3, 6), 8))
    assert x.shape == (2, 3, 8, 8, 8, 2)
    expected = batch["image"][:, [0, 3, 6]].astype(np.float32).reshape(2, 3, 8, 2, 8, 2, 8, 2).mean((3, 5, 7)) / 255
    np.testing.assert_allclose(x[..., 0], expected, atol=1e-5)


def test_evaluation_quartering_is_a_4x4x4_mean_not_every_fourth_pair():
    """Trilinear samples alone read the central 2^3 of each 4^3 block: stripes of 255, 0, 0, 255
    (block mean 0.5) had come out 0 everywhere at a quarter of the stored size."""
    batch = _batch(size=32)
    batch["image"][..., 1::4] = batch["image"][..., 2::4] = 0
    batch["image"][..., 0::4] = batch["image"][..., 3::4] = 255
    x = np.asarray(prepare_inputs(batch, (0, 3, 6), 8))
    expected = batch["mask"][:, [0, 3, 6]].astype(np.float32).reshape(2, 3, 8, 4, 8, 4, 8, 4).mean((3, 5, 7)) / 255
    np.testing.assert_allclose(x[..., 0], 0.5, atol=1e-5)
    np.testing.assert_allclose(x[..., 1], expected, atol=1e-5)


def test_resampling_is_scipys_trilinear_interpolation_with_clamped_edges():
    from scipy import ndimage

    from fll_jax.train.augment import _resample, _source_coords, random_affine

    cfg = quick.get_config().augment
    cfg.shift = 0.3  # some points fall outside the stored cube: the clamped edge
    volumes = _batch(size=12)["image"][0, :3]
    matrix, offset = random_affine(jax.random.key(4), cfg, 1.0)
    coords = np.asarray(_source_coords(matrix, offset, 12, 8))
    assert coords.min() < 0 or coords.max() > 11
    got = np.asarray(_resample(jnp.asarray(volumes), jnp.asarray(coords)))
    expected = [ndimage.map_coordinates(v.astype(np.float64), coords, order=1, mode="nearest") for v in volumes]
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5, atol=1e-3)


def test_evaluation_at_stored_size_is_the_identity():
    batch = _batch()
    x = np.asarray(prepare_inputs(batch, (1, 2), 16))
    np.testing.assert_allclose(x[..., 1], batch["mask"][:, [1, 2]] / 255.0, atol=1e-6)


def test_training_moves_image_and_mask_together_and_varies_by_key():
    cfg = quick.get_config().augment
    cfg.intensity = 0.0
    cfg.noise_std = 0.0
    cfg.rotate_deg = 30.0
    batch = _batch()
    a = np.asarray(prepare_inputs(batch, (0, 4), 16, jax.random.PRNGKey(1), cfg))
    b = np.asarray(prepare_inputs(batch, (0, 4), 16, jax.random.PRNGKey(2), cfg))
    # Same geometry for a sequence's image and mask (they hold the same voxels here).
    np.testing.assert_allclose(a[..., 0], a[..., 1], atol=1e-6)
    assert not np.allclose(a, b)
    assert not np.allclose(a[..., 0], batch["image"][:, [0, 4]] / 255.0)


def test_lighting_and_noise_touch_the_image_only():
    cfg = quick.get_config().augment
    batch = _batch()
    x = np.asarray(prepare_inputs(batch, (0,), 16, jax.random.PRNGKey(3), cfg))
    assert np.abs(x[..., 0] - x[..., 1]).max() > 0.01
    assert jnp.all(x[..., 1] >= 0) and jnp.all(x[..., 1] <= 1)


def test_sequence_dropout_never_hides_every_sequence():
    present = np.random.default_rng(0).uniform(size=(400, 4)) < 0.7
    present[:, 0] = present[:, 0] | ~present.any(1)  # every lesion has at least one sequence
    x = jnp.ones((400, 4, 2, 2, 2, 2)) * present[:, :, None, None, None, None]
    for rate in (0.3, 0.99):
        kept = np.asarray(jnp.any(drop_sequences(x, jax.random.key(1), rate)[..., 1] > 0, axis=(2, 3, 4)))
        assert not (kept & ~present).any()  # an absent sequence stays absent
        assert kept.any(axis=1).all()  # never all of a lesion's
        if rate == 0.3:
            assert abs(1 - kept.sum() / present.sum() - rate) < 0.06
        else:
            assert (kept.sum(1) == 1).all()


def test_absent_sequences_enter_as_zeros():
    batch = _batch()
    batch["present"] = np.ones((2, 7), bool)
    batch["present"][1, 1] = False
    x = np.asarray(prepare_inputs(batch, (0, 1, 2), 8))
    assert not x[1, 1].any() and x[1, 0].any() and x[0, 1].any()


def test_random_dilation_draws_margins_from_the_stored_one_down_to_zero():
    from fll_jax.train.augment import random_affine

    cfg = quick.get_config().augment
    cfg.rotate_deg, cfg.flip = 0.0, False
    keys = jax.random.split(jax.random.key(0), 2000)

    def zooms(zoom_max, dilation):
        cfg.random_dilation = dilation
        matrices = jax.vmap(lambda k: random_affine(k, cfg, zoom_max)[0])(keys)
        return 1.0 / np.asarray(matrices[:, 0, 0])

    large = zooms(1.6, True)
    # The margin around the lesion's box is (side / zoom - E) / 2: from the stored one (zoom 1)
    # down to 0 (zoom_max = side / E), never a zoom out past the stored cube.
    assert large.min() >= 1.0 - 1e-6 and large.max() <= 1.6 + 1e-6
    assert large.min() < 1.01 and large.max() > 1.59 and abs(np.median(large) - 1.3) < 0.03
    for z in (zooms(1.0, True), zooms(1.6, False)):  # smaller lesions, or switched off: the generic range
        assert z.min() >= cfg.scale_min - 1e-6 and z.max() <= cfg.scale_max + 1e-6 and z.min() < 0.86


def test_prepare_inputs_dilates_only_lesions_of_the_dilated_rule():
    cfg = quick.get_config().augment
    cfg.random_dilation, cfg.rotate_deg, cfg.shift = True, 0.0, 0.0
    size = 16
    mask = np.zeros((2, 7, size, size, size), np.uint8)
    mask[:, :, 4:12, 4:12, 4:12] = 255  # a lesion filling half the cube's side
    batch = {"image": mask.copy(), "mask": mask, "zoom_max": np.array([2.0, 1.0], np.float32)}
    fractions = np.array([np.asarray(prepare_inputs(batch, (0,), size, jax.random.key(k), cfg))[..., 1].mean(axis=(1, 2, 3, 4))
                          for k in range(12)])
    # Zooming in makes the lesion fill more of the input: the dilated lesion always at least as much
    # as stored (1/8), the other one sometimes less (zoom out to 0.85).
    assert fractions[:, 0].min() >= 0.12 and fractions[:, 0].mean() > 0.2
    assert fractions[:, 1].min() < 0.125 < fractions[:, 1].max()
