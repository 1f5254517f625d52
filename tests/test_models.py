"""Models and loss: space-to-depth and folded convolutions equal the direct ones, fusions, registries, loss."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fll_jax.constants import SEQUENCES, to_binary
from fll_jax.models import FUSIONS, ResNet3D, build_model, count_params
from fll_jax.models.conv import conv3d, conv3d_s2d
from fll_jax.models.initializers import variance_scaling_flat
from fll_jax.train.loss import multitask_loss

# Space-to-depth and folding the depth only reorder the sums, so in float32 they must agree to
# rounding: max |a - b| within TOL of the larger of 1 and max |a|.
TOL = 1e-5


def _max_rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(a))))


def _tiny_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(depth=10, width=2, stem_kernel=7, stem_stride=2, shortcut="B", space_to_depth=True,
             dtype="float32", fusion="paper", dropout=0.0)
    )
    config.update(overrides)
    return config


def _random(seed: int, shape) -> jax.Array:
    # numpy, not jax.random: XLA:CPU compiles threefry for a 5-D shape in seconds.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ---------------------------------------------------------------- space-to-depth and folded convolutions


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _conv_vjp(conv, stride, fold_depth, x, kernel, cotangent):
    out, pullback = jax.vjp(lambda x, k: conv(x, k, stride, fold_depth), x, kernel)
    return (out,) + pullback(cotangent)


@pytest.mark.parametrize(
    "kernel_size,size,in_ch",
    [
        (7, 16, 2),  # the stem
        (7, 15, 2),  # odd input: padded to a whole number of blocks
        (3, 8, 3),  # a stage's first convolution
        (3, 7, 3),
        (3, 1, 3),  # the last stage of a 16^3 input sees a single voxel
        (1, 8, 3),  # the projection shortcut: subsample then 1^3
        (1, 5, 3),
        (5, 9, 2),
    ],
)
def test_s2d_and_folded_convs_match_direct_values_and_gradients(kernel_size, size, in_ch):
    x = _random(0, (2, size, size + 1, size, in_ch))  # a non-cubic input too
    kernel = _random(1, (kernel_size,) * 3 + (in_ch, 4))
    for stride in (2, 1):
        out_shape = jax.eval_shape(lambda: conv3d(x, kernel, stride)).shape
        assert out_shape[1:4] == tuple(-(-n // stride) for n in x.shape[1:4])  # ceil(n / stride), as PyTorch
        cotangent = _random(2, out_shape)
        direct = _conv_vjp(conv3d, stride, False, x, kernel, cotangent)
        # Strided convolutions by blocks (natively and folded); every stride folded.
        forms = [(conv3d_s2d, False), (conv3d_s2d, True), (conv3d, True)] if stride > 1 else [(conv3d, True)]
        for conv, fold in forms:
            other = _conv_vjp(conv, stride, fold, x, kernel, cotangent)
            for name, a, b in zip(("output", "input gradient", "kernel gradient"), direct, other):
                assert a.shape == b.shape, (conv.__name__, fold, stride, name)
                assert _max_rel_err(a, b) < TOL, (conv.__name__, fold, stride, name, _max_rel_err(a, b))


def _random_variables(model, x, seed: int = 0) -> dict:
    """Variables of the model's shapes filled from numpy: no init to compile, and batch-norm
    statistics and scales that are not the identity."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        if "var" in name or "scale" in name:
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

    return jax.tree.map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=(0,))
def _resnet_out_and_grads(model, variables, x, cotangent):
    def forward(params, x):
        return model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=False)

    out, pullback = jax.vjp(forward, variables["params"], x)
    grad_params, grad_x = pullback(cotangent)
    return out, grad_params, grad_x


@pytest.mark.parametrize("size,space_to_depth,fold_depth", [(16, True, False), (15, True, False), (16, True, True),
                                                            (15, False, True)])
