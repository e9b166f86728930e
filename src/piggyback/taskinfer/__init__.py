"""Task inference for unlabeled inputs: strategies behind one interface, one file each.

Built in: ``entropy`` and ``max_prob`` (every task's network, T forwards), ``oneshot``
(SupSup: one forward and one backward through the superposition of the tasks' masks) and
``prototype`` (nearest mean pretrained feature, one forward). Importing this package
registers them; a new strategy is a :class:`Strategy` subclass with a ``name``.
"""

from piggyback.taskinfer.base import (
    PER_CHOICES,
    REGISTRY,
    Prediction,
    Scores,
    Strategy,
    TaskInferenceError,
    TaskInferenceHost,
    build_strategy,
    infer,
    infer_task,
    normalized_entropy,
    predict,
    strategy_names,
)
from piggyback.taskinfer.entropy import Entropy
from piggyback.taskinfer.max_prob import MaxProb
from piggyback.taskinfer.oneshot import OneShot
from piggyback.taskinfer.prototype import Prototype

BUILT_IN = (Entropy, MaxProb, OneShot, Prototype)

__all__ = [
    "BUILT_IN",
    "PER_CHOICES",
    "REGISTRY",
    "Entropy",
    "MaxProb",
    "OneShot",
    "Prediction",
    "Prototype",
    "Scores",
    "Strategy",
    "TaskInferenceError",
    "TaskInferenceHost",
    "build_strategy",
    "infer",
    "infer_task",
    "normalized_entropy",
    "predict",
    "strategy_names",
]
