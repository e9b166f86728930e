"""Methods as small classes: Piggyback and the paper's baselines, one file each.

``build_method`` turns a config (``_target_``) or a registered name into an object;
``method_class`` finds the class an artifact was written by; ``apply_artifact`` and
``extract_artifact`` move a task between a backbone and its artifact. PackNet and CPG share
the weight-ownership machinery of ``ownership``, which WSN builds on too.
"""

from piggyback.formats import ArtifactParts, bn_state_dict
from piggyback.methods.base import BN_MODES, BN_TYPES, REGISTRY, Method
from piggyback.methods.classifier_only import ClassifierOnly
from piggyback.methods.cpg import CPG
from piggyback.methods.finetune import Finetune, FinetuneSequential
from piggyback.methods.hat import HAT
from piggyback.methods.hosts import InferenceHost, TaskState, TrainingHost
from piggyback.methods.ksm import KSM
from piggyback.methods.packnet import PackNet
from piggyback.methods.piggyback import Piggyback
from piggyback.methods.registry import (
    apply_artifact,
    artifact_method,
    build_method,
    extract_artifact,
    method_class,
)
from piggyback.methods.wsn import WSN

__all__ = [
    "BN_MODES",
    "BN_TYPES",
    "CPG",
    "REGISTRY",
    "ArtifactParts",
    "ClassifierOnly",
    "Finetune",
    "FinetuneSequential",
    "HAT",
    "InferenceHost",
    "KSM",
    "Method",
    "PackNet",
    "Piggyback",
    "TaskState",
    "TrainingHost",
    "WSN",
    "apply_artifact",
    "artifact_method",
    "bn_state_dict",
    "build_method",
    "extract_artifact",
    "method_class",
]
