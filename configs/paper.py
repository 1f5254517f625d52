"""The full-size setting: seven ResNet-18 branches at width 64 on 64^3 patches, 5-fold CV.

Only part of this is the paper's (Wang et al., Insights into Imaging 2021). The paper states the
seven sequences, 1 mm resampling, intensities in [0, 1], the crop rule by lesion size, 64^3
patches with a Gaussian-blurred mask, the list of augmentations, a 3D ResNet-18 per sequence,
the 'fused feature 2 / 7' fusion, a two-task loss, 5-fold CV with the five best models averaged
on the test set, and modified Wilson 95 % intervals. It states no optimiser, learning rate,
schedule, batch size, epoch count, loss weights, dropout, augmentation ranges, blur sigma,
model-selection metric or precision: every such value below is ours. Each field says which
('# paper: ...' or '# ours: ...'); docs/paper_vs_code.md sets paper and code side by side.

Usage: --config configs/paper.py  or  --config configs/paper.py:sequences=t2w+dwi+adc,fusion=attention
"""
import ml_collections

from fll_jax.config_string import apply_config_string
from fll_jax.constants import SEQUENCES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # ours: any fixed seed (init, shuffling, augmentation); the paper gives none
    # ours: which form of JAX's threefry generator draws the random numbers (no paper
    # counterpart): the partitionable form compiled ~6x slower on XLA:CPU here (a tiny model's
    # init: 105 s against 16 s).
    config.threefry_partitionable = False
    # paper: seven sequences, "T2WI, DWI, ADC, T1WI, LAP, PVP, DP" (Image processing). The
    # sequences the model uses; all seven are always loaded.
    config.sequences = SEQUENCES

    config.data = ml_collections.ConfigDict()
    # ours: the paper's hospital data is private ("available ... on reasonable request"), so the
    # default is the synthetic phantom (docs/phantom.md); 'manifest' reads real data.
    config.data.source = "phantom"  # 'phantom' (generated when absent) or 'manifest'
    # Phantom scale 'quick' or 'paper'. 'paper' = the paper's cohort size: lesions per class as in
    # Table 2 (cyst 86, FNH 57, haemangioma 101, abscess 88, HCC 78, ICC 70, metastasis 77 = 557
    # in 445 patients; fll_jax/data/phantom.py SCALES). Its test split is ours (about a fifth of
    # each class, whole patients: 111 lesions / 85 patients at phantom seed 0, against the
    # paper's 113 / 89 with per-class 16/11/22/21/15/11/17). Images and signatures are synthetic.
    config.data.scale = "paper"
    config.data.phantom_seed = 0  # ours: the phantom's own seed (its folder is phantom_<scale>_seed<k>)
    config.data.manifest = ""  # ours: a manifest.csv of real data when source == 'manifest'
    config.data.root = "data"  # ours: phantoms and records live under here
    config.data.backend = "tfds"  # ours: 'tfds' (TFRecords + tf.data) or 'numpy' (npz in memory)
    config.data.num_folds = 5  # paper: "fivefold cross-validation" of the development cohort (Model training)
    config.data.fold_seed = 0  # ours: seed of the fold assignment (how the paper drew folds: not stated)
    # ours: 'assigned' (patient-level, class-stratified, from fold_seed) or 'manifest' (its fold
    # column: official folds of a public data set). The paper says neither whether its folds kept
    # a patient's lesions together nor whether they were stratified (not stated).
    config.data.folds = "assigned"
    config.data.workers = 2  # ours: preprocessing processes (no effect on the patches)
    # ours: data checks to switch off, joined by '+' (fll_jax/data/checks.py ALLOWABLE): constant_image,
    # large_mask, shared_image, unclaimed_mask_value, separate_parts, box_outside.
    config.data.allow = ""
    # Preprocessing (fll_jax/data/preprocess.py). Fixed there, not config fields: the crop rule's
    # thresholds (paper: < 16 mm -> 32 mm cube, 16-32 mm -> 64 mm, larger "cropped by dilating
    # the area of the lesion"; the large-lesion side 1.25 E + 8 mm, E the mask's largest box
    # side, is ours, the paper gives no amount) and the mask blur (paper: "Gaussian blur", no
    # sigma; ours: sigma 2 voxels of the 64^3 patch).
    # paper: crop chosen by lesion "diameter" (Image processing), the measure not defined; ours:
    # 'longest', the longest diameter in 3D (radiological convention, Table 2's "lesion
    # diameter" presumably), or 'equivalent' (equivalent-sphere diameter). A manifest's diameter_mm
    # (a report's measurement; the phantom writes its nominal one) takes precedence over either.
    config.data.lesion_size = "longest"
    # paper: "normalised the intensity of MRI images to the range of [0, 1]" (Image processing),
    # stated before cropping, method not given; ours: 'volume' reads it as min-max of the whole
    # volume; 'patch' is the patch's own 0.5 and 99.5 percentiles (clipped).
    config.data.normalise = "volume"
    # paper: nearest neighbour for the 1 mm resampling, bilinear for resizing the crop to 64^3
    # (Image processing); this setting is the first step's, and the image is always resized
    # linearly (preprocess.py), so 'nearest' follows both steps. Masks: always nearest (as the paper).
    config.data.interpolation = "nearest"

    config.model = ml_collections.ConfigDict()
    config.model.depth = 18  # paper: "a 3D extension of the 2D ResNet-18 as the backbone" (Model training)
    config.model.width = 64  # ours: not stated; ResNet-18's standard 64-128-256-512 channels (He et al. 2016)
    config.model.stem_kernel = 7  # ours: not stated; ResNet-18's 7x7 stem made 7^3
    config.model.stem_stride = 2  # ours: not stated; ResNet-18's stem stride (then a 3^3 stride-2 max-pool)
    config.model.shortcut = "B"  # ours: not stated; projection shortcuts, as torchvision's resnet18
    config.model.space_to_depth = True  # ours: how strided convolutions are computed (same values, faster)
    # ours: how every convolution is computed (same values): 'auto' folds the depth taps into the
    # channels of a 2D convolution on the CPU, where XLA's 2D convolutions are several times
    # faster than its 3D ones, and keeps the 3D convolution elsewhere; 'native' or 'folded' force one.
    config.model.conv_impl = "auto"
    # ours: bf16 compute, f32 parameters, logits and loss; the paper states no precision
    # (PyTorch 1.4.0 on a GTX 1080Ti: no built-in mixed precision, which came with 1.6).
    config.model.dtype = "bfloat16"
    # paper: T2WI+DWI+ADC features with all seven -> binary head ("fused feature 2"), LAP+PVP+DP
    # with all seven -> seven-way head ("fused feature 7"), then FC layers (Model training);
    # ours: one linear layer per head (number of FC layers not stated) and per-sequence presence
    # flags (for lesions lacking a sequence; always 1 on complete data).
    config.model.fusion = "paper"
    config.model.dropout = 0.0  # ours: dropout before the heads; the paper mentions none
    # ours: the width of the scoring MLP of the fusions that weigh sequences by attention
    # ('attention', 'shared'; the paper's has none, and the others ignore it); unset (None): 128,
    # or the features' width if narrower.
    config.model.attention_hidden = ml_collections.config_dict.placeholder(int)
    # ours: the images batch norm's training statistics come from. Unset (None): the images of
    # present sequences only, so the zeros standing in for absent ones (missing data, sequence
    # dropout) do not shift them. 'all': every image, as the paper's complete data gave; the same
    # statistics on complete data without sequence dropout, compiled quicker and without the
    # mask's cost (docs/performance.md).
    config.model.batch_norm_statistics = ml_collections.config_dict.placeholder(str)

    # paper: patches "resized to 64 x 64 x 64" (Image processing). Side of the cube the network
    # sees; stored patches are 64^3 and resampled on the device.
    config.input_size = 64

    config.loss = ml_collections.ConfigDict()
    # paper: a "multitask framework" with a binary and a seven-way task (Model construction);
    # ours: the sum of the two cross-entropies with equal weights (no weights stated).
    config.loss.binary_weight = 1.0
    config.loss.multiclass_weight = 1.0
    config.loss.label_smoothing = 0.0  # ours: none (the paper mentions none)
    config.loss.class_weights = ()  # ours: empty = unweighted (none stated), else seven weights

    config.augment = ml_collections.ConfigDict()
    # paper: "Online data augmentation ... rotation, flipping, shifting, scaling, lighting
    # alteration and Gaussian noise addition" (Image processing); every range below is ours (none
    # stated). One random affine per lesion, shared by its sequences and masks (augment.py).
    config.augment.enabled = True  # paper: online augmentation in training
    config.augment.rotate_deg = 15.0  # ours: up to +-15 degrees about each axis
    config.augment.flip = True  # paper lists flipping; ours: each axis with probability 1/2
    config.augment.shift = 0.08  # ours: up to +-8 % of the patch side per axis
    # ours: isotropic zoom; with random_dilation (below) lesions of the dilated rule draw
    # theirs from [1, zoom_max] instead.
    config.augment.scale_min = 0.85
    config.augment.scale_max = 1.15
    # paper: "the dilation size was randomly changed during the training phase" (Image processing);
    # ours: for lesions of the dilated rule the zoom is drawn from [1, zoom_max] instead, so the
    # margin runs from the stored 12.5 % + 4 mm down to about 0 (fll_jax/train/augment.py).
    config.augment.random_dilation = True
    config.augment.intensity = 0.1  # ours: "lighting alteration" as gain 1 +- 0.1, offset +- 0.1 per sequence
    config.augment.noise_std = 0.02  # ours: Gaussian noise sd on the [0, 1] image scale

    config.optim = ml_collections.ConfigDict()
    # ours, all four: the paper names no optimiser, learning rate, schedule or clipping. AdamW,
    # linear warm-up then cosine decay to 0 over the run, global-norm clipping (step.py).
    config.optim.learning_rate = 1e-3  # ours: AdamW peak learning rate
    config.optim.weight_decay = 1e-4  # ours: AdamW decoupled weight decay
    config.optim.warmup_epochs = 5  # ours: linear warm-up from 0
    config.optim.grad_clip = 1.0  # ours: clip the global gradient norm

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32  # ours: not stated in the paper
    config.train.eval_batch_size = 32  # ours: no effect on results (batch norm in inference mode)
    config.train.epochs = 100  # ours: not stated in the paper
    config.train.folds = (0, 1, 2, 3, 4)  # paper: all five folds trained, one model each (Model evaluation)
    # paper: "the model showing the best performance on the validation dataset was selected" for
    # each of the five experiments (Model evaluation), the metric not stated; ours: seven-way
    # validation accuracy, ties to the lower seven-way validation cross-entropy (`neg_loss`, its
    # negative; the binary head's loss is not part of it).
    config.train.select_metric = "accuracy_7way"
    config.train.log_every = 10  # ours: steps between progress-bar updates
    # ours: chance of hiding each present sequence of a training lesion (never all of them), so the
    # model learns to classify lesions that lack sequences. 0: off; the paper has no such step
    # (it describes every lesion with all seven sequences).
    config.train.sequence_dropout = 0.0
    # ours: epochs between saves of the latest state (a resumed run repeats at most this many).
    # Each save writes the whole train state, 2.8 GB here: on a GPU, where an epoch of the
    # paper-scale phantom takes about a second, 10 or more keeps saving from dominating
    # (docs/performance.md, "The GPU figures on one H200").
    config.train.checkpoint_every = 1
    # ours: keep the development lesions on the devices and run each epoch and validation pass as
    # one device call (fll_jax/train/resident.py); the data must fit in every device's memory
    # (the paper-scale patches: about 1.6 GB). False: stream batches from the data source.
    config.train.resident_data = False

    config.evaluation = ml_collections.ConfigDict()
    config.evaluation.confidence = 0.95  # paper: "95% confidence intervals" (Statistical analysis)
    # Interval rule of every proportion and likelihood ratio in the report, reader study and
    # sweep comparison (Table 3, the summary, subgroups). paper:
    # "modified Wilson method" (Statistical analysis), its cut-off x* and the likelihood-ratio
    # interval not stated. 'paper' (ours: modified Wilson with x* = 2 at every n and the
    # log-method LR interval with z = 1.96, inferred because they reproduce Table 3's printed
    # digits, tests/test_stats.py) or 'bcd' (Brown, Cai & DasGupta's x*: 2 up to n = 50, 3 above;
    # z from the confidence level).
    config.evaluation.interval_rule = "paper"
    # ours: sequences hidden from every lesion when the fold models are evaluated (test and
    # out-of-fold), as if the lesions lacked them: what a model trained with them loses without
    # them at inference (configs/ablations/missing.py). () hides none; the paper has no such step.
    config.evaluation.hidden_sequences = ()
    return apply_config_string(config, arg)
