"""Task inference on a constructed sequence where the right answer is known by construction.

The "pretrained" backbone is one linear layer (about the identity) and a ReLU over inputs of
three blocks of four features. Task ``t``'s inputs live in block ``t`` (a one-hot class code
plus noise, zero elsewhere), its mask keeps block ``t``'s rows of the layer and switches the
rest off, and its head reads block ``t`` only. So each task's network sees nothing of the
other tasks' inputs (its head gives the uniform distribution there) and is sure of its own;
the pretrained features of the three tasks' inputs are far apart; and in the superposition
only the right task's coefficient changes the features. Every strategy must then find every
task, per batch and per input, through the real pipeline: ``PiggybackModule`` → artifact
file → ``MultiTaskModel``. (The trained digits sequence of ``test_strategies.py`` is the
case where the output-based rules fail, as the docstrings of ``piggyback.taskinfer`` say.)
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from piggyback.backbones import build_backbone
from piggyback.formats import load_artifact, save_artifact
from piggyback.models.module import PiggybackModule
from piggyback.models.multitask import MultiTaskModel
from piggyback.nn import masked_weights
from piggyback.taskinfer import build_strategy

BLOCK = 4
CLASSES = {"alpha": 4, "beta": 4, "gamma": 3}  # unequal heads: entropy is class-normalised
STRATEGIES = ("entropy", "max_prob", "oneshot", "prototype")
WIDTH = BLOCK * len(CLASSES)


def _network() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    fc = nn.Linear(WIDTH, WIDTH, bias=False)
    within_blocks = torch.block_diag(*[torch.ones(BLOCK, BLOCK)] * len(CLASSES))
    noise = 0.01 * torch.rand(WIDTH, WIDTH, generator=generator)
    with torch.no_grad():  # the identity plus small positive cross-talk within each block
        fc.weight.copy_(torch.eye(WIDTH) + noise * within_blocks)
    return nn.Sequential(OrderedDict(fc=fc, relu=nn.ReLU(), classifier=nn.Linear(WIDTH, 2)))


def _inputs(task: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    block = list(CLASSES).index(task)
    labels = torch.randint(CLASSES[task], (n,), generator=generator)
    x = torch.zeros(n, WIDTH)
    x[:, block * BLOCK : (block + 1) * BLOCK] = 0.05 * torch.rand(n, BLOCK, generator=generator)
    x[torch.arange(n), block * BLOCK + labels] += 1.0
    return x, labels


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> MultiTaskModel:
    generator = torch.Generator().manual_seed(1)
    backbone = {"name": "blocks", "model": _network(), "classifier": "classifier", "weights": None}
    module = None
    for block, (task, num_classes) in enumerate(CLASSES.items()):
        if module is None:
            module = PiggybackModule(backbone=backbone, task=task, num_classes=num_classes)
        else:
            module.add_task(task, num_classes)
        ((_, mask),) = masked_weights(module.backbone)
        rows = slice(block * BLOCK, (block + 1) * BLOCK)
        real = torch.zeros_like(mask.mask_real)  # below the threshold: off
        real[rows] = 1e-2  # the paper's init value: on
        mask.set_mask(real)
        head = module.heads[task]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.weight[:, rows][:, :num_classes].copy_(8.0 * torch.eye(num_classes))
        module.tasks[task].prototype = module.feature_mean([_inputs(task, 64, generator)])
    folder = tmp_path_factory.mktemp("constructed")
    artifacts = [
        load_artifact(save_artifact(module.export_task(t), folder / f"{t}.safetensors"))
        for t in CLASSES
    ]
    pretrained = build_backbone(model=_network(), classifier="classifier", weights=None).model
    return MultiTaskModel.from_artifacts(artifacts, pretrained)


@pytest.fixture(scope="module")
def test_sets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return {task: _inputs(task, 64, generator) for task in CLASSES}


def test_the_construction_holds(model, test_sets):
    """Each task's network classifies its own inputs and is uniform on the others'."""
    for task, (x, labels) in test_sets.items():
        with torch.no_grad():
            assert torch.equal(model(x, task=task).argmax(1), labels)
            for other in CLASSES:
                if other != task:
                    assert torch.equal(model(x, task=other), torch.zeros(64, CLASSES[other]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_batch_finds_its_task(model, test_sets, strategy):
    for task, (x, _) in test_sets.items():
        for start in range(0, len(x), 16):
            assert model.infer_task(x[start : start + 16], strategy=strategy) == task


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_input_of_a_mixed_batch_finds_its_task(model, test_sets, strategy):
    tasks = list(test_sets)
    x = torch.stack([test_sets[t][0][i] for i in range(6) for t in tasks])
    truth = [t for _ in range(6) for t in tasks]
    assert model.infer_task(x, strategy=strategy, per="sample") == truth


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_predict_gives_the_task_and_its_class(model, test_sets, strategy):
    tasks = list(test_sets)
    x = torch.stack([test_sets[t][0][i] for i in range(4) for t in tasks])
    expected = [(t, int(test_sets[t][1][i])) for i in range(4) for t in tasks]
    assert [tuple(p) for p in model.predict(x, strategy=strategy)] == expected


def test_oneshot_gradient_singles_out_the_right_task(model, test_sets):
    """The other tasks' coefficients do not touch the features of these inputs: their
    gradient is their head's entropy alone, 1 (uniform); the right task's is below it."""
    oneshot = build_strategy("oneshot")
    for index, (x, _) in enumerate(test_sets.values()):
        scores = oneshot.batch_scores(model, x[:16]).values[0]  # minus the gradient
        others = [s for i, s in enumerate(scores.tolist()) if i != index]
        assert others == pytest.approx([-1.0, -1.0], abs=1e-6)
        assert scores[index] > -0.5
