"""Saliency: IG completeness and quadrature, chunking, Grad-CAM, importance, NIfTI maps, scores."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from fll_jax.constants import CLASSES, NUM_CLASSES, SEQUENCE_NAMES, SEQUENCES, to_binary
from fll_jax.data.preprocess import preprocess_lesion
from fll_jax.evaluation.report import saliency_markdown, write_report
from fll_jax.files import write_json
from fll_jax.saliency import outputs, scoring
from fll_jax.saliency.gradcam import grad_cam, to_input_grid
from fll_jax.saliency.gradients import smoothgrad, vanilla_gradient
from fll_jax.saliency.importance import attribution_shares, sequence_importance
from fll_jax.saliency.integrated_gradients import adaptive_nodes, integrated_gradients, make_baseline, quadrature_rule
from fll_jax.saliency.target import ClassScore
from fll_jax.train.workdir import WorkdirError, hold_run, models_digest, run_fingerprint
from tests.helpers import tiny_config

SIZE = 16
USED = ("t2w", "lap")


def _lesion_input(seed: int = 0) -> np.ndarray:
    """[S, 16, 16, 16, 2]: noisy images with a bright sphere, and its blurred mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"))
    sphere = (np.sum((grid - 7.5) ** 2, axis=0) < 16).astype(np.float32)
    image = 0.3 + 0.1 * rng.standard_normal((len(USED), SIZE, SIZE, SIZE)) + 0.4 * sphere
    mask = np.broadcast_to(sphere, image.shape)
    return np.stack([np.clip(image, 0, 1), mask], axis=-1).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    """A width-2, depth-10 model on two sequences at 16^3 (float32), random init."""
    config = tiny_config("sequences=" + "+".join(USED), size=SIZE)
    from fll_jax.models import build_model

    model = build_model(config.model, config.sequences)
    x = _lesion_input()
    init = jax.jit(lambda key: model.init(key, x[None], train=False))
    variables = [init(jax.random.PRNGKey(k)) for k in (0, 1)]
    return model, variables, x, ClassScore.from_model(model, variables[0], chunk=16)


# --- a hand-made linear function and a smooth one -------------------------------------------

def _linear_apply(variables, x):
    """Logits linear in the image channel (plus a mask term that IG must leave alone)."""
    w7, w2 = variables["w7"], variables["w2"]
    logits7 = jnp.einsum("bsdhw,ksdhw->bk", x[..., 0], w7) + 0.01 * x[..., 1].sum(axis=(1, 2, 3, 4))[:, None]
    logits2 = jnp.einsum("bsdhw,ksdhw->bk", x[..., 0], w2)
    return {"logits7": logits7, "logits2": logits2}


def _smooth_apply(variables, x):
    """A smooth non-linear function: tanh features, then linear logits."""
    h = jnp.tanh(3.0 * x[..., 0] - 1.0)
    return _linear_apply(variables, jnp.stack([h, x[..., 1]], axis=-1))


def _weights(seed: int, shape=(len(USED), SIZE, SIZE, SIZE)) -> dict:
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.prod(shape)
    return {"w7": 20 * scale * rng.standard_normal((NUM_CLASSES,) + shape).astype(np.float32),
            "w2": 20 * scale * rng.standard_normal((2,) + shape).astype(np.float32)}


