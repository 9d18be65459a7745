"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy."""
from __future__ import annotations

import torch

from segshift.components.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor,
                     num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Rows: ground truth, columns: prediction; pixels labelled ignore (255) are left out."""
    valid = target != IGNORE_INDEX
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_iou(conf: torch.Tensor) -> list[float]:
    """IoU per class; NaN for a class absent from both ground truth and prediction."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return iou.tolist()


def mean_iou(ious: list[float], classes: tuple[int, ...] | None = None) -> float:
    """Mean over `classes` (default all), ignoring classes that never occur (NaN)."""
    chosen = [ious[c] for c in (classes if classes is not None else range(len(ious)))]
    present = [v for v in chosen if v == v]
    return float(sum(present) / len(present)) if present else float("nan")


def pixel_accuracy(conf: torch.Tensor) -> float:
    total = conf.sum().item()
    return float(conf.diag().sum().item() / total) if total else float("nan")


def summarise(conf: torch.Tensor) -> dict:
    ious = per_class_iou(conf)
    return {"miou": mean_iou(ious), "pixel_accuracy": pixel_accuracy(conf),
            "per_class_iou": {name: ious[i] for i, name in enumerate(CLASS_NAMES[:len(ious)])}}
