"""Models: multi-task nets, small backbones, feature taps and adaptors."""

from lightning_mtkd.models.adaptors import Adaptor
from lightning_mtkd.models.backbones import ConvBackbone, MLPBackbone, count_parameters
from lightning_mtkd.models.dense import SegNet
from lightning_mtkd.models.hooks import FeatureTap, request_attention_weights, resolve_module
from lightning_mtkd.models.multitask import MultiTaskNet
from lightning_mtkd.models.students import TaskStudents
from lightning_mtkd.models.transformer import PatchTransformerBackbone

__all__ = [
    "Adaptor",
    "ConvBackbone",
    "FeatureTap",
    "MLPBackbone",
    "MultiTaskNet",
    "PatchTransformerBackbone",
    "TaskStudents",
    "SegNet",
    "count_parameters",
    "request_attention_weights",
    "resolve_module",
]
