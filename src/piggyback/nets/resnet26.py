"""The Visual Decathlon's ResNet-26 (Rebuffi et al., NeurIPS 2017) for 64-72 px images.

Mirrors the devkit baseline (``residual_adapters/models.py``) with one task: a 3x3 stem
conv (32 channels) + BN, three stages of four basic blocks (64, 128, 256 channels, each
stage halving the resolution: 64 -> 32 -> 16 -> 8), a final BN + ReLU, global average
pooling and a Linear ``fc``. 1 + 3*4*2 + 1 = 26 weight layers. The shortcut of the first
block of each stage is parameter-free, as in the reference: 2x2 average pooling, then zero
channels appended, so the network has exactly 25 convolutions (all 3x3) and 1 Linear.

Only plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` are used so the generic
masked-layer converter can wrap every conv, and ``fc`` is registered last so the training
app can drop the last Linear to get features. ``shortcut="conv"`` swaps in 1x1 conv + BN
projections (torchvision style) when wanted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Parameter-free projection: average-pool to the new resolution, zero-pad the channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError("a padding shortcut cannot reduce the number of channels")
        self.extra = out_planes - in_planes
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU (post-activation, as in the reference)."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: Literal["pad", "conv"] = "pad",
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "conv":
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            else:
                self.downsample = PadShortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet26(nn.Module):
    """Decathlon ResNet-26; ``forward`` returns logits, ``features`` the pooled 256-d vector."""

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        stem_channels: int = 32,
        widths: Sequence[int] = (64, 128, 256),
        strides: Sequence[int] = (2, 2, 2),
        blocks_per_stage: int = 4,
        shortcut: Literal["pad", "conv"] = "pad",
    ) -> None:
        super().__init__()
        if shortcut not in ("pad", "conv"):
            raise ValueError(f"shortcut must be 'pad' or 'conv', got {shortcut!r}")
        self.conv1 = conv3x3(3, stem_channels)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        in_planes = stem_channels
        stages = []
        for width, stride in zip(widths, strides, strict=True):
            blocks = [BasicBlock(in_planes, width, stride, shortcut)]
            blocks += [BasicBlock(width, width, 1, shortcut) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = width
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)  # registered last on purpose
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as the reference: He-normal on fan-out, BN at identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        # The reference applies no ReLU after the stem BN: the first block sees it raw.
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn_final(x))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def resnet26(num_classes: int = 1000, **kwargs) -> ResNet26:
    """The decathlon's standard backbone; see ``ResNet26`` for the options."""
    return ResNet26(num_classes=num_classes, **kwargs)