def test_resnet_s2d_and_folded_match_direct_values_and_gradients(size, space_to_depth, fold_depth):
    direct = ResNet3D(depth=10, width=4, space_to_depth=False)
    s2d = ResNet3D(depth=10, width=4, space_to_depth=space_to_depth, fold_depth=fold_depth)
    x = _random(0, (2, size, size, size, 2))
    # Same parameter tree and shapes: checkpoints do not depend on the implementation.
    assert jax.tree.map(jnp.shape, jax.eval_shape(direct.init, jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, jax.eval_shape(s2d.init, jax.random.key(0), x)
    )
    variables = _random_variables(direct, x)
    assert variables["params"]["stem_conv"]["kernel"].shape == (7, 7, 7, 2, 4)
    cotangent = _random(2, (2, 1, 1, 1, 32))
    a = _resnet_out_and_grads(direct, variables, x, cotangent)
    b = _resnet_out_and_grads(s2d, variables, x, cotangent)
    assert a[0].shape == (2, 1, 1, 1, 32)
    assert _max_rel_err(a[0], b[0]) < TOL
    assert _max_rel_err(a[2], b[2]) < TOL
    flat_a, flat_b = jax.tree.leaves_with_path(a[1]), jax.tree.leaves(b[1])
    for (path, ga), gb in zip(flat_a, flat_b):
        assert _max_rel_err(ga, gb) < TOL, (jax.tree_util.keystr(path), _max_rel_err(ga, gb))
    assert np.abs(np.asarray(a[1]["stem_conv"]["kernel"])).max() > 0  # gradients are not trivially zero


def test_flat_initialisers_have_the_he_and_lecun_scales():
    key = jax.random.key(0, impl="rbg")
    conv = variance_scaling_flat(2.0, "fan_out")(key, (3, 3, 3, 8, 16))
    dense = variance_scaling_flat(1.0, "fan_in")(key, (400, 7))
    assert conv.shape == (3, 3, 3, 8, 16) and dense.shape == (400, 7)
    np.testing.assert_allclose(conv.std(), np.sqrt(2 / (27 * 16)), rtol=0.05)
    np.testing.assert_allclose(dense.std(), np.sqrt(1 / 400), rtol=0.05)


def test_shortcut_a_has_no_projection_and_keeps_shapes():
    x = _random(0, (1, 16, 16, 16, 2))
    params_b = jax.eval_shape(ResNet3D(depth=10, width=2, shortcut="B").init, jax.random.key(0), x)["params"]
    params_a = jax.eval_shape(ResNet3D(depth=10, width=2, shortcut="A").init, jax.random.key(0), x)["params"]
    assert "shortcut_conv" in params_b["stage2_block1"]
    assert "shortcut_conv" not in params_a["stage2_block1"]
    out = jax.eval_shape(ResNet3D(depth=10, width=2, shortcut="A").init_with_output, jax.random.key(0), x)[0]
    assert out.shape == (1, 1, 1, 1, 16)


# ---------------------------------------------------------------- the classifier and fusions


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(model, variables, x):
    outputs, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    return outputs, state["intermediates"]


CASES = [
    ("paper", SEQUENCES),
    ("paper", ("lap", "pvp")),  # no member of the binary group: its head sees fused_all only
    ("concat", ("t2w", "dwi")),
    ("attention", ("dwi", "lap", "pvp")),
    ("late", ("t2w", "adc", "dp")),
    ("shared", ("t1w", "lap", "pvp")),
]


@pytest.fixture(scope="module")
def classifier_runs():
    """One compile per case, shared by the tests below."""
    runs = {}
    for fusion, sequences in CASES:
        model = build_model(_tiny_config(fusion=fusion), sequences)
        x = jnp.asarray(np.random.default_rng(3).uniform(size=(3, len(sequences), 16, 16, 16, 2)), jnp.float32)
        variables = _random_variables(model, x)
        runs[fusion, sequences] = (model, x, variables) + _apply(model, variables, x)
    return runs


def test_every_fusion_is_covered():
    assert {fusion for fusion, _ in CASES} == set(FUSIONS)


@pytest.mark.parametrize("fusion,sequences", CASES)
def test_classifier_output_shapes_and_finite(classifier_runs, fusion, sequences):
    _, x, variables, outputs, intermediates = classifier_runs[fusion, sequences]
    width = 2 * 8  # last stage of width 2
    assert outputs["logits2"].shape == (3, 2) and outputs["logits2"].dtype == jnp.float32
    assert outputs["logits7"].shape == (3, 7) and outputs["logits7"].dtype == jnp.float32
    assert outputs["features"].shape == (3, len(sequences), width)
    assert ("sequence_weights" in outputs) == (fusion in ("attention", "shared"))
    for value in jax.tree.leaves(outputs):
        assert np.all(np.isfinite(value))
    if "sequence_weights" in outputs:
        np.testing.assert_allclose(outputs["sequence_weights"].sum(axis=1), 1.0, rtol=1e-6)
    # Every used sequence sows its last-stage map under branch_<seq>; features are its mean.
    for i, seq in enumerate(sequences):
        (fmap,) = intermediates[f"branch_{seq}"]["stage4"]
        assert fmap.shape == (3, 1, 1, 1, width)
        np.testing.assert_allclose(fmap.mean(axis=(1, 2, 3)), outputs["features"][:, i], rtol=1e-6, atol=1e-7)


def test_paper_fusion_heads_see_the_groups(classifier_runs):
    width = 16
    heads = classifier_runs["paper", SEQUENCES][2]["params"]["fusion"]
    # Every sequence's features, the group's again, then one presence flag per sequence.
    assert heads["head2"]["kernel"].shape == ((7 + 3) * width + 7, 2)
    assert heads["head7"]["kernel"].shape == ((7 + 3) * width + 7, 7)
    heads = classifier_runs["paper", ("lap", "pvp")][2]["params"]["fusion"]
    assert heads["head2"]["kernel"].shape == (2 * width + 2, 2)
    assert heads["head7"]["kernel"].shape == ((2 + 2) * width + 2, 7)


def test_shared_fusion_has_one_branch_of_weights(classifier_runs):
    shared = classifier_runs["shared", ("t1w", "lap", "pvp")][2]["params"]
    separate = classifier_runs["late", ("t2w", "adc", "dp")][2]["params"]
    assert not any(name.startswith("branch_") for name in shared)
    assert jax.tree.map(jnp.shape, shared["backbone"]) == jax.tree.map(jnp.shape, separate["branch_t2w"]["backbone"])
    assert shared["fusion"]["sequence_embedding"].shape == (3, 16)
    # The same weights see different inputs, so the per-sequence features differ.
    features = classifier_runs["shared", ("t1w", "lap", "pvp")][3]["features"]
    assert not np.allclose(features[:, 0], features[:, 1])


def test_shared_backbone_normalises_alike_in_training_and_evaluation():
    # Sequences of different intensity ranges through one backbone: once the running averages
    # have settled on a batch, evaluation gives the features training gives (a call per sequence
    # had normalised each by its own batch statistics in training, by their mixture after).
    model = build_model(_tiny_config(fusion="shared"), ("t1w", "lap", "pvp"))
    x = np.random.default_rng(5).uniform(size=(4, 3, 16, 16, 16, 2)).astype(np.float32)
    x[..., 0] *= np.array([1.0, 5.0, 20.0])[None, :, None, None, None]
    variables = _random_variables(model, x)

    @jax.jit
    def settle(variables):
        def update(variables, _):
            outputs, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return {**variables, "batch_stats": state["batch_stats"]}, outputs["features"]

        variables, features = jax.lax.scan(update, variables, None, length=200)  # momentum 0.9: 0.9^200
        return model.apply(variables, x, train=False)["features"], features[-1]

    evaluated, trained = settle(variables)
    assert _max_rel_err(trained, evaluated) < 1e-3


@functools.partial(jax.jit, static_argnums=(0,))
def _train_apply(model, variables, x):
    outputs, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return outputs["features"], state["batch_stats"]


@pytest.mark.parametrize("fusion", ["concat", "shared"])
def test_absent_images_stay_out_of_the_training_batch_statistics(fusion):
    """Lesion 0 lacks t2w (zeroed, as the data and sequence dropout leave it): whatever that
    image holds, the other images' training features and the running statistics are the same,
    and a separate t2w branch normalises as on a batch without lesion 0."""
    sequences = ("t2w", "dwi")
    model = build_model(_tiny_config(fusion=fusion), sequences)
    x = np.random.default_rng(6).uniform(size=(3, 2, 16, 16, 16, 2)).astype(np.float32)
    variables = _random_variables(model, x)
    absent = x.copy()
    absent[0, 0] = 0.0
    scrambled = absent.copy()
    scrambled[0, 0, ..., 0] = 5.0
    features, stats = _train_apply(model, variables, absent)
    features_scrambled, stats_scrambled = _train_apply(model, variables, scrambled)
    assert not np.any(features[0, 0])
    np.testing.assert_allclose(features[1:], features_scrambled[1:], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_scrambled)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if fusion == "concat":
        features_without, stats_without = _train_apply(model, variables, absent[1:])
        np.testing.assert_allclose(features[1:, 0], features_without[:, 0], rtol=1e-4, atol=1e-5)
        for a, b in zip(jax.tree.leaves(stats["branch_t2w"]), jax.tree.leaves(stats_without["branch_t2w"])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # A batch where no lesion has t2w: statistics of its zeros, not 0/0.
    none = absent.copy()
    none[:, 0] = 0.0
    features_none, stats_none = _train_apply(model, variables, none)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves((features_none, stats_none)))


@pytest.mark.parametrize("fusion", ["concat", "shared"])
def test_batch_norm_statistics_of_all_images_take_the_zeros_in_and_equal_the_default_on_complete_data(fusion):
    """model.batch_norm_statistics='all' (a quicker step): on a batch with every image present,
    the default's features and running averages; with one image absent, its zeros shift the
    statistics, so the lesions that have that sequence get other features."""
    sequences = ("t2w", "dwi")
    present, every = (build_model(_tiny_config(fusion=fusion, batch_norm_statistics=choice), sequences)
                      for choice in (None, "all"))
    x = np.random.default_rng(8).uniform(size=(3, 2, 16, 16, 16, 2)).astype(np.float32)
    variables = _random_variables(present, x)
    for a, b in zip(jax.tree.leaves(_train_apply(present, variables, x)), jax.tree.leaves(_train_apply(every, variables, x))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # the masked sums add in another order
    absent = x.copy()
    absent[0, 0] = 0.0
    features, _ = _train_apply(present, variables, absent)
    features_every, _ = _train_apply(every, variables, absent)
    assert np.max(np.abs(features[1:, 0] - features_every[1:, 0])) > 1e-3
    if fusion == "concat":  # a branch of its own: the sequence every lesion has is normalised alike
        np.testing.assert_allclose(features[:, 1], features_every[:, 1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"batch_norm_statistics must be unset \(the present images\) or 'all', "
                                         r"not 'present'"):
        build_model(_tiny_config(batch_norm_statistics="present"), sequences)


def test_late_fusion_averages_per_sequence_heads(classifier_runs):
    _, _, variables, outputs, _ = classifier_runs["late", ("t2w", "adc", "dp")]
    heads = variables["params"]["fusion"]
    logits = [
        outputs["features"][:, i] @ heads[f"head7_{s}"]["kernel"] + heads[f"head7_{s}"]["bias"]
        for i, s in enumerate(("t2w", "adc", "dp"))
    ]
    np.testing.assert_allclose(outputs["logits7"], np.mean(logits, axis=0), rtol=1e-5, atol=1e-6)


def test_dropout_needs_and_uses_its_rng():
    fusion = FUSIONS["concat"](("t2w", "dwi"), dropout=0.5)
    feats, present = _random(0, (4, 2, 8)), jnp.ones((4, 2), bool)
    key = functools.partial(jax.random.key, impl="rbg")  # fast to compile on XLA:CPU
    variables = fusion.init(key(0), feats, present)
    evaluate = fusion.apply(variables, feats, present, train=False)
    first = fusion.apply(variables, feats, present, train=True, rngs={"dropout": key(1)})
    second = fusion.apply(variables, feats, present, train=True, rngs={"dropout": key(2)})
    assert not np.allclose(first["logits7"], second["logits7"])
    assert not np.allclose(first["logits7"], evaluate["logits7"])
    with pytest.raises(Exception, match="dropout"):
        fusion.apply(variables, feats, present, train=True)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = build_model(_tiny_config(dtype="bfloat16", fusion="concat"), ("t2w",))
    x = jnp.zeros((1, 1, 16, 16, 16, 2))
    variables, outputs = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[::-1])
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    assert outputs["logits7"].dtype == jnp.float32


@pytest.mark.parametrize(
    "overrides,sequences,message",
    [
        (dict(fusion="nope"), ("t2w",), "paper, concat, attention, late, shared"),
        (dict(backbone="vit"), ("t2w",), "known: resnet"),
        (dict(depth=50), ("t2w",), "known: 10, 18, 34"),
        (dict(shortcut="C"), ("t2w",), "known: A, B"),
        (dict(dtype="float16"), ("t2w",), "known: bfloat16, float32"),
        (dict(conv_impl="cudnn"), ("t2w",), "known: auto, native, folded"),
        (dict(attention_hidden=0), ("t2w",), "attention_hidden must be an integer >= 1, or None"),
        ({}, ("t2w", "flair"), "unknown sequence 'flair'"),
        ({}, ("t2w", "t2w"), "repeat"),
        ({}, (), "at least one"),
    ],
)
def test_bad_names_fail_listing_the_known_ones(overrides, sequences, message):
    config = _tiny_config()
    for key, value in overrides.items():
        config[key] = value
    with pytest.raises(ValueError, match=message):
        build_model(config, sequences)


@pytest.mark.parametrize("fusion", ["attention", "shared"])
def test_the_attention_width_is_the_configs_or_128_capped_at_the_features(fusion):
    """Unset, model.attention_hidden is the width every run before it had: 128, or the features'
    (8 x model.width) if narrower."""
    x = jnp.zeros((1, 2, 16, 16, 16, 2))
    for width, hidden, expected in ((2, None, 16), (32, None, 128), (2, 5, 5), (2, 40, 40)):
        model = build_model(_tiny_config(fusion=fusion, width=width, attention_hidden=hidden), ("t2w", "dwi"))
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]["fusion"]["attention"]
        assert params["key"]["kernel"].shape == (8 * width, expected)


def test_wrong_input_shape_is_reported():
    model = build_model(_tiny_config(), ("t2w", "dwi"))
    with pytest.raises(ValueError, match=r"2 sequences \(t2w, dwi\)"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 16, 16, 16, 2)))