def test_quadrature_rules_integrate_polynomials():
    for kind, steps, degree in (("trapezoid", 2, 1), ("gauss_legendre", 4, 7)):
        nodes, weights = quadrature_rule(kind, steps)
        assert nodes.min() >= 0 and nodes.max() <= 1
        np.testing.assert_allclose(np.sum(weights * nodes**degree), 1 / (degree + 1), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown quadrature"):
        quadrature_rule("simpson", 8)


def test_adaptive_nodes_follow_the_change_of_f():
    # F flat until a = 0.7, then ReLU kinks: a trained model's F on its path from black.
    rng = np.random.default_rng(0)
    kinks, slopes = rng.uniform(0.7, 1.0, 30), rng.normal(0.3, 1.0, 30)
    f = lambda a: np.maximum(np.asarray(a)[..., None] - kinks, 0) @ slopes
    pilot = np.linspace(0, 1, 9)
    nodes, weights = adaptive_nodes(pilot, f(pilot), 32)
    assert len(nodes) == 32 and nodes[0] == 0 and nodes[-1] == 1 and np.all(np.diff(nodes) > 0)
    assert weights.sum() == pytest.approx(1.0)
    # Three quarters of the nodes follow F's change, the last quarter is spread uniformly.
    assert np.sum(nodes > 0.625) >= 0.75 * 31
    assert np.diff(nodes).max() <= 1 / (0.25 * 31) + 1e-12
    # Trapezoid weights: exact on a linear integrand.
    assert weights @ (3 * nodes + 1) == pytest.approx(2.5)
    # A flat F gives the uniform rule.
    np.testing.assert_allclose(adaptive_nodes(pilot, np.ones(9), 33)[0], np.linspace(0, 1, 33))


def test_ig_is_exact_on_a_linear_function_and_averages_an_ensemble():
    x = _lesion_input()
    members = [_weights(0), _weights(1)]
    score = ClassScore(_linear_apply, members, output="logit", chunk=4)
    for kind in ("trapezoid", "gauss_legendre", "adaptive"):
        result = integrated_gradients(score, x, index=3, baseline="mean", steps=5, quadrature=kind)
        expected = (x[..., 0] - result.baseline) * np.mean([m["w7"][3] for m in members], axis=0)
        np.testing.assert_allclose(result.attributions, expected, rtol=1e-4, atol=1e-9)
        assert abs(result.delta) < 1e-5 and result.relative_delta < 1e-4
    # The ensemble's F is the mean of the members' F.
    singles = [integrated_gradients(ClassScore(_linear_apply, m, output="logit"), x, index=3, baseline="mean",
                                    steps=2, quadrature="trapezoid").f_x for m in members]
    assert result.f_x == pytest.approx(np.mean(singles), rel=1e-5)
    # Occlusion of a linear function drops F by exactly that sequence's attribution sum.
    imp = sequence_importance(score, x, result.attributions, result.baseline, USED, index=3)
    np.testing.assert_allclose(imp.occlusion_drop, result.attributions.sum(axis=(1, 2, 3)), rtol=1e-3, atol=1e-5)


def test_a_sequence_the_input_lacks_gets_no_importance_and_is_not_ranked():
    """A lesion without LAP (or a run hiding it): its zero occlusion drop and share must not rank
    it above T2WI, whose occlusion here raises F; shares are over the sequences the input holds."""
    from fll_jax.saliency.explain import Settings, _summary, input_present
    from fll_jax.saliency.importance import positive_shares

    x = _lesion_input()
    x[1] = 0.0  # no LAP image and no LAP mask
    present = input_present(x)
    assert present.tolist() == [True, False]
    score = ClassScore(_linear_apply, {"w7": -_weights(0)["w7"], "w2": _weights(0)["w2"]}, output="logit")
    result = integrated_gradients(score, x, index=3, baseline="mean", steps=2, quadrature="trapezoid")
    imp = sequence_importance(score, x, result.attributions, result.baseline, USED, index=3, present=present)
    assert imp.occlusion_drop[0] < 0 and np.isnan(imp.occlusion_drop[1])  # the old code: drop 0 ranked LAP first
    assert imp.attribution_share.tolist()[0] == 1.0 and np.isnan(imp.attribution_share[1])
    assert imp.occlusion_share[0] == 1.0 and np.isnan(imp.occlusion_share[1])  # no positive drop: uniform over T2WI
    assert positive_shares(np.array([0.0, 0.0, 2.0]), np.array([True, True, False])).tolist()[:2] == [0.5, 0.5]
    # Scores rank the sequences the explained lesions hold: with DWI hidden by the run, a metastasis
    # (key DWI, LAP, PVP) is scored on LAP and PVP among four (the old code left every lesion out).
    sequences = ("t2w", "dwi", "adc", "lap", "pvp")
    values = {"t2w": [0.1, 0.2], "dwi": [np.nan, np.nan], "adc": [0.2, 0.1], "lap": [0.4, 0.3], "pvp": [0.3, 0.4]}
    frame = pd.DataFrame({"label7": [6, 6], "true": "x", "predicted": "x", "explained": "x", "focus_share": 0.5,
                          "focus_volume_share": 0.1, "randomisation_spearman": 0.2,
                          **{f"{prefix}{s}": v for prefix in ("share_", "lesion_share_", "occlusion_")
                             for s, v in values.items()}})
    summary = _summary(frame, tiny_config("sequences=" + "+".join(sequences)), Settings(), sequences, "test", score=True)
    metastasis = summary["hit_rates"]["occlusion"]["metastasis"]
    assert metastasis["n"] == 2 and metastasis["hits"] == {"lap": 1.0, "pvp": 1.0} and metastasis["chance"] == 3 / 4


def test_gauss_legendre_converges_faster_than_trapezoid_on_a_smooth_function():
    x = _lesion_input()
    score = ClassScore(_smooth_apply, _weights(2), output="prob", chunk=8)
    err = {(kind, steps): integrated_gradients(score, x, index=1, steps=steps, quadrature=kind).relative_delta
           for kind in ("trapezoid", "gauss_legendre") for steps in (4, 8)}
    for steps in (4, 8):
        assert err["gauss_legendre", steps] < err["trapezoid", steps] / 10
    assert err["gauss_legendre", 8] < 1e-5
    # Trapezoid converges too, only slowly (second order).
    assert err["trapezoid", 8] < err["trapezoid", 4]


def test_gradients_of_a_linear_function_are_its_weights():
    x = _lesion_input()
    weights = _weights(3)
    score = ClassScore(_linear_apply, weights, head="binary", output="logit", chunk=8)
    np.testing.assert_allclose(vanilla_gradient(score, x, index=1), weights["w2"][1], rtol=1e-5)
    np.testing.assert_allclose(smoothgrad(score, x, index=1, samples=12), weights["w2"][1], rtol=1e-4)


def test_baselines():
    image = _lesion_input()[..., 0]
    assert not make_baseline(image, "zeros").any()
    mean = make_baseline(image, "mean")
    np.testing.assert_allclose(mean[:, 0, 0, 0], image.mean(axis=(1, 2, 3)), rtol=1e-6)
    blurred = make_baseline(image, "blurred")
    assert blurred.shape == image.shape and blurred.std() < image.std()
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline(image, "noise")


# --- the tiny model ----------------------------------------------------------------------------

def test_ig_completeness_on_the_tiny_model(tiny):
    model, variables, x, score = tiny
    ensemble = ClassScore.from_model(model, variables, chunk=16)
    for baseline, quadrature in (("zeros", "trapezoid"), ("zeros", "adaptive"), ("blurred", "adaptive"),
                                 ("mean", "adaptive")):
        result = integrated_gradients(ensemble, x, baseline=baseline, steps=64, quadrature=quadrature)
        assert result.index == int(np.argmax(result.probs))
        assert result.attributions.shape == x.shape[:-1]
        assert abs(result.f_x - result.f_baseline) > 1e-3
        # A random model's F wanders along the path, so 64 steps leave up to ~2 % of the change
        # unexplained (a trained model's path is smoother).
        assert result.relative_delta < 0.02, (baseline, quadrature, result.f_x, result.f_baseline, result.delta)
    # F of the fold ensemble is the members' mean probability.
    probs = [jax.nn.softmax(model.apply(v, x[None], train=False)["logits7"])[0, result.index] for v in variables]
    assert result.f_x == pytest.approx(float(np.mean(probs)), rel=1e-5)


def test_chunked_equals_unchunked(tiny):
    model, variables, x, score = tiny
    small = ClassScore.from_model(model, variables[0], chunk=3)
    a = integrated_gradients(score, x, index=4, steps=14, baseline="blurred")
    b = integrated_gradients(small, x, index=4, steps=14, baseline="blurred")
    np.testing.assert_allclose(a.attributions, b.attributions, rtol=1e-4, atol=1e-9)
    assert a.f_x == pytest.approx(b.f_x, rel=1e-6)


def test_gradcam_shape_and_sign(tiny):
    model, variables, x, score = tiny
    maps = grad_cam(score, x, USED)
    assert maps.shape == x.shape[:-1]
    assert np.all(np.isfinite(maps)) and maps.min() >= 0
    # Grad-CAM's channel weights come from the pooled features: each branch's output must be
    # the global mean of the feature map it sows.
    out, state = model.apply(variables[0], x[None], train=False, mutable=["intermediates"])
    for i, s in enumerate(USED):
        fmap = state["intermediates"][f"branch_{s}"]["stage4"][-1]
        np.testing.assert_allclose(out["features"][:, i], fmap.mean(axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sequence names"):
        grad_cam(score, x, ("t2w",))


def test_gradcam_cells_are_drawn_on_the_input_voxels_they_are_centred_on():
    # 64^3 through a total stride of 32 (padding k // 2) gives cells centred on voxels 0 and 32.
    cam = jnp.asarray(np.random.default_rng(0).random((2, 2, 2)), jnp.float32)
    up = np.asarray(to_input_grid(cam, (64, 64, 64)))
    assert up[0, 0, 0] == pytest.approx(float(cam[0, 0, 0])) and up[32, 32, 32] == pytest.approx(float(cam[1, 1, 1]))
    assert up[63, 63, 63] == pytest.approx(float(cam[1, 1, 1]))
    assert up[16, 0, 0] == pytest.approx(float(cam[:, 0, 0].mean()))
    # A stride of 16 (a stem of stride 1) over 40 voxels gives 3 cells, on voxels 0, 16 and 32.
    line = np.asarray(to_input_grid(jnp.arange(3.0).reshape(3, 1, 1), (40, 2, 2)))[:, 0, 0]
    np.testing.assert_allclose(line[[0, 8, 16, 32, 39]], [0, 0.5, 1, 2, 2])
    with pytest.raises(ValueError, match="3 cells does not come from 64"):
        to_input_grid(jnp.zeros((3, 1, 1)), (64, 64, 64))


def test_importance_shares_sum_to_one(tiny):
    _, _, x, score = tiny
    result = integrated_gradients(score, x, steps=8)
    imp = sequence_importance(score, x, result.attributions, result.baseline, USED, index=result.index)
    assert imp.attribution_share.sum() == pytest.approx(1.0)
    assert imp.occlusion_share.sum() == pytest.approx(1.0)
    assert np.all(imp.attribution_share >= 0) and np.all(imp.occlusion_share >= 0)
    assert [r["sequence"] for r in imp.as_rows()] == list(USED)
    np.testing.assert_allclose(attribution_shares(np.zeros((4, 2, 2, 2))), 0.25)


def test_randomisation_helpers(tiny):
    model, variables, x, _ = tiny
    fresh = scoring.reinitialised_variables(model, variables[0], x, seed=7)
    assert jax.tree.structure(fresh) == jax.tree.structure(variables[0])
    pairs = zip(jax.tree.leaves(fresh["params"]), jax.tree.leaves(variables[0]["params"]))
    assert not all(np.allclose(a, b) for a, b in pairs)
    m = np.random.default_rng(0).standard_normal((3, 4, 4, 4))
    assert scoring.randomisation_correlation(m, 2 * m) == pytest.approx(1.0)
    assert abs(scoring.randomisation_correlation(m, np.random.default_rng(1).standard_normal(m.shape))) < 0.2
    # A sequence the input lacks is zero in both maps: ranked, its ties would pass for agreement.
    a, b = m.copy(), np.random.default_rng(1).standard_normal(m.shape)
    a[1:], b[1:] = 0.0, 0.0
    assert scoring.randomisation_correlation(a, b) > 0.5
    assert abs(scoring.randomisation_correlation(a, b, present=np.array([True, False, False]))) < 0.3


def test_a_class_index_outside_the_head_is_refused(tiny):
    model, variables, x, _ = tiny
    binary = ClassScore.from_model(model, variables[0], head="binary")
    with pytest.raises(ValueError, match="class index 2: the binary head's classes are 0 to 1"):
        integrated_gradients(binary, x, index=2, steps=2)
    with pytest.raises(ValueError, match="class index 7: the seven head's classes are 0 to 6"):
        grad_cam(ClassScore.from_model(model, variables[0]), x, USED, index=7)


def test_a_runs_hidden_sequences_are_hidden_from_the_explained_input():
    from fll_jax.saliency.explain import input_present, lesion_input

    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, (len(SEQUENCES), SIZE, SIZE, SIZE), dtype=np.uint8)
    mask = np.zeros_like(image)
    mask[:, 4:12, 4:12, 4:12] = 255
    config = tiny_config("sequences=t2w+lap", size=SIZE)
    assert input_present(lesion_input(image, mask, config)).tolist() == [True, True]
    config.evaluation.hidden_sequences = ("lap",)
    x = lesion_input(image, mask, config)
    assert input_present(x).tolist() == [True, False] and not x[1].any() and x[0, ..., 0].any()


# --- outputs -----------------------------------------------------------------------------------

def _native_lesion(tmp_path, seq: str, shift_mm: float, lesion_centre=(4.0, -6.0, 10.0), radius=7.0, seed=0):
    """A native volume (oblique-free, anisotropic, flipped x) with one spherical lesion."""
    affine = np.array([[-1.5, 0, 0, 40.0], [0, 1.4, 0, -35.0 + shift_mm], [0, 0, 4.0, -20.0], [0, 0, 0, 1]])
    shape = (56, 52, 14)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    lesion = np.linalg.norm(world - np.asarray(lesion_centre), axis=-1) < radius
    image = (100 + 80 * lesion + np.random.default_rng(seed).normal(0, 5, shape)).astype(np.float32)
    paths = tmp_path / f"{seq}.nii.gz", tmp_path / f"{seq}_mask.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), paths[0])
    nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), paths[1])
    return paths, lesion


