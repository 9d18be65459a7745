"""Losses shared by the methods."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.models.base import SegOutput


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels; 0 (with a graph) when every pixel is ignored,
    as a pseudo-labelled batch can be after confidence selection, where torch's mean gives NaN."""
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    labelled = (labels != IGNORE_INDEX).sum()
    return per_pixel.sum() / labelled.clamp(min=1)


def segmentation_loss(out: SegOutput, labels: torch.Tensor, aux_weight: float) -> dict[str, torch.Tensor]:
    """Cross-entropy of the main head plus `aux_weight` x that of each auxiliary head, at label size."""
    size = labels.shape[-2:]
    main = labelled_cross_entropy(upsample(out.main, size), labels)
    losses = {"seg_main": main}
    total = main
    for k, aux_logits in enumerate(out.aux):
        aux = labelled_cross_entropy(upsample(aux_logits, size), labels)
        losses[f"seg_aux{k}"] = aux
        total = total + aux_weight * aux
    losses["loss"] = total
    return losses


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy of (N, C, H, W) probabilities, divided by log C: values in [0, 1]."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(1) / math.log(probs.shape[1])
