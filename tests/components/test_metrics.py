import math

import torch

from segshift.components.metrics import confusion_matrix, mean_iou, per_class_iou, pixel_accuracy


def test_hand_computed_example():
    # 3 classes; ground truth / prediction on 8 pixels, one ignored.
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    conf = confusion_matrix(pred, target, num_classes=3)
    assert conf.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 2]]
    ious = per_class_iou(conf)
    # class 0: tp 2, union 3; class 1: tp 1, union 3; class 2: tp 2, union 3
    assert [round(v, 6) for v in ious] == [round(2 / 3, 6), round(1 / 3, 6), round(2 / 3, 6)]
    assert math.isclose(mean_iou(ious), 5 / 9)
    assert math.isclose(pixel_accuracy(conf), 5 / 7)


def test_absent_classes_are_nan_and_left_out_of_the_mean():
    conf = confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 0]), num_classes=3)
    ious = per_class_iou(conf)
    assert ious[0] == 1.0 and math.isnan(ious[1]) and math.isnan(ious[2])
    assert mean_iou(ious) == 1.0
    assert math.isclose(mean_iou([0.5, 1.0, 0.0], classes=(0, 1)), 0.75)
