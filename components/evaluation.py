"""Evaluating a segmentation network on a labelled split: confusion matrix, IoU, entropy.

Resolution: the main logits are upsampled (bilinear) to the label's size before the argmax. A
dataset whose samples carry a native-resolution label (`has_full_labels` / `full_label(i)`, e.g.
Cityscapes val kept at 2048x1024 by `prepare.target.full_resolution_labels`) is scored against
that label instead, as ADVENT's eval_UDA.py does: the network still runs on the prepared
(1024x512) image, its logits are upsampled bilinearly (align_corners=True, as the reference's
nn.Upsample) straight to the full label's size, and the argmax and confusion are taken there.
That path works one image at a time (19x1024x2048 float logits are 160 MB), so memory stays
bounded whatever the batch size. Without full labels nothing changes.

Classes: the confusion matrix is always over the 19 Cityscapes train ids. A head of another class
protocol (model.classes: synthia16, 16 outputs) has its argmax mapped back to train ids, and the
target's pixels of the classes it does not predict (terrain, truck, train) are ignored, not counted
as errors (`protocol_confusion`); those classes' IoU is absent (NaN) and `miou` is the mean over
the protocol's classes (for synthia16 the same as `miou_16`).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from segshift.components.data.labels import NUM_CLASSES, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES
from segshift.components.losses import normalised_entropy, upsample
from segshift.components.metrics import confusion_matrix, mean_iou, per_class_iou, summarise
from segshift.components.models.classes import model_protocol, protocol_classes, scored_in_train_ids


@dataclass
class Evaluation:
    confusion: torch.Tensor          # (C, C) long, rows = ground truth (train ids)
    mean_entropy: float              # mean normalised per-pixel entropy of the predictions
    protocol: str = "cityscapes19"   # the head's classes (models/classes.py): `miou` is over them

    def summary(self) -> dict:
        ious = per_class_iou(self.confusion)
        out = summarise(self.confusion)
        if self.protocol != "cityscapes19":
            out["miou"] = mean_iou(ious, protocol_classes(self.protocol))
        out["miou_16"] = mean_iou(ious, SYNTHIA_16_CLASSES)
        out["miou_13"] = mean_iou(ious, SYNTHIA_13_CLASSES)
        out["mean_entropy"] = self.mean_entropy
        return out


def protocol_confusion(prediction: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES,
                       protocol: str = "cityscapes19") -> torch.Tensor:
    """The confusion matrix (train ids) of a head's argmax `prediction` (the ids of `protocol`)
    against a train-id `target`: the prediction mapped to train ids, the target's pixels of the
    classes the protocol lacks ignored (`classes.scored_in_train_ids`). cityscapes19: as is."""
    prediction, target = scored_in_train_ids(prediction, target, protocol)
    return confusion_matrix(prediction, target, num_classes)


def has_full_labels(dataset: Dataset) -> bool:
    """Whether `dataset` offers native-resolution labels (`full_label(i)`) to score against."""
    return bool(getattr(dataset, "has_full_labels", False)) and hasattr(dataset, "full_label")


class _WithFullLabels(Dataset):
    """(image, label, native-resolution label) per sample of a dataset with `full_label(i)`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, label = self.dataset[index]
        return image, label, self.dataset.full_label(index)


