"""CIFAR-sized models of the paper (VGG-BN, ResNet-18 for 32x32 inputs) and torchvision models by name.

Used by the CLI and benchmarks; the core never imports this module.
"""
from __future__ import annotations

from torch import nn

_VGG = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs (pytorch-cifar100 layout), channel widths scaled by ``width``."""

    def __init__(self, cfg: list, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers, c_in = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = max(1, round(v * width))
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool; channel widths scaled by ``width``."""

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        w = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, w[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, c_in = [], w[0]
        for i, c in enumerate(w):
            for j in range(2):
                blocks.append(BasicBlock(c_in, c, 2 if (i > 0 and j == 0) else 1))
                c_in = c
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


CIFAR_MODELS = ("vgg11_bn", "vgg16_bn", "resnet18")


def build_model(name: str, *, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """A CIFAR model ("vgg11_bn", "vgg16_bn", "resnet18") or ``tv:<torchvision name>`` (weights=None)."""
    if name in _VGG:
        return CifarVGG(_VGG[name], num_classes, width)
    if name == "resnet18":
        return CifarResNet18(num_classes, width)
    if name.startswith("tv:"):
        import torchvision

        tv_name = name[3:]
        if tv_name not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {tv_name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(CIFAR_MODELS)} or tv:<torchvision model name>")
