"""Writers of datasets in their exact original on-disk formats: GTA5, Cityscapes, SYNTHIA-RAND-CITYSCAPES.

For tests, benchmarks and trying the pipeline without the real data: every writer is seeded and
returns what it wrote, so a caller can compare prepared output with the expected train ids. Label
layouts are crude street scenes (sky, buildings, road, a few objects) over a realistic id mix,
including ids that map to ignore.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segshift.components.data.labels import (
    CITYSCAPES_ID_TO_TRAINID,
    SYNTHIA_ID_TO_TRAINID,
    lookup_table,
)

# The public Cityscapes colour of each label id 0..33; GTA5's label palette uses the same colours.
CITYSCAPES_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (111, 74, 0), (81, 0, 81),
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70),
    (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90),
    (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
    (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# Cityscapes label ids per scene part; 0 (unlabelled) and 4 (static) map to ignore.
_CS_SKY, _CS_BUILDING, _CS_ROAD, _CS_SIDEWALK = 23, 11, 7, 8
_CS_OBJECTS = (26, 24, 17, 21, 20, 19, 13, 33, 4, 0)
# SYNTHIA ids per scene part; 0 (void) and 13/14 (unmapped) map to ignore.
_SY_SKY, _SY_BUILDING, _SY_ROAD, _SY_SIDEWALK = 1, 2, 3, 4
_SY_OBJECTS = (8, 10, 7, 6, 9, 15, 11, 12, 0, 13, 22)

GTA5_DEFAULT_SIZE = (64, 36)
CITYSCAPES_DEFAULT_SIZE = (64, 32)
SYNTHIA_DEFAULT_SIZE = (64, 38)
DEFAULT_CITIES: dict[str, tuple[str, ...]] = {
    "train": ("aachen", "bochum"), "val": ("frankfurt",), "test": ("berlin",),
}

_CS_TABLE = lookup_table(CITYSCAPES_ID_TO_TRAINID, 34)
_SY_TABLE = lookup_table(SYNTHIA_ID_TO_TRAINID, 23)


@dataclass(frozen=True)
class WrittenSample:
    """One written frame: its sample id as ingest names it, split, and the train ids it should give."""

    sample_id: str
    split: str
    image: Path
    label: Path | None
    train_ids: np.ndarray | None


# --- scene content ----------------------------------------------------------------------------


def scene_ids(rng: np.random.Generator, size: tuple[int, int], parts: tuple[int, int, int, int],
              objects: tuple[int, ...]) -> np.ndarray:
    """A (H, W) uint8 id map: sky, buildings, sidewalk and road bands plus a few random boxes."""
    width, height = size
    sky, building, road, sidewalk = parts
    ids = np.full((height, width), sky, dtype=np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.5))
    roofline = int(horizon * rng.uniform(0.2, 0.6))
    ids[roofline:horizon] = building
    ids[horizon:] = sidewalk
    road_left, road_right = sorted(rng.integers(0, width, size=2))
    ids[horizon:, road_left:road_right + 1] = road
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, width - 2)), int(rng.integers(roofline, height - 2))
        w, h = int(rng.integers(2, max(3, width // 4))), int(rng.integers(2, max(3, height // 3)))
        ids[y0:y0 + h, x0:x0 + w] = rng.choice(objects)
    return ids


def render_rgb(rng: np.random.Generator, ids: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image: a per-id colour plus noise, so images differ from their labels."""
    colours = np.array([CITYSCAPES_COLOURS[i % len(CITYSCAPES_COLOURS)] for i in range(256)], np.int16)
    noise = rng.integers(-20, 21, size=ids.shape + (3,), dtype=np.int16)
    return np.clip(colours[ids] + noise, 0, 255).astype(np.uint8)


def write_rgb_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb, np.uint8)).save(path)
    return path


def truncate_file(path: Path, keep: float = 0.5) -> Path:
    """Cut a file short, as an interrupted download or copy would."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


# --- GTA5 ---------------------------------------------------------------------------------------


def write_gta5_label(path: Path, ids: np.ndarray) -> Path:
    """An 8-bit palette PNG whose indices are the Cityscapes label ids, with the GTA5/Cityscapes palette."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8))  # mode L; putpalette turns it into P
    palette = [c for colour in CITYSCAPES_COLOURS for c in colour]
    image.putpalette(palette + [0] * (768 - len(palette)))
    image.save(path)
    return path


def write_gta5_frame(root: Path, stem: str, rgb: np.ndarray, ids: np.ndarray | None) -> WrittenSample:
    """One GTA5 frame; `ids` None writes the image without a label."""
    image = write_rgb_png(root / "images" / f"{stem}.png", rgb)
    label = write_gta5_label(root / "labels" / f"{stem}.png", ids) if ids is not None else None
    expected = _CS_TABLE[ids] if ids is not None and int(ids.max()) < 34 else None
    return WrittenSample(f"gta5_{stem}", "train", image, label, expected)


def write_gta5(root: str | Path, n: int = 4, size: tuple[int, int] = GTA5_DEFAULT_SIZE, seed: int = 0,
               first: int = 1) -> list[WrittenSample]:
    """`n` GTA5 frames `images/NNNNN.png` + palette `labels/NNNNN.png` of `size` (W, H)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    written = []
    for number in range(first, first + n):
        ids = scene_ids(rng, size, (_CS_SKY, _CS_BUILDING, _CS_ROAD, _CS_SIDEWALK), _CS_OBJECTS)
        written.append(write_gta5_frame(root, f"{number:05d}", render_rgb(rng, ids), ids))
    return written


# --- Cityscapes --------------------------------------------------------------------------------


def write_gray_png(path: Path, array: np.ndarray) -> Path:
    """A single-channel PNG; 8- or 16-bit depending on the dtype."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"cannot write {path}")
    return path


