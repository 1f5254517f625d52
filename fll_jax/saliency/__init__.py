"""Saliency: integrated gradients, gradients, Grad-CAM, sequence importance, outputs, scores.

F, the explained scalar, is one head's class probability (default) or logit, of one model or
the mean of the fold ensemble (target.ClassScore); maps are taken on the image channel of
every used sequence at once, the mask channel held fixed.
"""
from fll_jax.saliency.gradcam import grad_cam
from fll_jax.saliency.gradients import smoothgrad, vanilla_gradient
from fll_jax.saliency.importance import SequenceImportance, attribution_shares, branch_occlusion, sequence_importance
from fll_jax.saliency.integrated_gradients import IGResult, integrated_gradients, make_baseline, quadrature_rule
from fll_jax.saliency.target import ClassScore

__all__ = [
    "ClassScore", "IGResult", "SequenceImportance", "attribution_shares", "branch_occlusion", "grad_cam",
    "integrated_gradients", "make_baseline", "quadrature_rule", "sequence_importance", "smoothgrad",
    "vanilla_gradient",
]
