"""ResNet backbones whose state-dict keys match torchvision's, with DeepLab's dilated last stages.

`width` scales every channel count (64 -> 64*width ...) for the small CPU variant; with width 1
the parameter layout is exactly torchvision's, so ImageNet weights load with
`backbone.load_state_dict(torch.load(path, weights_only=True), strict=False)` (only `fc.*` unused).
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


ARCHITECTURES: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


# Where a dilated stage's first block takes its rate from (see ResNetBackbone._make_layer).
DILATION_FORMS: tuple[str, ...] = ("torchvision", "reference")


class ResNetBackbone(nn.Module):
    """Stem + layer1..4; layer3/4 dilated 2/4 with stride 1, so the output stride is 8.

    `dilation` "torchvision": the first block of layer3 (layer4) runs at dilation 1 (2), the rest
    at 2 (4), as torchvision's `replace_stride_with_dilation`; "reference": every block of layer3
    at 2 and of layer4 at 4, as ADVENT's DeepLab-v2 (valeoai/ADVENT advent/model/deeplabv2.py).
    Padding equals dilation in both, so the parameters and the output size are the same.
    """

    def __init__(self, depth: str = "resnet101", width: float = 1.0, output_stride: int = 8,
                 dilation: str = "torchvision"):
        super().__init__()
        if depth not in ARCHITECTURES:
            raise ValueError(f"unknown backbone '{depth}'; expected one of {sorted(ARCHITECTURES)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if dilation not in DILATION_FORMS:
            raise ValueError(f"unknown dilation form '{dilation}'; expected one of {list(DILATION_FORMS)}")
        self.dilation = dilation
        block, layers = ARCHITECTURES[depth]
        planes = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(3, planes[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        dil3, dil4 = {8: (2, 4), 16: (1, 2), 32: (1, 1)}[output_stride]
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=1 if dil3 > 1 else 2, dilation=dil3)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=1 if dil4 > 1 else 2, dilation=dil4)
        self.channels = (planes[2] * block.expansion, planes[3] * block.expansion)  # layer3, layer4

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1,
                    dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        # torchvision (`replace_stride_with_dilation`): the first block of a dilated stage keeps the
        # previous stage's rate (layer3.0: 1, layer4.0: 2). reference (ADVENT's ResNetMulti
        # `_make_layer`): every block of the stage, the first included, at the stage's rate.
        first_dilation = dilation if self.dilation == "reference" else max(1, dilation // 2)
        layers = [block(self.inplanes, planes, stride, first_dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        c3 = self.layer3(x)
        return c3, self.layer4(c3)
