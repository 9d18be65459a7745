"""Class protocols: which Cityscapes classes a network predicts, and the label maps between them.

Every label file in the project holds the 19 Cityscapes train ids (0..18, 255 = ignore). A
protocol names the classes the network's head outputs, in train-id order:

- `cityscapes19`: all 19 (GTA5 -> Cityscapes; the built-in job);
- `synthia16`: the 16 classes SYNTHIA-RAND-CITYSCAPES labels, without terrain (9), truck (14) and
  train (16). The reference (ADVENT / IntraDA / DADA on SYNTHIA) trains a 16-output head on them and
  evaluates on those 16 only: a Cityscapes pixel of terrain, truck or train is ignored (not an error).

Protocol id k is the k-th class of the protocol (synthia16: 0..8 = train ids 0..8, 9 = sky (10),
... 15 = bicycle (18)). One mapping per direction:

- into the head's ids: `to_protocol_ids`, applied to every label a training stage reads (source and
  target labels, pseudo-labels, revealed labels: `PreparedSplit(protocol=...)`);
- out of them: `to_train_ids`, applied to a head's argmax before it is written (pseudo-labels) or
  scored (`scored_in_train_ids`: the prediction in train ids, the target's classes the protocol
  lacks ignored, so the 19x19 confusion matrix leaves them absent instead of counting errors).

A network built by `models.factory.build_model` carries its protocol (`class_protocol`);
`model_protocol` reads it.
"""
from __future__ import annotations

from typing import Literal, TypeVar

import numpy as np
import torch

from segshift.components.data.labels import IGNORE_INDEX, NUM_CLASSES, SYNTHIA_16_CLASSES

ClassProtocol = Literal["cityscapes19", "synthia16"]

PROTOCOL_CLASSES: dict[str, tuple[int, ...]] = {
    "cityscapes19": tuple(range(NUM_CLASSES)),
    "synthia16": SYNTHIA_16_CLASSES,
}

Labels = TypeVar("Labels", np.ndarray, torch.Tensor)


def protocol_classes(protocol: str) -> tuple[int, ...]:
    """The Cityscapes train ids the protocol predicts, in head-output order."""
    if protocol not in PROTOCOL_CLASSES:
        raise ValueError(f"unknown class protocol {protocol!r}; expected one of {sorted(PROTOCOL_CLASSES)}")
    return PROTOCOL_CLASSES[protocol]


def num_protocol_classes(protocol: str) -> int:
    """The head's output count under the protocol (19 or 16)."""
    return len(protocol_classes(protocol))


def missing_train_ids(protocol: str) -> tuple[int, ...]:
    """The Cityscapes train ids the protocol does not predict (synthia16: 9, 14, 16)."""
    kept = set(protocol_classes(protocol))
    return tuple(c for c in range(NUM_CLASSES) if c not in kept)


def train_id_to_protocol_table(protocol: str) -> np.ndarray:
    """A 256-entry uint8 table: train id -> protocol id; the missing classes, ignore and every other
    value -> 255 (ignore)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for protocol_id, train_id in enumerate(protocol_classes(protocol)):
        table[train_id] = protocol_id
    return table


def protocol_to_train_id_table(protocol: str) -> np.ndarray:
    """A 256-entry uint8 table: protocol id -> train id; 255 and anything out of range -> 255."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for protocol_id, train_id in enumerate(protocol_classes(protocol)):
        table[protocol_id] = train_id
    return table


def _apply(table: np.ndarray, labels: Labels) -> Labels:
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 255):
            raise ValueError("labels must lie in 0..255")
        lut = torch.as_tensor(table, device=labels.device).to(labels.dtype)
        return lut[labels.long()]
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) > 255):
        raise ValueError("labels must lie in 0..255")
    return table[array].astype(array.dtype, copy=False)


def to_protocol_ids(labels: Labels, protocol: str) -> Labels:
    """Cityscapes train-id labels (0..18, 255) -> the protocol's ids; classes the protocol lacks
    become 255 (ignored by the loss and by the confusion matrix). Identity for cityscapes19."""
    if protocol == "cityscapes19":
        protocol_classes(protocol)
        return labels
    return _apply(train_id_to_protocol_table(protocol), labels)


def to_train_ids(predictions: Labels, protocol: str) -> Labels:
    """A prediction in protocol ids -> Cityscapes train ids (for saving, colouring, or scoring with
    the 19-class tables). Identity for cityscapes19."""
    if protocol == "cityscapes19":
        protocol_classes(protocol)
        return predictions
    return _apply(protocol_to_train_id_table(protocol), predictions)


def scored_in_train_ids(predictions: Labels, labels: Labels, protocol: str) -> tuple[Labels, Labels]:
    """A head's argmax (protocol ids) and a train-id target, as the 19-class confusion matrix scores
    them: the prediction in train ids, and the target's pixels of classes the protocol does not
    predict ignored (255): not counted as errors, and their rows stay empty (IoU absent, NaN).
    Identity for cityscapes19."""
    if protocol == "cityscapes19":
        protocol_classes(protocol)
        return predictions, labels
    kept = to_train_ids(train_id_to_protocol_table(protocol), protocol)   # train id -> itself or 255
    return to_train_ids(predictions, protocol), _apply(kept, labels)


def model_protocol(model: object) -> str:
    """The protocol of a network's head: the `class_protocol` that `build_model` sets (through a
    DDP wrapper's `.module`); cityscapes19 for a network without one (a head built with its own
    class count, as tests do: its ids are taken as they are)."""
    model = getattr(model, "module", model)
    return getattr(model, "class_protocol", None) or "cityscapes19"
