"""Pictures people would rather look at than read: coloured label maps and sample grids."""
from __future__ import annotations

import numpy as np

from segshift.components.data.labels import IGNORE_INDEX

# The Cityscapes colour of each train id (0..18), as in the official devkit.
TRAIN_ID_COLOURS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 RGB in Cityscapes colours; ignore is black."""
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(TRAIN_ID_COLOURS)] = TRAIN_ID_COLOURS
    palette[IGNORE_INDEX] = 0
    return palette[label]


def grid(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Tile equally sized RGB images into one picture with white gaps."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            canvas[i * (height + gap):i * (height + gap) + height, j * (width + gap):j * (width + gap) + width] = tile
    return canvas
