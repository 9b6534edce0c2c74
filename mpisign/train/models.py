"""Models for ``python -m mpisign.train``: a small CNN, and torchvision's ResNet-18 / ResNet-50,
for images; and a small transformer language model (:mod:`mpisign.train.gpt`) for text.

ResNets are built without pretrained weights (nothing is downloaded) and adapted to the data:
the first convolution takes the data set's channels (1 for Fashion-MNIST and digits), and for
small images (at most 64 pixels a side) it becomes a 3x3 stride-1 convolution without the max
pool, the usual CIFAR form, so that 28x28 or 8x8 inputs are not shrunk to nothing.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "LANGUAGE_MODELS", "SmallCNN", "build_model", "build_language_model",
           "count_parameters"]

#: The image classifiers (what :func:`build_model` builds; mpisign.diagnostics offers these).
MODELS = ("cnn", "resnet18", "resnet50")
#: The language models (what :func:`build_language_model` builds).
LANGUAGE_MODELS = ("gpt",)


class SmallCNN(nn.Module):
    """conv3x3(32) - ReLU - maxpool - conv3x3(64) - ReLU - maxpool - fc(128) - ReLU - fc(classes).

    About 0.42M parameters on 28x28 inputs, 0.05M on 8x8: quick on a laptop's CPU.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if image_size <= 64:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The model ``name`` (one of :data:`MODELS`) for images ``in_channels x image_size^2``."""
    if name == "cnn":
        if image_size < 4:
            raise ValueError(f"the small CNN needs images of at least 4x4, got {image_size}")
        return SmallCNN(in_channels, num_classes, image_size)
    if name in ("resnet18", "resnet50"):
        return _resnet(name, in_channels, num_classes, image_size)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def build_language_model(name: str, vocab: int, context: int, layers: int, width: int,
                         heads: int) -> nn.Module:
    """The language model ``name`` (one of :data:`LANGUAGE_MODELS`)."""
    if name == "gpt":
        from .gpt import GPT

        return GPT(vocab, context, layers, width, heads)
    raise ValueError(f"language model must be one of {LANGUAGE_MODELS}, got {name!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