def _record(tmp_path, label: int = 0, patient_id: str = "p0", lesion_id: str = "p0_l1", shift=True, split="test"):
    from fll_jax.data.manifest import LesionRecord

    tmp_path.mkdir(parents=True, exist_ok=True)
    images, masks, lesions = {}, {}, {}
    for k, s in enumerate(SEQUENCES):
        (images[s], masks[s]), lesions[s] = _native_lesion(tmp_path, s, shift_mm=1.5 * k if shift else 0.0,
                                                           seed=10 * label + k)  # every image its own noise
    record = LesionRecord(patient_id=patient_id, lesion_id=lesion_id, label=label, mask_value=1, images=images,
                          masks=masks, scanner="GE Signa", field_strength=1.5, background="normal",
                          diameter_mm=None, split=split)
    return record, lesions


def test_native_nifti_maps_keep_the_grid_and_peak_at_the_lesion(tmp_path):
    from fll_jax.data.preprocess import preprocess_lesion

    record, lesions = _record(tmp_path)
    patch = preprocess_lesion(record, size=32)
    for s in ("t2w", "dp"):
        i = SEQUENCES.index(s)
        # The network sees 16^3 resampled from the 32^3 patch: a blob where the lesion is.
        mask16 = patch.mask[i].astype(np.float32).reshape(16, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5)) / 255
        affine = outputs.input_grid_affine(patch.patch_affine[i], 32, 16)
        path = outputs.write_native_map(mask16, affine, record.images[s], tmp_path / f"{s}_map.nii.gz")
        native, written = nib.load(record.images[s]), nib.load(path)
        assert written.shape == native.shape
        np.testing.assert_allclose(written.affine, native.affine, atol=1e-6)
        data = np.asarray(written.dataobj)
        peak = np.unravel_index(np.argmax(data), data.shape)
        near = ndimage.binary_dilation(lesions[s], iterations=1)
        assert near[peak], (s, peak)
        # Zero far from the patch.
        assert data[0, 0, 0] == 0 and data.max() > 0.5
    # The last image with its header in metres: the same map, written in millimetres.
    in_metres = nib.Nifti1Image(np.asarray(native.dataobj), np.diag([1e-3, 1e-3, 1e-3, 1.0]) @ native.affine)
    in_metres.header.set_xyzt_units("meter")
    metres = outputs.write_native_map(mask16, affine, in_metres, tmp_path / "metres_map.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(metres).dataobj), data)
    np.testing.assert_allclose(nib.load(metres).affine, native.affine, atol=1e-6)


def test_input_grid_affine_matches_the_resampling():
    patch_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    patch_affine[:3, 3] = [10, 20, 30]
    affine = outputs.input_grid_affine(patch_affine, 64, 32)
    # Input voxel 0 is the mean of stored voxels 0 and 1: its centre lies at stored 0.5.
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], patch_affine @ [0.5, 0.5, 0.5, 1])
    assert outputs.axial_axis(affine) == 2


