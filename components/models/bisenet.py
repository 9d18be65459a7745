"""BiSeNet v1 (Yu et al., ECCV 2018): a shallow high-resolution spatial path plus a ResNet context path.

Layout (channel counts at width 1; every one is scaled by `width` like the backbone's):

- spatial path: three conv3x3(stride 2)-BN-ReLU blocks, 3 -> 64 -> 64 -> 128, so 1/8 resolution;
- context path: `ResNetBackbone(backbone, width, output_stride=32)` under the state-dict prefix
  `context_path.backbone.` (so torchvision key `layer1.0.conv1.weight` is
  `context_path.backbone.layer1.0.conv1.weight`); global average pooling of layer4 as context;
  an Attention Refinement Module (ARM) on layer3 (1/16) and on layer4 (1/32) to 128 channels;
  the 1/32 sum (ARM + global context) is upsampled to 1/16, refined by a conv3x3-BN-ReLU and added to
  the 1/16 ARM output; that sum is upsampled to 1/8 and refined again;
- Feature Fusion Module (FFM): concat(spatial, context) -> conv1x1-BN-ReLU (256) -> channel attention
  (global pool, 1x1 conv, ReLU, 1x1 conv, sigmoid) -> x + x * attention;
- main head on the fused 1/8 features: conv3x3-BN-ReLU (256) + conv1x1 to the classes;
- with `aux_head`, two auxiliary heads (conv3x3-BN-ReLU (64) + conv1x1) on the context path's
  1/16 sum and 1/32 sum, returned at their own strides 16 and 32 as `aux = (aux16, aux32)`
  (deepest last, the `SegOutput` convention); callers upsample to the label size.

The attention branches work on globally pooled 1x1 maps. The common implementations put BatchNorm
there, but BatchNorm on a 1x1 map cannot train with batch size 1 (one value per channel), which the
adaptation recipes use; those 1x1 convolutions carry a bias instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segshift.components.models.base import SegOutput
from segshift.components.models.resnet import ResNetBackbone

BACKBONE_PREFIX = "context_path.backbone."


def scaled(channels: int, width: float) -> int:
    """Channel count under the width multiplier, rounded the way ResNetBackbone rounds it."""
    return max(8, int(round(channels * width)))


def upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # To the exact size rather than x2: inputs whose sides are not multiples of 32 round differently.
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))


class SpatialPath(nn.Sequential):
    """Three stride-2 blocks: wide, shallow, 1/8 resolution, keeps the spatial detail."""

    def __init__(self, width: float = 1.0):
        c1, c2, c3 = (scaled(c, width) for c in (64, 64, 128))
        super().__init__(ConvBNReLU(3, c1, 3, 2), ConvBNReLU(c1, c2, 3, 2), ConvBNReLU(c2, c3, 3, 2))
        self.out_channels = c3


class AttentionRefinementModule(nn.Module):
    """conv3x3-BN-ReLU, then reweight its channels by a sigmoid of their global average."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 3)
        self.attention = nn.Conv2d(out_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        weights = torch.sigmoid(self.attention(feat.mean(dim=(2, 3), keepdim=True)))
        return feat * weights


class ContextPath(nn.Module):
    """Returns the refined 1/8 context features and the 1/16 and 1/32 sums the aux heads read."""

    def __init__(self, backbone: str = "resnet18", width: float = 1.0):
        super().__init__()
        self.backbone = ResNetBackbone(backbone, width, output_stride=32)
        c3, c4 = self.backbone.channels
        mid = scaled(128, width)
        self.arm16 = AttentionRefinementModule(c3, mid)
        self.arm32 = AttentionRefinementModule(c4, mid)
        self.global_context = nn.Sequential(nn.Conv2d(c4, mid, 1, bias=True), nn.ReLU(inplace=True))
        self.refine32 = ConvBNReLU(mid, mid, 3)
        self.refine16 = ConvBNReLU(mid, mid, 3)
        self.out_channels = mid

    def forward(self, x: torch.Tensor, like8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c3, c4 = self.backbone(x)
        context = self.global_context(c4.mean(dim=(2, 3), keepdim=True))
        sum32 = self.arm32(c4) + context  # broadcasts the 1x1 global context over the map
        sum16 = self.arm16(c3) + self.refine32(upsample_to(sum32, c3))
        feat8 = self.refine16(upsample_to(sum16, like8))
        return feat8, sum16, sum32


class FeatureFusionModule(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4):
        super().__init__()
        self.fuse = ConvBNReLU(in_channels, out_channels, 1)
        hidden = max(1, out_channels // reduction)
        self.attention = nn.Sequential(
            nn.Conv2d(out_channels, hidden, 1, bias=True), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=True), nn.Sigmoid())

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.fuse(torch.cat([spatial, context], dim=1))
        return feat + feat * self.attention(feat.mean(dim=(2, 3), keepdim=True))


class SegHead(nn.Sequential):
    def __init__(self, in_channels: int, mid_channels: int, num_classes: int):
        super().__init__(ConvBNReLU(in_channels, mid_channels, 3),
                         nn.Conv2d(mid_channels, num_classes, 1, bias=True))


class BiSeNet(nn.Module):
    """Main logits at stride 8; with `aux_head`, aux logits at strides 16 and 32 (in that order)."""

    def __init__(self, num_classes: int = 19, backbone: str = "resnet18", width: float = 1.0,
                 aux_head: bool = True):
        super().__init__()
        self.spatial_path = SpatialPath(width)
        self.context_path = ContextPath(backbone, width)
        ctx = self.context_path.out_channels
        fused = scaled(256, width)
        self.ffm = FeatureFusionModule(self.spatial_path.out_channels + ctx, fused)
        self.head = SegHead(fused, fused, num_classes)
        aux_mid = scaled(64, width)
        self.aux16 = SegHead(ctx, aux_mid, num_classes) if aux_head else None
        self.aux32 = SegHead(ctx, aux_mid, num_classes) if aux_head else None
        self.num_classes = num_classes

    @property
    def backbone(self) -> ResNetBackbone:
        """The ImageNet-initialisable part, as DeepLabV2.backbone (keys under BACKBONE_PREFIX)."""
        return self.context_path.backbone

    def forward(self, x: torch.Tensor) -> SegOutput:
        spatial = self.spatial_path(x)
        feat8, sum16, sum32 = self.context_path(x, spatial)
        main = self.head(self.ffm(spatial, feat8))
        if self.aux16 is None or self.aux32 is None:
            return SegOutput(main)
        return SegOutput(main, (self.aux16(sum16), self.aux32(sum32)))

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the backbone (spatial path, ARMs, FFM, heads): trained at 10x the LR."""
        return [p for name, p in self.named_parameters() if not name.startswith(BACKBONE_PREFIX)]
