"""Class tables shared by every dataset: the 19 Cityscapes train ids and the id maps of each source format."""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19

CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

# IntraDA's entropy normalisation counts these (MISSION.md §2.1).
RARE_CLASSES: tuple[int, ...] = (3, 4, 5, 6, 7, 9, 12, 14, 15, 16, 17)

# The 16- and 13-class SYNTHIA evaluation protocols (train ids kept).
SYNTHIA_16_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_13_CLASSES: tuple[int, ...] = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)

# Cityscapes label ids (also GTA5's palette indices) -> train ids; 34 ids, 0..33.
CITYSCAPES_NUM_LABEL_IDS = 34
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# SYNTHIA-RAND-CITYSCAPES class ids, 0..22 -> train ids.
SYNTHIA_NUM_LABEL_IDS = 23
SYNTHIA_ID_TO_TRAINID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
    10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}


def lookup_table(id_to_trainid: dict[int, int], num_ids: int) -> np.ndarray:
    """A 256-entry uint8 table: valid ids map to train ids or 255; ids >= num_ids stay 255.

    Out-of-table ids are detected separately (see `ids_outside_table`) so that they can be
    reported instead of silently becoming ignore.
    """
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in id_to_trainid.items():
        table[label_id] = train_id
    return table


def ids_outside_table(ids: np.ndarray, num_ids: int) -> list[int]:
    """The distinct ids in `ids` that are not valid label ids (>= num_ids)."""
    present = np.unique(ids)
    return [int(v) for v in present if v >= num_ids]


def invalid_train_ids(ids: np.ndarray) -> list[int]:
    """Values of a train-id map that are neither a class (0..18) nor ignore (255)."""
    present = np.unique(ids)
    return [int(v) for v in present if v >= NUM_CLASSES and v != IGNORE_INDEX]