def test_lesion_figure_and_slice(tmp_path, monkeypatch):
    x = _lesion_input()
    mask = np.zeros((2, SIZE, SIZE, SIZE))
    mask[:, 4:12, 4:12, 9] = 1.0
    assert outputs.largest_lesion_slice(mask, axis=2) == 9
    shown = outputs.lesion_figure(x[..., 0], mask, x[..., 0] - 0.3, USED, tmp_path / "o.png", title="t")
    assert shown == 9 and (tmp_path / "o.png").stat().st_size > 1000
    # A sequence the lesion lacks (no mask) is titled absent, not left a black panel unexplained.
    mask[1] = 0.0
    saved = []
    monkeypatch.setattr(outputs, "save_figure", lambda fig, path, dpi: saved.append(fig))
    outputs.lesion_figure(x[..., 0], mask, x[..., 0] - 0.3, USED, tmp_path / "o.png", title="t")
    assert [ax.get_title() for ax in saved[0].axes] == [SEQUENCE_NAMES[USED[0]], f"{SEQUENCE_NAMES[USED[1]]} (absent)"]


def test_importance_figure_names_the_map_it_shows(tmp_path):
    from fll_jax.saliency.explain import MAP_NAMES, METHODS
    from fll_jax.saliency.importance import SequenceImportance, share_label

    labels = {m: share_label(MAP_NAMES[m]) for m in METHODS}
    assert labels == {"ig": "|IG| share", "gradient": "|gradient| share", "smoothgrad": "|SmoothGrad| share",
                      "gradcam": "|Grad-CAM| share"}
    imp = SequenceImportance(USED, np.array([0.7, 0.3]), np.array([0.2, -0.1]), np.array([1.0, 0.0]))
    fig = outputs.importance_figure(imp, tmp_path / "i.png", title="t", share_label=labels["gradcam"])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == "|Grad-CAM| share" and "occlusion" in legend[1] and not any("IG" in t for t in legend)
    assert (tmp_path / "i.png").stat().st_size > 1000
    fig = outputs.importance_figure(imp, tmp_path / "i.png", title="t", share_label="s", present=[True, False])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][1].endswith("(absent)")


