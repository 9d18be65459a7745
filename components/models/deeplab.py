"""DeepLab-v2 as used by AdaptSegNet/ADVENT/IntraDA: dilated ResNet + summed multi-rate classifier."""
from __future__ import annotations

import torch
from torch import nn

from segshift.components.models.base import SegOutput
from segshift.components.models.resnet import ResNetBackbone

REFERENCE_RATES = (6, 12, 18, 24)


class ClassifierModule(nn.Module):
    """Four parallel 3x3 convolutions at different dilation rates, summed (DeepLab-v2's ASPP-S)."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = REFERENCE_RATES):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.conv2d_list)  # type: ignore[return-value]


class DeepLabV2(nn.Module):
    """Main logits from layer4 and, with `aux_head`, auxiliary logits from layer3; stride 8."""

    def __init__(self, num_classes: int = 19, backbone: str = "resnet101", width: float = 1.0,
                 rates: tuple[int, ...] = REFERENCE_RATES, aux_head: bool = True,
                 dilation: str = "torchvision"):
        super().__init__()
        self.backbone = ResNetBackbone(backbone, width, dilation=dilation)
        c3, c4 = self.backbone.channels
        self.layer6 = ClassifierModule(c4, num_classes, rates)
        self.layer5 = ClassifierModule(c3, num_classes, rates) if aux_head else None
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> SegOutput:
        c3, c4 = self.backbone(x)
        aux = (self.layer5(c3),) if self.layer5 is not None else ()
        return SegOutput(self.layer6(c4), aux)

    def head_parameters(self) -> list[nn.Parameter]:
        """The classifiers, trained at 10x the backbone's learning rate in the reference."""
        heads = [self.layer6] + ([self.layer5] if self.layer5 is not None else [])
        return [p for head in heads for p in head.parameters()]
