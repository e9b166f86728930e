"""Network definitions that torchvision does not ship (the decathlon's ResNet-26)."""

from piggyback.nets.resnet26 import ResNet26, resnet26
from piggyback.nets.small_cnn import SmallCNN, small_cnn

__all__ = ["ResNet26", "SmallCNN", "resnet26", "small_cnn"]