def test_lesion_folder_names_are_one_per_id():
    from fll_jax.saliency.explain import safe_name

    colliding = ["P01 L1", "P01_L1", "P01/L1", "P01:L1", "p01_l1", "p01_L1"]
    names = [safe_name(i) for i in colliding]
    # Once all 'P01_L1': one lesion's maps replaced another's; and folders differing only in case
    # are one folder where the file system ignores case.
    assert len({n.lower() for n in names}) == len(colliding)
    assert names[4] == "p01_l1" and all(n.startswith("P01_L1-") for n in names[:4])
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names)
    assert safe_name("..") not in ("..", ".") and safe_name("P01/L1") == names[2]  # no parent folder; stable


# --- scores ------------------------------------------------------------------------------------

def test_top3_hit_rates_on_a_hand_made_table():
    seq = list(SEQUENCES)
    rows = {  # importance over t2w, dwi, adc, t1w, lap, pvp, dp
        "cyst_a": [0.9, 0.0, 0.8, 0.0, 0.0, 0.7, 0.0],  # top 3: t2w, adc, pvp
        "cyst_b": [0.9, 0.8, 0.0, 0.7, 0.0, 0.0, 0.0],  # top 3: t2w, dwi, t1w
        "hcc_a": [0.0, 0.0, 0.0, 0.1, 0.5, 0.2, 0.3],  # top 3: lap, dp, pvp
    }
    labels = [CLASSES.index("cyst"), CLASSES.index("cyst"), CLASSES.index("hcc")]
    table = scoring.top_k_hit_rates(np.array(list(rows.values())), labels, seq)
    assert set(table) == {"cyst", "hcc"}
    assert table["cyst"]["hits"] == {"t2w": 1.0, "adc": 0.5, "pvp": 0.5}
    assert table["cyst"]["mean"] == pytest.approx(2 / 3)
    assert table["cyst"]["chance"] == pytest.approx(3 / 7) and table["cyst"]["n"] == 2
    assert table["hcc"]["mean"] == 1.0
    # A model on four sequences: key sequences it does not use are left out, chance is 3/4.
    used = ["t2w", "dwi", "adc", "lap"]
    sub = scoring.top_k_hit_rates(np.array([[0.1, 0.2, 0.3, 0.4]]), [CLASSES.index("metastasis")], used)
    assert sub["metastasis"]["hits"] == {"dwi": 1.0, "lap": 1.0}
    assert sub["metastasis"]["chance"] == 0.75
    # A lesion without a top 3 (an all-zero map: equal shares; a tie across the cut) is left out,
    # not given T2WI, DWI and ADC, the first sequences in order; a tie below the cut is no matter.
    tied = [[1 / 7] * 7, [0.5, 0.2, 0.1, 0.1, 0.1, 0.0, 0.0], [0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.0]]
    table = scoring.top_k_hit_rates(np.array(tied), [CLASSES.index("cyst")] * 3, seq)["cyst"]
    assert table["n"] == 1 and table["hits"] == {"t2w": 0.0, "adc": 0.0, "pvp": 1.0}
    alone = scoring.top_k_hit_rates(np.array(tied[:1]), [CLASSES.index("cyst")], seq)["cyst"]
    assert alone["n"] == 0 and alone["hits"] == {} and np.isnan(alone["mean"]) and np.isnan(alone["p_above_chance"])


