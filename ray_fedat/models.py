"""Model zoo. Every model takes images in [0, 1] of any size and returns logits.

`build_model(name, shape, num_classes)` is the one entry point; `shape` is (C, H, W).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn


def _flat_features(features: nn.Module, shape: Tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *shape)).numel())


class SmallCNN(nn.Module):
    """The TRADES small CNN (4 unpadded 3x3 conv + 3 fc, ReLU); images smaller than 16
    pixels (digits) get padded convolutions so the feature maps do not vanish."""

    def __init__(self, shape, num_classes):
        super().__init__()
        c, pad = shape[0], (1 if min(shape[1:]) < 16 else 0)
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=pad), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=pad), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=pad), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=pad), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_features(self.features, shape), 200), nn.ReLU(),
            nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, num_classes),
        )

        # He initialisation for the ReLU stack: with PyTorch's default init this network sits
        # at chance accuracy for several epochs (measured on MNIST), too long for short runs.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """The article's LeNet-style MNIST/FMNIST network: two 5x5 conv + tanh + max-pool, two fc."""

    def __init__(self, shape, num_classes):
        super().__init__()
        # Pooled before tanh (the article: tanh, then pool): tanh is monotone, so the function
        # and its gradients are the same (tests/test_models.py), with tanh on a quarter of the
        # elements: 1.08-1.10x per CalFAT epoch (benchmarks/activation_order.py). The conv
        # layers keep their indices, so checkpoints load. (SmallCNN's ReLUs moved the same way
        # measured 0.985x, so they stay where TRADES put them.)
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 32, 5, padding=2), nn.MaxPool2d(2), nn.Tanh(),
            nn.Conv2d(32, 64, 5, padding=2), nn.MaxPool2d(2), nn.Tanh(), nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_features(self.features, shape), 512), nn.Tanh(), nn.Linear(512, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Two hidden layers; the fastest choice for tests and tiny inputs."""

    def __init__(self, shape, num_classes, hidden=128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(shape[0] * shape[1] * shape[2], hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class CalFATCifarCNN(nn.Module):
    """The CalFAT authors' CIFAR-10 network (CNNCifar in cc233/CalFAT nets.py): three 3x3
    convolutions of 128 channels with ReLU, max-pooling after the first two, one linear layer.
    Sized for 32x32 inputs, as theirs."""

    def __init__(self, shape, num_classes):
        super().__init__()
        c = shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 128, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 128, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 128, 3), nn.ReLU(), nn.Flatten(),
        )
        self.classifier = nn.Linear(_flat_features(self.features, shape), num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def resnet18(shape, num_classes) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem (3x3 conv, stride 1, no max-pool)."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "smallcnn": SmallCNN,
    "lenet": LeNet,
    "mlp": MLP,
    "resnet18": resnet18,
    "calfat-cnn": CalFATCifarCNN,
}


def build_model(name: str, shape, num_classes: int) -> nn.Module:
    return MODELS[name](tuple(shape), num_classes)


def activation_before_pooling(model: nn.Module) -> nn.Module:
    """A model's features with every (max-pool, activation) pair swapped to (activation, pool),
    sharing its layers: LeNet in the article's order, what tests/test_models.py and
    benchmarks/activation_order.py compare ours with."""
    layers = list(model.features)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], (nn.ReLU, nn.Tanh)):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return nn.Sequential(nn.Sequential(*layers), model.classifier)