def _collate_full(batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    images, labels, full = zip(*batch)
    return torch.stack(images), torch.stack(labels), list(full)   # full labels: a list (sizes may differ)


def scoring_loader(dataset: Dataset, batch_size: int, loader_workers: int, full: bool) -> DataLoader:
    """Batches of (images, labels), plus a list of native-resolution labels when `full`."""
    if not full:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    return DataLoader(_WithFullLabels(dataset), batch_size=batch_size, shuffle=False,
                      num_workers=loader_workers, collate_fn=_collate_full)


def upsample_to_full(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) logits to a full-resolution label's (H, W): bilinear, align_corners=True, as
    ADVENT's eval_UDA.py (`nn.Upsample(size=(label H, label W), mode='bilinear', align_corners=True)`)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def _score_per_sample(logits: torch.Tensor, labels: torch.Tensor, full_labels: list[torch.Tensor],
                      image_size: torch.Size, num_classes: int, protocol: str = "cityscapes19"
                      ) -> Iterator[tuple[torch.Tensor | None, float, int]]:
    """(confusion or None, entropy sum, pixels) per sample of a batch, one image at a time.

    A sample with a native-resolution label is scored at that label's size (logits upsampled with
    `upsample_to_full`); one without, exactly as the batched path (logits upsampled to its label).
    """
    for i, full in enumerate(full_labels):
        if full.numel():
            probs = upsample_to_full(logits[i:i + 1], full.shape[-2:]).softmax(1)
            target = full[None]
        else:
            target = labels[i:i + 1] if labels.numel() else None
            size = target.shape[-2:] if target is not None else image_size
            probs = upsample(logits[i:i + 1], size).softmax(1)
        entropy = normalised_entropy(probs)
        conf = None if target is None else protocol_confusion(probs.argmax(1).cpu(), target, num_classes,
                                                              protocol)
        yield conf, float(entropy.sum()), entropy.numel()


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
             num_classes: int = NUM_CLASSES, progress: bool = False, desc: str = "evaluate") -> Evaluation:
    """Predict every sample (logits upsampled to label size) and accumulate the confusion matrix.

    Samples with a native-resolution label are scored at that resolution (see the module doc); a
    head of another class protocol is scored in train ids (see the module doc)."""
    protocol = model_protocol(model)
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    entropy_sum, pixels = 0.0, 0
    full = has_full_labels(dataset)
    loader = scoring_loader(dataset, batch_size, 0, full)
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
            if full:
                images, labels, full_labels = batch
                logits = model(images.to(device)).main.float()
                for sample_conf, sample_entropy, sample_pixels in _score_per_sample(
                        logits, labels, full_labels, images.shape[-2:], num_classes, protocol):
                    entropy_sum += sample_entropy
                    pixels += sample_pixels
                    if sample_conf is not None:
                        conf += sample_conf
                continue
            images, labels = batch
            images = images.to(device)
            size = labels.shape[-2:] if labels.numel() else images.shape[-2:]
            probs = upsample(model(images).main.float(), size).softmax(1)
            entropy = normalised_entropy(probs)
            entropy_sum += float(entropy.sum())
            pixels += entropy.numel()
            if labels.numel():
                conf += protocol_confusion(probs.argmax(1).cpu(), labels, num_classes, protocol)
    finally:
        model.train(was_training)
    return Evaluation(conf, entropy_sum / max(pixels, 1), protocol)


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
    main logits upsampled to the label size (the native-resolution label's, where a sample has
    one), argmax prediction, ignore pixels left out.
    """
    if len(groups) != len(dataset):
        raise ValueError(f"{len(groups)} group names for {len(dataset)} samples")
    protocol = model_protocol(model)
    order = list(dict.fromkeys(groups))
    conf = {g: torch.zeros(num_classes, num_classes, dtype=torch.long) for g in order}
    entropy_sum = dict.fromkeys(order, 0.0)
    pixels = dict.fromkeys(order, 0)
    was_training = model.training
    model.eval()
    full = has_full_labels(dataset)
    loader = scoring_loader(dataset, batch_size, loader_workers, full)
    offset = 0
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
            if full:
                images, labels, full_labels = batch
                logits = model(images.to(device)).main.float()
                batch_groups = groups[offset:offset + len(images)]
                offset += len(images)
                scores = _score_per_sample(logits, labels, full_labels, images.shape[-2:], num_classes,
                                           protocol)
                for group, (sample_conf, sample_entropy, sample_pixels) in zip(batch_groups, scores):
                    entropy_sum[group] += sample_entropy
                    pixels[group] += sample_pixels
                    if sample_conf is not None:
                        conf[group] += sample_conf
                continue
            images, labels = batch
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
                    conf[group] += protocol_confusion(prediction[index], labels[index], num_classes, protocol)
    finally:
        model.train(was_training)
    per_group = {g: Evaluation(conf[g], entropy_sum[g] / max(pixels[g], 1), protocol) for g in order}
    total_conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for g in order:
        total_conf += conf[g]
    total = Evaluation(total_conf, sum(entropy_sum.values()) / max(sum(pixels.values()), 1), protocol)
    counts = {g: groups.count(g) for g in order}
    return GroupedEvaluation(total, per_group, counts)
