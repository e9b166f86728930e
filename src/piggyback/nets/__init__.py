"""Network definitions that torchvision does not ship (the decathlon's ResNet-26)."""

from piggyback.nets.resnet26 import ResNet26, resnet26

__all__ = ["ResNet26", "resnet26"]
