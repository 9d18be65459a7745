"""Class-balanced pseudo-label selection (CBST, Zou et al. ECCV 2018; LSE's per-class thresholds).

A single confidence threshold keeps mostly the dominant, easy classes: a network is rarely as
sure about a pole or a traffic sign as about the road, so a global cut throws away the rare
classes first and self-training then forgets them. Class-balanced selection instead keeps, for
every predicted class c, the share p of its pixels that the network is most confident about: the
threshold t_c is the confidence at the p-quantile from the top of class c's pixels.

Confidences are quantised to uint8 (q = floor(255 * max softmax)) so that per-class histograms
are exact integers that can be summed across Ray actors and images, and the same quantised map
is what the thresholds are applied to: the kept share is exactly the one the histogram says.
"""
from __future__ import annotations

import numpy as np

from segshift.components.data.labels import IGNORE_INDEX, NUM_CLASSES

LEVELS = 256    # uint8 confidence levels


def quantise_confidence(confidence: np.ndarray) -> np.ndarray:
    """Max-softmax probabilities in [0, 1] -> uint8 levels floor(255 * p) (1.0 -> 255)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    return np.clip(np.floor(confidence * (LEVELS - 1)), 0, LEVELS - 1).astype(np.uint8)


def class_confidence_histogram(label: np.ndarray, confidence_q: np.ndarray) -> np.ndarray:
    """(NUM_CLASSES, 256) int64: for each predicted class, how many pixels have each confidence
    level. `label` and `confidence_q` have the same shape; ignore pixels (255) are not counted."""
    label, confidence_q = np.asarray(label), np.asarray(confidence_q)
    if label.shape != confidence_q.shape:
        raise ValueError(f"label {label.shape} and confidence {confidence_q.shape} differ in shape")
    valid = label < NUM_CLASSES
    flat = label[valid].astype(np.int64) * LEVELS + confidence_q[valid].astype(np.int64)
    return np.bincount(flat, minlength=NUM_CLASSES * LEVELS).reshape(NUM_CLASSES, LEVELS)


def class_balanced_thresholds(histogram: np.ndarray, share: float) -> np.ndarray:
    """Per-class uint8 confidence thresholds (NUM_CLASSES,) int16 that keep, for each class, the
    `share` of its pixels with the highest confidence (at least that share: ties at the threshold
    level are all kept). A class never predicted gets threshold 0 (nothing to filter).
    """
    if not 0 < share <= 1:
        raise ValueError(f"class-balanced share = {share} must be in (0, 1]")
    histogram = np.asarray(histogram, dtype=np.int64)
    if histogram.shape != (NUM_CLASSES, LEVELS):
        raise ValueError(f"expected a ({NUM_CLASSES}, {LEVELS}) histogram, got {histogram.shape}")
    # at_or_above[c, q] = pixels of class c with level >= q
    at_or_above = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]
    totals = at_or_above[:, 0]
    needed = np.ceil(share * totals - 1e-9)
    thresholds = np.zeros(NUM_CLASSES, np.int16)
    for c in np.flatnonzero(totals):
        # the highest level whose pixels at or above it reach the wanted count
        thresholds[c] = int(np.flatnonzero(at_or_above[c] >= needed[c]).max())
    return thresholds


def apply_class_thresholds(label: np.ndarray, confidence_q: np.ndarray,
                           thresholds: np.ndarray) -> np.ndarray:
    """A copy of `label` whose pixels below their class's threshold are IGNORE_INDEX (255)."""
    label = np.asarray(label)
    out = label.copy()
    valid = label < NUM_CLASSES
    below = np.zeros(label.shape, bool)
    below[valid] = confidence_q[valid] < np.asarray(thresholds)[label[valid]]
    out[below] = IGNORE_INDEX
    return out
