import numpy as np
import pytest

from segshift.components.data.labels import IGNORE_INDEX, NUM_CLASSES
from segshift.components.pseudo_labels import (apply_class_thresholds, class_balanced_thresholds,
                                               class_confidence_histogram, quantise_confidence)


def test_quantise_confidence_maps_the_unit_interval_onto_uint8_levels():
    q = quantise_confidence(np.array([0.0, 0.5, 0.999, 1.0]))
    assert q.dtype == np.uint8 and q.tolist() == [0, 127, 254, 255]


def test_histogram_counts_pixels_per_predicted_class_and_level_and_skips_ignore():
    label = np.array([[0, 0, 5], [5, 5, IGNORE_INDEX]], np.uint8)
    conf = np.array([[10, 10, 200], [201, 200, 255]], np.uint8)
    hist = class_confidence_histogram(label, conf)
    assert hist.shape == (NUM_CLASSES, 256) and hist.sum() == 5
    assert hist[0, 10] == 2 and hist[5, 200] == 2 and hist[5, 201] == 1


def test_thresholds_keep_the_most_confident_share_of_each_class_separately():
    rng = np.random.default_rng(0)
    # class 0 (road) is confident everywhere, class 5 (pole) never above 0.5: a global cut at
    # 0.9 would drop every pole pixel, the class-balanced one keeps the top half of each class
    label = np.concatenate([np.zeros(1000, np.uint8), np.full(200, 5, np.uint8)])
    conf = np.concatenate([rng.integers(230, 256, 1000), rng.integers(60, 128, 200)]).astype(np.uint8)
    thresholds = class_balanced_thresholds(class_confidence_histogram(label, conf), 0.5)
    kept = apply_class_thresholds(label, conf, thresholds)
    for c, total in ((0, 1000), (5, 200)):
        share = (kept == c).sum() / total
        assert 0.5 <= share < 0.6, (c, share)          # at least p, ties at the cut kept
        assert conf[(kept == c)].min() >= conf[(label == c) & (kept == IGNORE_INDEX)].max()
    assert thresholds[1] == 0                           # never predicted: nothing to filter
    assert set(np.unique(kept)) == {0, 5, IGNORE_INDEX}


def test_share_one_keeps_everything_and_histograms_sum_across_images():
    a = (np.array([[1, 2]], np.uint8), np.array([[40, 90]], np.uint8))
    b = (np.array([[2, 2]], np.uint8), np.array([[10, 250]], np.uint8))
    total = class_confidence_histogram(*a) + class_confidence_histogram(*b)
    assert np.array_equal(apply_class_thresholds(*b, class_balanced_thresholds(total, 1.0)), b[0])
    t = class_balanced_thresholds(total, 0.34)        # class 2: levels 10, 90, 250 -> keep 2
    assert t[2] == 90 and t[1] == 40


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_share_outside_the_unit_interval_is_rejected(share):
    with pytest.raises(ValueError, match="share"):
        class_balanced_thresholds(np.zeros((NUM_CLASSES, 256), np.int64), share)


def test_global_threshold_and_class_balancing_combine_as_the_larger_level():
    from segshift.components.ranking import pixel_thresholds
    label = np.array([0] * 4 + [5] * 4, np.uint8)
    conf = np.array([250, 251, 252, 253, 20, 30, 40, 50], np.uint8)
    hist = [class_confidence_histogram(label, conf)]
    assert pixel_thresholds(hist, None, None).tolist() == [0] * NUM_CLASSES
    assert set(pixel_thresholds(hist, 0.5, None).tolist()) == {127}
    levels = pixel_thresholds(hist, 0.1, 0.5)
    assert levels[0] == 252 and levels[5] == 40 and levels[1] == 25   # CB, CB, global floor(25.5)
