"""Models: the 3D ResNet backbone, fusion strategies and the multi-sequence classifier."""
from fll_jax.models.classifier import MultiSequenceClassifier, build_model, count_params
from fll_jax.models.fusion import FUSIONS
from fll_jax.models.resnet3d import BACKBONES, ResNet3D

__all__ = ["BACKBONES", "FUSIONS", "MultiSequenceClassifier", "ResNet3D", "build_model", "count_params"]
