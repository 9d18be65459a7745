"""Class protocols: the 16-class SYNTHIA head's label maps, for training and evaluation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segshift.components.data.labels import CLASS_NAMES, IGNORE_INDEX, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES
from segshift.components.metrics import confusion_matrix, mean_iou, per_class_iou
from segshift.components.models.classes import (
    missing_train_ids,
    num_protocol_classes,
    protocol_classes,
    to_protocol_ids,
    to_train_ids,
)


def test_synthia16_drops_terrain_truck_and_train():
    assert num_protocol_classes("synthia16") == 16 and num_protocol_classes("cityscapes19") == 19
    assert protocol_classes("synthia16") == SYNTHIA_16_CLASSES
    assert [CLASS_NAMES[c] for c in missing_train_ids("synthia16")] == ["terrain", "truck", "train"]
    with pytest.raises(ValueError, match="unknown class protocol"):
        num_protocol_classes("synthia13")


def test_train_ids_map_to_protocol_ids_and_back():
    train_ids = np.array([[0, 8, 9, 10], [14, 15, 16, 18], [255, 13, 17, 1]], np.uint8)
    mapped = to_protocol_ids(train_ids, "synthia16")
    assert mapped.dtype == np.uint8
    assert mapped.tolist() == [[0, 8, 255, 9], [255, 13, 255, 15], [255, 12, 14, 1]]
    back = to_train_ids(mapped, "synthia16")
    expected = train_ids.copy()
    expected[np.isin(train_ids, [9, 14, 16])] = IGNORE_INDEX
    assert np.array_equal(back, expected)
    # every protocol id goes back to its own class
    assert to_train_ids(np.arange(16, dtype=np.uint8), "synthia16").tolist() == list(SYNTHIA_16_CLASSES)
    t = torch.from_numpy(train_ids).long()
    assert torch.equal(to_protocol_ids(t, "synthia16"), torch.from_numpy(mapped).long())
    assert to_protocol_ids(train_ids, "cityscapes19") is train_ids       # identity
    with pytest.raises(TypeError):
        to_protocol_ids(train_ids.astype(np.float32), "synthia16")


def test_a_16_class_head_trains_on_mapped_source_labels_and_ignores_the_missing_classes():
    logits = torch.randn(2, 16, 4, 4, requires_grad=True)
    labels = torch.tensor([9, 14, 16, 255] * 8).reshape(2, 4, 4)       # only classes synthia16 lacks
    loss = F.cross_entropy(logits, to_protocol_ids(labels, "synthia16"), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(logits.grad) == 0
    with pytest.raises((IndexError, RuntimeError)):                    # unmapped: out of the head's range
        F.cross_entropy(logits, torch.full((2, 4, 4), 18), ignore_index=IGNORE_INDEX)


def test_evaluation_ignores_target_pixels_of_the_missing_classes():
    # Target: vegetation (8) and terrain (9); the 16-class model predicts vegetation everywhere.
    target = torch.tensor([8, 8, 9, 9])
    prediction16 = to_protocol_ids(torch.tensor([8, 8, 8, 8]), "synthia16")
    conf = confusion_matrix(prediction16, to_protocol_ids(target, "synthia16"), num_classes=16)
    ious = per_class_iou(conf)
    assert ious[8] == 1.0 and conf.sum() == 2                           # terrain pixels not counted
    # The same through the 19-class tables: predictions mapped back, missing classes ignored.
    target19 = to_train_ids(to_protocol_ids(target, "synthia16"), "synthia16")      # terrain -> 255
    conf19 = confusion_matrix(to_train_ids(prediction16, "synthia16"), target19, num_classes=19)
    ious19 = per_class_iou(conf19)
    assert mean_iou(ious19, SYNTHIA_16_CLASSES) == mean_iou(ious19, SYNTHIA_13_CLASSES) == 1.0


def test_a_16_class_prediction_is_scored_in_train_ids_with_the_missing_classes_ignored():
    from torch import nn

    from segshift.components.models.classes import model_protocol, scored_in_train_ids
    prediction16 = torch.tensor([12, 12, 12, 9])          # car, car, car, sky (protocol ids)
    target = torch.tensor([13, 14, 9, 10])                # car, truck, terrain, sky (train ids)
    prediction, kept = scored_in_train_ids(prediction16, target, "synthia16")
    assert prediction.tolist() == [13, 13, 13, 10] and kept.tolist() == [13, 255, 255, 10]
    assert scored_in_train_ids(prediction16, target, "cityscapes19") == (prediction16, target)   # as is
    conf = confusion_matrix(prediction, kept, num_classes=19)
    ious = per_class_iou(conf)
    assert ious[13] == ious[10] == 1.0 and all(ious[c] != ious[c] for c in missing_train_ids("synthia16"))

    model = nn.Conv2d(3, 16, 1)
    assert model_protocol(model) == "cityscapes19"        # a head without a protocol: ids as they are
    model.class_protocol = "synthia16"
    wrapper = nn.Module()
    wrapper.module = model                                # DDP keeps the network under .module
    assert model_protocol(model) == model_protocol(wrapper) == "synthia16"