def test_paper_config_has_232m_parameters():
    from configs import paper

    config = paper.get_config()
    n = count_params(config.model, config.sequences)
    assert abs(n - 232.3e6) / 232.3e6 < 0.02, n


# ---------------------------------------------------------------- the loss

LABEL7 = jnp.array([0, 3, 4, 6, 2, 5])


def _logits(key: int, n: int = 6) -> dict:
    return {"logits2": _random(key, (n, 2)), "logits7": _random(key + 1, (n, 7))}


def _ce(logits, labels) -> np.ndarray:
    logp = np.asarray(jax.nn.log_softmax(logits))
    return -logp[np.arange(len(labels)), np.asarray(labels)]


def test_loss_derives_the_binary_label_and_adds_the_weighted_terms():
    outputs = _logits(0)
    loss, parts = jax.jit(functools.partial(multitask_loss, binary_weight=0.3, multiclass_weight=2.0))(
        outputs, LABEL7
    )
    np.testing.assert_allclose(parts["loss2"], _ce(outputs["logits2"], to_binary(LABEL7)).mean(), rtol=1e-6)
    np.testing.assert_allclose(parts["loss7"], _ce(outputs["logits7"], LABEL7).mean(), rtol=1e-6)
    np.testing.assert_allclose(loss, 0.3 * parts["loss2"] + 2.0 * parts["loss7"], rtol=1e-6)
    assert loss.dtype == jnp.float32


