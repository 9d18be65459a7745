"""Evaluating a segmentation network on a labelled split: confusion matrix, IoU, entropy."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from segshift.components.data.labels import NUM_CLASSES, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES
from segshift.components.losses import normalised_entropy, upsample
from segshift.components.metrics import confusion_matrix, mean_iou, per_class_iou, summarise


@dataclass
class Evaluation:
    confusion: torch.Tensor          # (C, C) long, rows = ground truth
    mean_entropy: float              # mean normalised per-pixel entropy of the predictions

    def summary(self) -> dict:
        ious = per_class_iou(self.confusion)
        out = summarise(self.confusion)
        out["miou_16"] = mean_iou(ious, SYNTHIA_16_CLASSES)
        out["miou_13"] = mean_iou(ious, SYNTHIA_13_CLASSES)
        out["mean_entropy"] = self.mean_entropy
        return out


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
             num_classes: int = NUM_CLASSES, progress: bool = False, desc: str = "evaluate") -> Evaluation:
    """Predict every sample (logits upsampled to label size) and accumulate the confusion matrix."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    entropy_sum, pixels = 0.0, 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    try:
        for images, labels in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
            images = images.to(device)
            size = labels.shape[-2:] if labels.numel() else images.shape[-2:]
            probs = upsample(model(images).main.float(), size).softmax(1)
            entropy = normalised_entropy(probs)
            entropy_sum += float(entropy.sum())
            pixels += entropy.numel()
            if labels.numel():
                conf += confusion_matrix(probs.argmax(1).cpu(), labels, num_classes)
    finally:
        model.train(was_training)
    return Evaluation(conf, entropy_sum / max(pixels, 1))


def validation_metrics(evaluation: Evaluation) -> dict[str, float]:
    """What model selection can use: val_miou (needs labels) and val_entropy (does not)."""
    summary = evaluation.summary()
    return {"val_miou": summary["miou"], "val_pixel_accuracy": summary["pixel_accuracy"],
            "val_entropy": evaluation.mean_entropy}


@dataclass
class GroupedEvaluation:
    """One pass over a split: the total, and one Evaluation per group (e.g. target condition).

    Every sample belongs to exactly one group (None included, for samples without one), so the
    total confusion is the sum of the group confusions.
    """

    total: Evaluation
    groups: dict[str | None, Evaluation]
    counts: dict[str | None, int]   # samples per group


@torch.inference_mode()
def evaluate_by_group(model: nn.Module, dataset: Dataset, groups: list[str | None], batch_size: int,
                      device: torch.device, num_classes: int = NUM_CLASSES, progress: bool = False,
                      desc: str = "evaluate", loader_workers: int = 0) -> GroupedEvaluation:
    """`evaluate`, with the confusion and mean entropy also kept per group of samples.

    `groups[i]` names the group of `dataset[i]` (None: no group). Same conventions as `evaluate`:
    main logits upsampled to the label size, argmax prediction, ignore pixels left out.
    """
    if len(groups) != len(dataset):
        raise ValueError(f"{len(groups)} group names for {len(dataset)} samples")
    order = list(dict.fromkeys(groups))
    conf = {g: torch.zeros(num_classes, num_classes, dtype=torch.long) for g in order}
    entropy_sum = dict.fromkeys(order, 0.0)
    pixels = dict.fromkeys(order, 0)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    offset = 0
    try:
        for images, labels in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
            images = images.to(device)
            size = labels.shape[-2:] if labels.numel() else images.shape[-2:]
            probs = upsample(model(images).main.float(), size).softmax(1)
            entropy = normalised_entropy(probs).cpu()
            prediction = probs.argmax(1).cpu()
            batch_groups = groups[offset:offset + len(images)]
            offset += len(images)
            for group in dict.fromkeys(batch_groups):
                index = torch.tensor([i for i, g in enumerate(batch_groups) if g == group])
                entropy_sum[group] += float(entropy[index].sum())
                pixels[group] += entropy[index].numel()
                if labels.numel():
                    conf[group] += confusion_matrix(prediction[index], labels[index], num_classes)
    finally:
        model.train(was_training)
    per_group = {g: Evaluation(conf[g], entropy_sum[g] / max(pixels[g], 1)) for g in order}
    total_conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for g in order:
        total_conf += conf[g]
    total = Evaluation(total_conf, sum(entropy_sum.values()) / max(sum(pixels.values()), 1))
    counts = {g: groups.count(g) for g in order}
    return GroupedEvaluation(total, per_group, counts)
