"""The fully-convolutional output-space discriminator of AdaptSegNet (Tsai et al. 2018) and ADVENT.

Five 4x4 stride-2 convolutions, C -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1, LeakyReLU(0.2) after each but
the last and no normalisation, as in the reference code: one domain logit per cell of a 1/32 grid
of its input map (the caller picks the source/target label and uses BCE-with-logits). Module names
(`conv1`..`conv4`, `classifier`) are the reference's, so its checkpoints load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

NEGATIVE_SLOPE = 0.2


def _down(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)


class FCDiscriminator(nn.Module):
    def __init__(self, in_channels: int, ndf: int = 64):
        super().__init__()
        if in_channels < 1 or ndf < 1:
            raise ValueError(f"in_channels and ndf must be >= 1, got {in_channels} and {ndf}")
        self.conv1 = _down(in_channels, ndf)
        self.conv2 = _down(ndf, ndf * 2)
        self.conv3 = _down(ndf * 2, ndf * 4)
        self.conv4 = _down(ndf * 4, ndf * 8)
        self.classifier = _down(ndf * 8, 1)
        self.leaky_relu = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.leaky_relu(conv(x))
        return self.classifier(x)  # a raw logit: no activation
