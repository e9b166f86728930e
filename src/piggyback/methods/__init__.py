"""Methods as small classes: Piggyback and the paper's baselines, one file each.

``build_method`` turns a config (``_target_``) or a registered name into an object;
``method_class`` finds the class an artifact was written by.
"""

from piggyback.methods.base import (
    BN_MODES,
    REGISTRY,
    ArtifactParts,
    Method,
    TaskState,
    bn_state_dict,
    build_method,
    method_class,
)
from piggyback.methods.classifier_only import ClassifierOnly
from piggyback.methods.finetune import Finetune, FinetuneSequential
from piggyback.methods.packnet import PackNet
from piggyback.methods.piggyback import Piggyback

__all__ = [
    "BN_MODES",
    "REGISTRY",
    "ArtifactParts",
    "ClassifierOnly",
    "Finetune",
    "FinetuneSequential",
    "Method",
    "PackNet",
    "Piggyback",
    "TaskState",
    "bn_state_dict",
    "build_method",
    "method_class",
]