def test_label_smoothing_matches_the_smoothed_targets():
    outputs = _logits(2)
    _, parts = multitask_loss(outputs, LABEL7, label_smoothing=0.1)
    logp = np.asarray(jax.nn.log_softmax(outputs["logits7"]))
    expected = (0.9 * _ce(outputs["logits7"], LABEL7) - 0.1 / 7 * logp.sum(axis=1)).mean()
    np.testing.assert_allclose(parts["loss7"], expected, rtol=1e-6)
    # Confident right answers cost more once smoothed.
    sure = {"logits2": 20.0 * jax.nn.one_hot(to_binary(LABEL7), 2), "logits7": 20.0 * jax.nn.one_hot(LABEL7, 7)}
    assert multitask_loss(sure, LABEL7, label_smoothing=0.1)[0] > multitask_loss(sure, LABEL7)[0] + 0.1


def test_class_weights_weight_the_seven_way_mean():
    outputs = _logits(4)
    weights = jnp.array([1.0, 2.0, 0.5, 1.0, 3.0, 0.0, 1.0])
    _, parts = multitask_loss(outputs, LABEL7, class_weights=weights)
    w = np.asarray(weights)[np.asarray(LABEL7)]
    np.testing.assert_allclose(parts["loss7"], (w * _ce(outputs["logits7"], LABEL7)).sum() / w.sum(), rtol=1e-6)
    # The binary term is unaffected, and equal weights are no weights.
    np.testing.assert_allclose(parts["loss2"], multitask_loss(outputs, LABEL7)[1]["loss2"], rtol=1e-6)
    np.testing.assert_allclose(
        multitask_loss(outputs, LABEL7, class_weights=jnp.full(7, 4.0))[0], multitask_loss(outputs, LABEL7)[0], rtol=1e-6
    )


