"""A stage's outputs people read: metrics JSON, per-class IoU table (dvc plots) and PNG pictures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segshift.components.data.labels import CLASS_NAMES
from segshift.components.evaluation import Evaluation
from segshift.components.io import atomic_write_text, write_png
from segshift.components.losses import normalised_entropy, upsample
from segshift.components.models.classes import model_protocol, to_train_ids
from segshift.components.visualize import (confusion_matrix_picture, grid, iou_bar_picture,
                                           prediction_rows)

PREVIEW_SAMPLES = 6


def per_class_rows(per_class_iou: dict[str, float]) -> list[dict]:
    """[{class, iou}] in percent, NaN (class absent) as null: the shape `dvc plots` reads."""
    return [{"class": name, "iou": None if v != v else round(100 * v, 2)}
            for name, v in per_class_iou.items()]


@torch.inference_mode()
def prediction_picture(model: nn.Module, dataset, device: torch.device, count: int) -> np.ndarray:
    model.eval()
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    images = torch.stack([s[0] for s in samples])
    labels = torch.stack([s[1] for s in samples]) if samples[0][1].numel() else None
    probs = upsample(model(images.to(device)).main.float(), images.shape[-2:]).softmax(1).cpu()
    predicted = to_train_ids(probs.argmax(1), model_protocol(model))    # coloured as train ids
    return grid(prediction_rows(images.numpy(), None if labels is None else labels.numpy(),
                                predicted.numpy(), normalised_entropy(probs).numpy()))


def write_stage_report(job, metrics: dict, evaluation: Evaluation, model: nn.Module, test,
                       device: torch.device, tracker) -> dict[str, Path]:
    params = job.config
    metrics_dir = job.path(params.paths.metrics)
    reports = job.path(params.paths.reports) / job.stage
    reports.mkdir(parents=True, exist_ok=True)
    per_class = metrics["test"]["per_class_iou"]
    files = {
        "metrics": atomic_write_text(metrics_dir / f"{job.stage}.json", json.dumps(metrics, indent=2)),
        "per_class": atomic_write_text(metrics_dir / f"{job.stage}_per_class.json",
                                       json.dumps(per_class_rows(per_class), indent=2)),
    }
    pictures = {
        "confusion_matrix.png": confusion_matrix_picture(evaluation.confusion.numpy(), CLASS_NAMES),
        "per_class_iou.png": iou_bar_picture({job.stage: per_class},
                                             f"{job.stage}: per-class IoU on target test"),
        "predictions.png": prediction_picture(model, test, device, PREVIEW_SAMPLES),
    }
    for name, picture in pictures.items():
        files[name] = reports / name
        write_png(files[name], picture)
    if tracker is not None:
        for path in files.values():
            tracker.log_artifact(path, "report")
    return files
