"""The paper's setting: seven ResNet-18 branches at width 64 on 64^3 patches, 5-fold CV.

Usage: --config configs/paper.py  or  --config configs/paper.py:sequences=t2w+dwi+adc,fusion=attention
"""
import ml_collections

from fll_jax.config_string import apply_config_string
from fll_jax.constants import SEQUENCES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Which form of JAX's threefry generator draws the random numbers: the partitionable form
    # compiled ~6x slower on XLA:CPU here (a tiny model's init: 105 s against 16 s).
    config.threefry_partitionable = False
    # The sequences the model uses; all seven are always loaded.
    config.sequences = SEQUENCES

    config.data = ml_collections.ConfigDict()
    config.data.source = "phantom"  # 'phantom' (generated when absent) or 'manifest'
    config.data.scale = "paper"  # phantom scale: 'quick' or 'paper'
    config.data.phantom_seed = 0  # the phantom's own seed (its folder is phantom_<scale>_seed<k>)
    config.data.manifest = ""  # a manifest.csv of real data when source == 'manifest'
    config.data.root = "data"  # phantoms and records live under here
    config.data.backend = "tfds"  # 'tfds' (TFRecords + tf.data) or 'numpy' (npz in memory)
    config.data.num_folds = 5
    config.data.fold_seed = 0
    # 'assigned' (patient-level stratified, from fold_seed) or 'manifest' (its fold column:
    # official folds of a public data set).
    config.data.folds = "assigned"
    config.data.workers = 2
    # Data checks to switch off, joined by '+': constant_image, large_mask, shared_image.
    config.data.allow = ""

    config.model = ml_collections.ConfigDict()
    config.model.depth = 18
    config.model.width = 64
    config.model.stem_kernel = 7
    config.model.stem_stride = 2
    config.model.shortcut = "B"
    config.model.space_to_depth = True
    config.model.dtype = "bfloat16"
    config.model.fusion = "paper"
    config.model.dropout = 0.0

    # Side of the cube the network sees; stored patches are 64^3 and resampled on the device.
    config.input_size = 64

    config.loss = ml_collections.ConfigDict()
    config.loss.binary_weight = 1.0
    config.loss.multiclass_weight = 1.0
    config.loss.label_smoothing = 0.0
    config.loss.class_weights = ()  # empty: unweighted; else seven weights

    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = True
    config.augment.rotate_deg = 15.0
    config.augment.flip = True
    config.augment.shift = 0.08  # fraction of the patch side
    config.augment.scale_min = 0.85
    config.augment.scale_max = 1.15
    config.augment.intensity = 0.1  # gain and offset range of the lighting change
    config.augment.noise_std = 0.02

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 5
    config.optim.grad_clip = 1.0

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32
    config.train.eval_batch_size = 32
    config.train.epochs = 100
    config.train.folds = (0, 1, 2, 3, 4)
    # Metric on the validation fold that picks each fold's best epoch.
    config.train.select_metric = "accuracy_7way"
    config.train.log_every = 10
    # Chance of hiding each present sequence of a training lesion (never all of them), so the
    # model learns to classify lesions that lack sequences.
    config.train.sequence_dropout = 0.0
    # Epochs between saves of the latest state (a resumed run repeats at most this many).
    config.train.checkpoint_every = 1

    config.evaluation = ml_collections.ConfigDict()
    config.evaluation.confidence = 0.95
    # Interval rules of the report's proportions and likelihood ratios: 'paper' (modified Wilson
    # with x* = 2 and z = 1.96, which reproduce the paper's Table 3) or 'bcd' (Brown, Cai &
    # DasGupta's x*: 2 up to n = 50, 3 above; z from the confidence level).
    config.evaluation.interval_rule = "paper"
    return apply_config_string(config, arg)