def test_lesion_focus():
    mask = np.zeros((2, 20, 20, 20))
    mask[:, 8:12, 8:12, 8:12] = 1.0
    region = scoring.lesion_region(mask, [(1.0, 1.0, 1.0)] * 2)
    inside, volume = scoring.lesion_focus(mask * 3.0, region)
    assert inside == pytest.approx(1.0)
    # 5 mm around a 4 mm cube: a region much larger than the lesion, far smaller than the patch.
    assert 64 / 8000 < volume < 0.5
    uniform_inside, uniform_volume = scoring.lesion_focus(np.ones_like(mask), region)
    assert uniform_inside == pytest.approx(uniform_volume)
    # Coarser voxels: the same 5 mm covers fewer of them.
    assert scoring.lesion_region(mask, [(2.0, 2.0, 2.0)] * 2).mean() < volume
    # A sequence without lesion voxels is left out; none at all gives NaN.
    mask[1] = 0
    one = scoring.lesion_region(mask, [(1.0, 1.0, 1.0)] * 2)
    assert not one[1].any() and scoring.lesion_focus(np.ones_like(mask), one)[1] == pytest.approx(volume)
    assert np.isnan(scoring.lesion_focus(mask, np.zeros_like(one))[0])


# --- the whole explain job on a tiny workdir -----------------------------------------------------

def _predictions_csv(path, rows) -> None:
    """A predictions.csv with (lesion_id, split, fold, label7, predicted class) rows: every model
    (the ensemble, folds 0 and 1) gives the predicted class 0.4 and the others 0.1."""
    frame = pd.DataFrame(rows, columns=["lesion_id", "split", "fold", "label7", "predicted"])
    frame["patient_id"] = frame["lesion_id"].str.split("/").str[0]
    frame["label2"] = to_binary(frame["label7"].to_numpy())
    for column in ("background", "scanner", "diameter_mm"):
        frame[column] = "unknown" if column != "diameter_mm" else 10.0
    for model in ("ensemble", "fold0", "fold1"):
        for k in range(NUM_CLASSES):
            frame[f"{model}_p7_{k}"] = np.where(frame["predicted"] == k, 0.4, 0.1)
        frame[f"{model}_p2_1"] = np.where(to_binary(frame["predicted"].to_numpy()) == 1, 0.7, 0.3)
        frame[f"{model}_p2_0"] = 1 - frame[f"{model}_p2_1"]
    frame = frame.drop(columns="predicted")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def test_bad_settings_are_named_before_any_model_is_loaded(tmp_path):
    from fll_jax.saliency import explain

    with pytest.raises(ValueError, match=r"unknown head 'three'.*; unknown baseline 'noise'.*; steps 1: ig needs at least 2"):
        explain.Settings(head="three", baseline="noise", steps=1).check()
    explain.Settings(quadrature="gauss_legendre", steps=1).check()  # one Gauss node is a rule
    with pytest.raises(ValueError, match="num_per_class -1: must be at least 1"):
        explain.explain_workdir(tmp_path / "no_run", num_per_class=-1)


