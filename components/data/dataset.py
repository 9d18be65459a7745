"""Reading a prepared directory as torch tensors."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segshift.components.data.manifest import ManifestError, read_manifest

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ManifestError(f"{path}: cannot read image (missing or corrupt)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: Path) -> np.ndarray:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2 or label.dtype != np.uint8:
        raise ManifestError(f"{path}: expected a single-channel uint8 train-id PNG")
    return label


def to_tensor(image: np.ndarray, per_image_norm: bool = False) -> torch.Tensor:
    """HWC uint8 RGB -> normalised CHW float. `per_image_norm` whitens each channel per image."""
    x = image.astype(np.float32) / 255.0
    if per_image_norm:
        x = (x - x.mean(axis=(0, 1))) / (x.std(axis=(0, 1)) + 1e-6)
    else:
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class PreparedSplit(Dataset):
    """One split of a prepared domain, decoded once and kept in memory (small datasets)."""

    def __init__(self, prepared_dir: str | Path, split: str, per_image_norm: bool = False,
                 need_labels: bool = True):
        self.root = Path(prepared_dir)
        table = read_manifest(self.root)
        rows = [r for r in table.to_pylist() if r["split"] == split]
        if not rows:
            raise ManifestError(f"{self.root}: split '{split}' is empty")
        if need_labels and any(r["label"] is None for r in rows):
            raise ManifestError(f"{self.root}: split '{split}' has unlabelled samples")
        self.rows = rows
        self.per_image_norm = per_image_norm
        self.images = [read_rgb(self.root / r["image"]) for r in rows]
        self.labels = [read_label(self.root / r["label"]) if r["label"] else None for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = self.labels[i]
        target = torch.from_numpy(label.astype(np.int64)) if label is not None else torch.empty(0)
        return to_tensor(self.images[i], self.per_image_norm), target