def test_class_weights_with_label_smoothing_are_pytorchs_loss():
    """PyTorch's CrossEntropyLoss(weight=w, label_smoothing=e), written out: (1-e) times the
    w[y]-weighted NLL plus e/C times each class's w_c-weighted -log p, both over the sum of w[y]
    (the whole smoothed loss scaled by w[y] had given 2.166 where PyTorch gives 2.148)."""
    outputs = _logits(5)
    weights = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 0.2, 1.0])
    _, parts = multitask_loss(outputs, LABEL7, label_smoothing=0.1, class_weights=jnp.asarray(weights))
    logp = np.asarray(jax.nn.log_softmax(outputs["logits7"]), np.float64)
    labels = np.asarray(LABEL7)
    nll = -logp[np.arange(len(labels)), labels]
    expected = (0.9 * (weights[labels] * nll).sum() + 0.1 / 7 * -(logp * weights).sum()) / weights[labels].sum()
    np.testing.assert_allclose(parts["loss7"], expected, rtol=1e-6)


def test_valid_mask_ignores_padding_rows():
    outputs = _logits(6)
    padded = {k: jnp.concatenate([v, 1e3 * jnp.ones((2, v.shape[1]))]) for k, v in outputs.items()}
    labels = jnp.concatenate([LABEL7, jnp.array([1, 5])])
    valid = jnp.array([True] * 6 + [False] * 2)
    for kwargs in ({}, {"label_smoothing": 0.1, "class_weights": jnp.arange(1.0, 8.0)}):
        loss, parts = multitask_loss(padded, labels, valid=valid, **kwargs)
        ref_loss, ref_parts = multitask_loss(outputs, LABEL7, **kwargs)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        np.testing.assert_allclose(parts["loss2"], ref_parts["loss2"], rtol=1e-6)
    # No gradient reaches the padding rows; an all-padding batch gives 0, not NaN.
    grads = jax.grad(lambda o: multitask_loss(o, labels, valid=valid)[0])(padded)
    assert np.all(np.asarray(grads["logits7"][6:]) == 0)
    assert float(multitask_loss(outputs, LABEL7, valid=jnp.zeros(6, bool))[0]) == 0.0


