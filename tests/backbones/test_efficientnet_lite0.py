"""The offline ImageNet network really is ImageNet-trained: photos come out as their class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from skimage import data

from piggyback.backbones import build_backbone
from piggyback.backbones.sources import efficientnet_lite0_build


def _batch(images, config) -> torch.Tensor:
    size = config["input_size"][1:]
    x = torch.stack([torch.from_numpy(img).permute(2, 0, 1).float() / 255 for img in images])
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(config["std"]).view(1, 3, 1, 1)


def test_packaged_weights_classify_photographs_as_imagenet_classes():
    model, config = efficientnet_lite0_build("imagenet")
    # chelsea and coffee differ in size: resize each to the network's input first
    x = torch.cat([_batch([img], config) for img in (data.chelsea(), data.coffee())])
    with torch.no_grad():
        probs = model.eval()(x).softmax(dim=1)
    cat, coffee = probs.argmax(dim=1).tolist()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee in (967, 968)  # espresso, cup
    assert probs.max(dim=1).values.min() > 0.5  # confidently, not by luck


def test_backbone_without_classifier_feeds_its_data_config():
    backbone = build_backbone("efficientnet_lite0", weights="imagenet")
    assert backbone.feature_dim == 1280
    assert backbone.data_config["mean"] == (0.5, 0.5, 0.5)
    assert backbone.data_config["input_size"] == (3, 224, 224)
    with torch.no_grad():
        assert backbone.model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1280)