def write_cityscapes_frame(root: Path, split: str, city: str, seq: int, frame: int, rgb: np.ndarray,
                           ids: np.ndarray | None, *, label_ids: bool = True, label_train_ids: bool = True,
                           extras: bool = True) -> WrittenSample:
    """One Cityscapes frame with the gtFine files requested; `extras` adds instanceIds, color and polygons."""
    stem = f"{city}_{seq:06d}_{frame:06d}"
    image = write_rgb_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
    gt = root / "gtFine" / split / city
    label: Path | None = None
    if ids is not None and label_train_ids:
        label = write_gray_png(gt / f"{stem}_gtFine_labelTrainIds.png", _CS_TABLE[ids])
    if ids is not None and label_ids:
        label = write_gray_png(gt / f"{stem}_gtFine_labelIds.png", ids.astype(np.uint8))
    if ids is not None and extras:
        _write_cityscapes_extras(gt, stem, ids)
    expected = _CS_TABLE[ids] if ids is not None and split != "test" else None
    return WrittenSample(stem, split, image, label if split != "test" else None, expected)


def _write_cityscapes_extras(gt: Path, stem: str, ids: np.ndarray) -> None:
    # Files a real gtFine folder holds beside the labels; ingest must ignore them.
    instance = ids.astype(np.uint16) * 1000 + 7  # 16-bit, values far outside any id table
    write_gray_png(gt / f"{stem}_gtFine_instanceIds.png", instance)
    colour = np.array(CITYSCAPES_COLOURS, np.uint8)[np.minimum(ids, 33)]
    write_rgb_png(gt / f"{stem}_gtFine_color.png", colour)
    (gt / f"{stem}_gtFine_polygons.json").write_text('{"imgHeight": 0, "imgWidth": 0, "objects": []}')


def write_cityscapes(root: str | Path, per_city: int = 2, size: tuple[int, int] = CITYSCAPES_DEFAULT_SIZE,
                     seed: int = 0, cities: dict[str, tuple[str, ...]] | None = None,
                     train_ids_only: tuple[str, ...] = ("bochum",)) -> list[WrittenSample]:
    """Cityscapes frames in `leftImg8bit/` and `gtFine/`.

    Cities in `train_ids_only` have only `_gtFine_labelTrainIds.png`, the others both labelIds and
    labelTrainIds. Test cities get placeholder labels (all unlabelled), as the public release does.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    written = []
    for split, split_cities in (cities or DEFAULT_CITIES).items():
        for city in split_cities:
            for frame in range(per_city):
                ids = scene_ids(rng, size, (_CS_SKY, _CS_BUILDING, _CS_ROAD, _CS_SIDEWALK), _CS_OBJECTS)
                rgb = render_rgb(rng, ids)
                labels = np.zeros_like(ids) if split == "test" else ids
                written.append(write_cityscapes_frame(
                    root, split, city, 0, 19 + frame, rgb, labels,
                    label_ids=city not in train_ids_only))
    return written


# --- SYNTHIA -----------------------------------------------------------------------------------


def write_synthia_label(path: Path, ids: np.ndarray, seed: int = 0) -> Path:
    """A 16-bit 3-channel PNG: class id in R, junk instance ids in G and B (written BGR by OpenCV)."""
    rng = np.random.default_rng(seed)
    height, width = ids.shape
    bgr = np.empty((height, width, 3), np.uint16)
    bgr[:, :, 0] = rng.integers(1, 60000, size=(height, width))
    bgr[:, :, 1] = rng.integers(1, 3000, size=(height, width))
    bgr[:, :, 2] = ids
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"cannot write {path}")
    return path


def write_synthia_frame(root: Path, stem: str, rgb: np.ndarray, ids: np.ndarray | None,
                        seed: int = 0) -> WrittenSample:
    """One SYNTHIA frame; `ids` (any integer dtype, 16-bit allowed) None writes no label."""
    image = write_rgb_png(root / "RGB" / f"{stem}.png", rgb)
    label = write_synthia_label(root / "GT" / "LABELS" / f"{stem}.png", ids, seed) if ids is not None else None
    expected = _SY_TABLE[ids] if ids is not None and int(ids.max()) < 23 else None
    return WrittenSample(f"synthia_{stem}", "train", image, label, expected)


def write_synthia(root: str | Path, n: int = 4, size: tuple[int, int] = SYNTHIA_DEFAULT_SIZE, seed: int = 0,
                  first: int = 0) -> list[WrittenSample]:
    """`n` SYNTHIA-RAND-CITYSCAPES frames `RGB/NNNNNNN.png` + `GT/LABELS/NNNNNNN.png` (+ GT/COLOR)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    written = []
    for number in range(first, first + n):
        ids = scene_ids(rng, size, (_SY_SKY, _SY_BUILDING, _SY_ROAD, _SY_SIDEWALK), _SY_OBJECTS)
        stem = f"{number:07d}"
        written.append(write_synthia_frame(root, stem, render_rgb(rng, ids), ids, seed=seed + number))
        # The release also ships colour-coded labels; ingest must ignore them.
        write_rgb_png(root / "GT" / "COLOR" / f"{stem}.png", render_rgb(rng, ids))
    return written