def test_loss_matches_optax_integer_label_cross_entropy():
    outputs = _logits(8)
    _, parts = multitask_loss(outputs, LABEL7)
    expected = optax.softmax_cross_entropy_with_integer_labels(outputs["logits7"], LABEL7).mean()
    np.testing.assert_allclose(parts["loss7"], expected, rtol=1e-6)


@pytest.mark.parametrize("fusion,sequences", CASES)
def test_an_absent_sequence_is_zero_filled_and_ignored(classifier_runs, fusion, sequences):
    """Lesion 0 lacks its first sequence (zero mask channel): whatever its image holds, the
    outputs are the same; the other lesions are untouched."""
    model, x, variables, outputs, _ = classifier_runs[fusion, sequences]
    absent = x.at[0, 0, ..., 1].set(0.0)
    scrambled = absent.at[0, 0, ..., 0].set(1.0)
    out, out_scrambled = (model.apply(variables, v, train=False) for v in (absent, scrambled))
    assert out["present"][0].tolist() == [False] + [True] * (len(sequences) - 1) and out["present"][1:].all()
    assert not np.any(out["features"][0, 0])
    np.testing.assert_allclose(out["logits7"], out_scrambled["logits7"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["logits7"][1:], outputs["logits7"][1:], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out["logits7"][0], outputs["logits7"][0])
    if "sequence_weights" in out:
        assert out["sequence_weights"][0, 0] == 0
        np.testing.assert_allclose(out["sequence_weights"].sum(axis=1), 1.0, rtol=1e-6)