def test_explain_workdir_end_to_end(tmp_path, monkeypatch, tiny):
    from fll_jax.data import manifest as manifest_module
    from fll_jax.saliency import explain

    model, variables, _, _ = tiny
    config = tiny_config("sequences=" + "+".join(USED) + ",folds=0+1", size=SIZE)
    config.data.num_folds, config.data.root = 2, str(tmp_path / "data")
    records = [_record(tmp_path / f"p{label}", label=label, patient_id=f"p{label}", lesion_id=f"p{label}/l1",
                       shift=False, split=split)[0] for label, split in ((0, "test"), (4, "test"), (6, "dev"), (5, "dev"))]
    manifest = tmp_path / "manifest.csv"
    manifest_module.write_manifest(records, manifest)
    import fll_jax.data.prepare as prepare
    import fll_jax.train.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "load_fold_models", lambda workdir: (model, variables, config), raising=False)
    monkeypatch.setattr(prepare, "manifest_path", lambda config: manifest)
    run = tmp_path / "run"
    # The run called p4/l1 a haemangioma (class 2) and p6/l1 an abscess (class 3).
    _predictions_csv(run / "predictions.csv", [("p0/l1", "test", -1, 0, 0), ("p4/l1", "test", -1, 4, 2),
                                               ("p6/l1", "val", 1, 6, 3), ("p5/l1", "val", 0, 5, 5)])
    write_json(run / "fingerprint.json", run_fingerprint(config, prepare.describe_data(config)[2]))
    write_json(run / "config.json", config.to_dict())
    settings = explain.Settings(steps=8, chunk=16)
    # A split's explanations written into another split's folder would be shown as that split's.
    with pytest.raises(explain.ExplainError, match=r"out_dir .*explain/val is inside .*explain, .*for split 'test'"):
        explain.explain_workdir(run, num_per_class=1, settings=settings, out_dir=run / "explain" / "val")
    # A folder of the user's own files is not the job's to replace unasked.
    mine = tmp_path / "mine"
    (mine / "lesions").mkdir(parents=True)
    (mine / "lesions" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"mine holds files but no summary.json"):
        explain.explain_workdir(run, num_per_class=1, settings=settings, out_dir=mine)
    assert (mine / "lesions" / "notes.txt").read_text() == "keep me"
    summary = explain.explain_workdir(run, num_per_class=1, score=True, settings=settings)
    out = run / "explain" / "test"
    assert summary["num_lesions"] == 2
    # chunk changes no map, nor do the settings of other methods: not part of the request.
    assert summary["request"]["settings"] == {"method": "ig", "head": "seven", "output": "prob", "baseline": "mean",
                                              "steps": 8, "quadrature": "trapezoid", "explained": "predicted", "seed": 0}
    assert set(explain.request_settings(explain.Settings(method="gradient", steps=3), score=False)) == {
        "method", "head", "output", "baseline", "explained"}
    assert json.loads((out / "summary.json").read_text())["num_lesions"] == 2
    first = explain.safe_name("p0/l1")  # 'p0_l1' and a hash of the id: '/' is no file name character
    for lesion in ("p0/l1", "p4/l1"):
        folder = out / "lesions" / explain.safe_name(lesion)
        assert (folder / "overlay.png").is_file() and (folder / "importance.png").is_file()
        # At 16^3 Grad-CAM's grid is one voxel: a constant map had been drawn beside IG's.
        assert not (folder / "overlay_gradcam.png").exists()
        for s in USED:
            img = nib.load(folder / f"{s}_ig.nii.gz")
            assert img.shape == nib.load(records[0].images[s]).shape
    assert summary["overlays"] == {"overlay.png": "IG"}
    assert summary["notes"] == ["No Grad-CAM overlay: each branch's last stage is 1 x 1 x 1 voxels at input 16^3, so "
                                "its map would be one value per sequence."]
    assert set(summary["hit_rates"]) == {"attribution_share", "lesion_attribution_share", "occlusion"}
    # p4/l1, an HCC called a haemangioma, has a map of why it looked like a haemangioma: not scored
    # against the HCC's key sequences.
    assert set(summary["hit_rates"]["lesion_attribution_share"]) == {"cyst"}
    assert summary["scored"] == {"lesions": 1, "other_class": 1}
    assert -1 <= summary["randomisation"]["median_spearman"] <= 1
    # The maps explain the class the run predicted (predictions.csv), whatever the float32 model's argmax.
    table = pd.read_csv(out / "lesions.csv").set_index("lesion_id")
    assert table.loc["p4/l1", "predicted"] == table.loc["p4/l1", "explained"] == "Haemangioma"
    assert "Key-sequence hit rate" in (out / "scores.md").read_text()
    assert "1 whose map explains another (a wrong prediction) are left out" in (out / "scores.md").read_text()
    report = (run / "report.md").read_text()
    assert "## Saliency" in report and "explain/test/importance_by_class.png" in report
    assert f"(explain/test/lesions/{first}/overlay.png) |" in report and "overlay_gradcam" not in report
    assert summary["notes"][0] in report
    # Explaining holds the run's folder as training does: neither runs into the other.
    with hold_run(run), pytest.raises(WorkdirError, match="is in use"):
        explain.explain_workdir(run, num_per_class=1, score=True, settings=settings)
    # Two explanations into one folder neither run into each other (the second had replaced the first's).
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with hold_run(out), pytest.raises(WorkdirError, match=r"explain/test is in use by another command \(an explain.py "
                                                          r"writing into it\).*give another --out_dir"):
        explain.explain_workdir(run, num_per_class=2, score=True, settings=settings, overwrite=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # Split 'val': each development lesion, by the one fold model that held it out. Fold 1 was
    # trained by other code than this: the maps say so.
    write_json(run / "fold1" / "done.json", {"code": ["fll_jax 000000000000"]})
    val = explain.explain_workdir(run, num_per_class=None, split="val", settings=settings)
    assert [note for note in val["notes"] if "trained by fll_jax 000000000000 and are applied here by" in note]
    lesions = pd.read_csv(run / "explain" / "val" / "lesions.csv")
    assert val["num_lesions"] == 2 and list(lesions["model"]) == ["fold1", "fold0"]
    patch = preprocess_lesion(records[2])
    alone = ClassScore.from_model(model, variables[1], chunk=16)
    expected = alone.predict(explain.lesion_input(patch.image, patch.mask, config))[3]
    assert lesions["p_predicted"][0] == pytest.approx(expected, rel=1e-5)
    # Explanations of split 'test' in explain/val/ (an earlier version's --out_dir) are not shown as 'val''s.
    val_summary = json.loads((run / "explain" / "val" / "summary.json").read_text())
    write_json(run / "explain" / "val" / "summary.json", {**val_summary, "split": "test"})
    shown = "\n".join(saliency_markdown(run, models_digest(run)))
    assert "`explain/val/` holds explanations of split 'test', not 'val'" in shown
    assert "explain/val/importance_by_class.png" not in shown
    # A damaged summary is named in the report, which is still written: failing, it had left the
    # run unfinished, and explain (the remedy it named) refuses unfinished runs.
    (run / "explain" / "val" / "summary.json").write_text("{")
    (run / "metrics.json").unlink()
    write_report(run)
    assert "`explain/val/` is damaged" in (run / "report.md").read_text() and (run / "metrics.json").is_file()
    # The test run's files are still there, and other arguments do not replace them unasked.
    assert (out / "lesions" / first / "overlay.png").is_file()
    with pytest.raises(FileExistsError, match="other arguments: settings.steps 8 -> 4; pass overwrite") as refused:
        explain.explain_workdir(run, num_per_class=1, score=True, settings=explain.Settings(steps=4, chunk=8))
    assert "chunk" not in str(refused.value)  # it changes no map
    assert json.loads((out / "summary.json").read_text())["settings"]["steps"] == 8
    # Asked to, a rerun replaces them whole: an earlier request's lesion folder and scores go. Named
    # explicitly, the default folder is still the report's: report.md is rewritten.
    (out / "lesions" / "earlier_lesion").mkdir()
    explain.explain_workdir(run, num_per_class=1, settings=explain.Settings(steps=4, chunk=16), overwrite=True,
                            out_dir=run / "explain" / "val" / ".." / "test")
    assert sorted(p.name for p in (out / "lesions").iterdir()) == sorted(map(explain.safe_name, ("p0/l1", "p4/l1")))
    assert not (out / "scores.md").exists() and "Key-sequence hit rate" not in (run / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text())["settings"]["steps"] == 4
    # A folder of another run's explanations, asked for alike, is not replaced unasked either.
    shared = tmp_path / "shared"
    (shared / "lesions").mkdir(parents=True)
    request = json.loads((out / "summary.json").read_text())["request"]
    write_json(shared / "summary.json", {"request": {**request, "run": "another"}, "workdir": "/elsewhere/run"})
    with pytest.raises(FileExistsError, match="explanations of other fold models \\(/elsewhere/run:"):
        explain.explain_workdir(run, num_per_class=1, settings=explain.Settings(steps=4, chunk=16), out_dir=shared)

    def no_models(workdir):
        raise RuntimeError("fold models loaded")

    # From here on, getting as far as loading the models means that nothing refused the call.
    monkeypatch.setattr(checkpoints, "load_fold_models", no_models, raising=False)
    # Only chunk changed (memory for speed): not refused. Nor is a folder holding only a killed run's staging folder.
    with pytest.raises(RuntimeError, match="fold models loaded"):
        explain.explain_workdir(run, num_per_class=1, settings=explain.Settings(steps=4, chunk=2))
    (tmp_path / "killed" / ".lesions.x1y2.tmp").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="fold models loaded"):
        explain.explain_workdir(run, num_per_class=1, settings=explain.Settings(steps=4), out_dir=tmp_path / "killed")
    # A split with no lesion in predictions.csv is found before any model is loaded.
    predictions = pd.read_csv(run / "predictions.csv")
    predictions[predictions["split"] == "test"].to_csv(run / "predictions.csv", index=False)
    with pytest.raises(ValueError, match=r"predictions.csv: no lesion of split 'val' to explain"):
        explain.explain_workdir(run, num_per_class=1, split="val", settings=settings)
    # Scores against the phantom's key sequences are refused on other data, before any model is loaded.
    real = config.to_dict()
    real["data"] |= {"source": "manifest", "manifest": str(manifest)}
    write_json(run / "config.json", real)
    with pytest.raises(explain.ExplainError, match=r"data.source 'manifest' \(.*manifest.csv\), where they mean nothing"):
        explain.explain_workdir(run, num_per_class=1, score=True, settings=settings)
    write_json(run / "config.json", config.to_dict())
    monkeypatch.setattr(checkpoints, "load_fold_models", lambda workdir: (model, variables, config), raising=False)
    # Nor are this run's, once it was trained again under the same settings (its predictions changed).
    _predictions_csv(run / "predictions.csv", [("p0/l1", "test", -1, 0, 0), ("p4/l1", "test", -1, 4, 4),
                                               ("p6/l1", "val", 1, 6, 3), ("p5/l1", "val", 0, 5, 5)])
    with pytest.raises(FileExistsError, match="this one before it was trained again"):
        explain.explain_workdir(run, num_per_class=1, settings=explain.Settings(steps=4, chunk=16))
    # The report no longer shows them as this run's maps.
    write_report(run)
    report = (run / "report.md").read_text()
    assert "`explain/test/` was not made with this run's fold models" in report and "importance_by_class.png" not in report

    # Images changed since training: the run's models are not applied to them.
    image = nib.load(records[0].images["t2w"])
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) + 3, image.affine), records[0].images["t2w"])
    with pytest.raises(WorkdirError, match=r"(?s)data changed since .*lesion 'p0/l1': t2w_image content changed"):
        explain.explain_workdir(run, num_per_class=1, score=True, settings=settings, overwrite=True)
