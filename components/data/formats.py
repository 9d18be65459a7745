"""The original on-disk formats of GTA5, Cityscapes and SYNTHIA-RAND-CITYSCAPES, and their conversion.

Two halves:
- discovery: from one listing of a root, pair every image with its label, assign a split and a
  sample id (`discover_samples`); pairing problems are collected, not raised, so that all of them
  can be reported at once;
- conversion of one sample (`convert_sample`): read, decode, validate, map to train ids, resize,
  encode and write. The decoding and validation steps are pure functions of bytes/arrays, reusable
  by any reader of the original formats.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from segshift.components.data.labels import (
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_NUM_LABEL_IDS,
    NUM_CLASSES,
    SYNTHIA_ID_TO_TRAINID,
    SYNTHIA_NUM_LABEL_IDS,
    ids_outside_table,
    invalid_train_ids,
    lookup_table,
)
from segshift.components.data.image_checks import ImageCheckError, check_pixels, require_png
from segshift.components.data.manifest import SampleRecord, SkippedSample
from segshift.components.data.storage import DatasetRoot
from segshift.components.io import encode_png
from segshift.components.paths import UnsafePathError, checked_id

DatasetKind = Literal["gta5", "cityscapes", "synthia"]
LabelEncoding = Literal["cityscapes_ids", "cityscapes_train_ids", "synthia_ids"]
Size = tuple[int, int]  # (width, height), as OpenCV and the config take it

DATASET_KINDS: tuple[str, ...] = ("gta5", "cityscapes", "synthia")
DOMAIN_OF: dict[str, str] = {"gta5": "source", "synthia": "source", "cityscapes": "target"}
# The sizes the reference works train at (MISSION.md §2.1); SYNTHIA keeps its 1280x760 frames.
STANDARD_SIZES: dict[str, Size] = {"gta5": (1280, 720), "cityscapes": (1024, 512), "synthia": (1280, 760)}
EXPECTED_LAYOUT: dict[str, str] = {
    "gta5": "images/NNNNN.png and labels/NNNNN.png",
    "cityscapes": "leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png and "
                  "gtFine/<split>/<city>/<stem>_gtFine_labelIds.png",
    "synthia": "RGB/NNNNNNN.png and GT/LABELS/NNNNNNN.png",
}

CITYSCAPES_SPLITS: tuple[str, ...] = ("train", "val", "test")
# Cityscapes test labels are public placeholders, so the test split is treated as unlabelled.
CITYSCAPES_UNLABELLED_SPLITS: frozenset[str] = frozenset({"test"})
# OpenCV's fastest PNG level: photographs barely shrink at higher levels, label maps compress well anyway.
PNG_COMPRESSION = 1
MAX_LISTED_PROBLEMS = 10
NON_STRICT_HINT = "set strict: false (or --no-strict) to skip them"

_CITYSCAPES_TABLE = lookup_table(CITYSCAPES_ID_TO_TRAINID, CITYSCAPES_NUM_LABEL_IDS)
_SYNTHIA_TABLE = lookup_table(SYNTHIA_ID_TO_TRAINID, SYNTHIA_NUM_LABEL_IDS)

_GTA5_IMAGE = re.compile(r"^images/([^/]+)\.png$")
_SYNTHIA_IMAGE = re.compile(r"^RGB/([^/]+)\.png$")
_CITYSCAPES_IMAGE = re.compile(r"^leftImg8bit/(train|val|test)/([^/]+)/([^/]+)_leftImg8bit\.png$")


class IngestError(ValueError):
    """A raw dataset that cannot be converted; the message names the file(s) and the reason."""


@dataclass(frozen=True)
class RawSample:
    """One image of a raw dataset and its label, as relative paths inside the root."""

    sample_id: str
    dataset: str
    split: str
    image: str
    label: str | None
    label_encoding: LabelEncoding | None

    @property
    def domain(self) -> str:
        return DOMAIN_OF[self.dataset]


@dataclass(frozen=True)
class Problem:
    """A file that cannot become a sample, found before any decoding."""

    file: str  # relative to the root
    reason: str


@dataclass(frozen=True)
class Discovery:
    samples: list[RawSample]
    problems: list[Problem]


# --- discovery -------------------------------------------------------------------------------


def discover_samples(kind: str, root: DatasetRoot) -> Discovery:
    """List `root` once and pair its images with labels; errors only if it holds no samples at all."""
    check_kind(kind)
    files = root.list_files()
    if not files:
        raise IngestError(f"{root.describe()}: dataset root is empty (or the prefix does not exist)")
    discovery = pair_files(kind, files)
    if not discovery.samples and not discovery.problems:
        raise IngestError(f"{root.describe()}: no {kind} images found; expected {EXPECTED_LAYOUT[kind]} "
                          f"(found top-level entries: {', '.join(top_level_entries(files))})")
    return discovery


def check_kind(kind: str) -> None:
    if kind not in DATASET_KINDS:
        raise IngestError(f"unknown dataset kind {kind!r}; expected one of {list(DATASET_KINDS)}")


def pair_files(kind: str, files: list[str]) -> Discovery:
    """Pure pairing of a root's relative file list; the order of samples is deterministic."""
    check_kind(kind)
    if kind == "gta5":
        return _pair_flat(files, _GTA5_IMAGE, "labels/{stem}.png", "gta5", "cityscapes_ids")
    if kind == "synthia":
        return _pair_flat(files, _SYNTHIA_IMAGE, "GT/LABELS/{stem}.png", "synthia", "synthia_ids")
    return _pair_cityscapes(files)


def _pair_flat(files: list[str], image_pattern: re.Pattern[str], label_template: str, dataset: str,
               encoding: LabelEncoding) -> Discovery:
    present = set(files)
    samples: list[RawSample] = []
    problems: list[Problem] = []
    for rel in sorted(files):
        match = image_pattern.match(rel)
        if match is None:
            continue
        stem = match.group(1)
        label = label_template.format(stem=stem)
        if label not in present:
            problems.append(Problem(rel, f"no label file (expected {label})"))
            continue
        samples.append(RawSample(f"{dataset}_{stem}", dataset, "train", rel, label, encoding))
    return Discovery(samples, problems)


def _pair_cityscapes(files: list[str]) -> Discovery:
    present = set(files)
    samples: list[RawSample] = []
    problems: list[Problem] = []
    for rel in sorted(files):
        match = _CITYSCAPES_IMAGE.match(rel)
        if match is None:
            continue
        split, city, stem = match.groups()
        if split in CITYSCAPES_UNLABELLED_SPLITS:
            samples.append(RawSample(stem, "cityscapes", split, rel, None, None))
            continue
        label_ids = f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"
        train_ids = f"gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png"
        # labelIds is the canonical annotation; labelTrainIds is derived and may use another mapping.
        if label_ids in present:
            samples.append(RawSample(stem, "cityscapes", split, rel, label_ids, "cityscapes_ids"))
        elif train_ids in present:
            samples.append(RawSample(stem, "cityscapes", split, rel, train_ids, "cityscapes_train_ids"))
        else:
            problems.append(Problem(rel, f"no gtFine label (expected {label_ids} "
                                         "or _gtFine_labelTrainIds.png)"))
    return Discovery(samples, problems)


def top_level_entries(files: list[str], limit: int = 8) -> list[str]:
    entries = sorted({rel.split("/", 1)[0] + ("/" if "/" in rel else "") for rel in files})
    return entries[:limit] + ([f"... {len(entries) - limit} more"] if len(entries) > limit else [])


def problems_error(kind: str, root: DatasetRoot, problems: list[Problem]) -> IngestError:
    """One error for all pairing problems: the first few files, the total and how to go on."""
    lines = [f"  {root.describe(p.file)}: {p.reason}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return IngestError(f"{len(problems)} {kind} image(s) under {root.describe()} cannot be paired with "
                       f"a label:\n" + "\n".join(lines) + f"\n{NON_STRICT_HINT}")


# --- decoding and validation (pure) -----------------------------------------------------------


def decode_image(data: bytes, name: str) -> np.ndarray:
    """An encoded image as an (H, W, 3) uint8 RGB array."""
    bgr = _imdecode(data, cv2.IMREAD_COLOR, name)
    if bgr is None:
        raise IngestError(f"{name}: cannot decode image ({_empty_or_corrupt(data)})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_label_ids(data: bytes, encoding: LabelEncoding, name: str) -> np.ndarray:
    """The raw per-pixel ids of a label file, before any mapping: (H, W), uint8 or uint16."""
    if encoding == "synthia_ids":
        return _decode_synthia_ids(data, name)
    return _decode_indexed_png(data, name)


def _decode_indexed_png(data: bytes, name: str) -> np.ndarray:
    try:
        image = Image.open(BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise IngestError(f"{name}: cannot decode label ({_empty_or_corrupt(data)}: {error})") from error
    if image.mode not in ("P", "L"):
        raise IngestError(f"{name}: label must be an 8-bit palette or grayscale PNG holding ids, "
                          f"got mode {image.mode}")
    # For a palette PNG (GTA5) this is the index, which is the id; the colours are never applied.
    return np.asarray(image)


def _decode_synthia_ids(data: bytes, name: str) -> np.ndarray:
    # PIL cannot read SYNTHIA's 16-bit multi-channel PNGs; OpenCV returns them in BGR order.
    decoded = _imdecode(data, cv2.IMREAD_UNCHANGED, name)
    if decoded is None:
        raise IngestError(f"{name}: cannot decode label ({_empty_or_corrupt(data)})")
    if decoded.ndim == 2:
        return decoded
    if decoded.ndim == 3 and decoded.shape[2] >= 3:
        return decoded[:, :, 2]
    raise IngestError(f"{name}: SYNTHIA label must have the class id in its R channel; "
                      f"got shape {decoded.shape}")


def _imdecode(data: bytes, flags: int, name: str) -> np.ndarray | None:
    if not data:
        return None
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as error:   # OpenCV raises for sizes beyond its own limits, among others
        message = str(error).strip().splitlines()[-1][:200]
        raise IngestError(f"{name}: cannot decode ({message})") from None


def _empty_or_corrupt(data: bytes) -> str:
    return "empty file" if not data else "corrupt or truncated file"


def label_to_train_ids(ids: np.ndarray, encoding: LabelEncoding, name: str) -> np.ndarray:
    """Map raw ids to uint8 train ids (0..18, 255 = ignore); ids outside the format's table are errors."""
    if encoding == "cityscapes_train_ids":
        bad = invalid_train_ids(ids)
        if bad:
            raise IngestError(f"{name}: train id(s) {bad} are neither a class (0..{NUM_CLASSES - 1}) "
                              "nor ignore (255)")
        return ids.astype(np.uint8, copy=False)
    table, num_ids = ((_SYNTHIA_TABLE, SYNTHIA_NUM_LABEL_IDS) if encoding == "synthia_ids"
                      else (_CITYSCAPES_TABLE, CITYSCAPES_NUM_LABEL_IDS))
    # Checked before the lookup: a 16-bit id like 259 would otherwise alias a valid 8-bit index.
    bad = ids_outside_table(ids, num_ids)
    if bad:
        raise IngestError(f"{name}: label id(s) {bad} outside the {_table_name(encoding)} table "
                          f"(0..{num_ids - 1})")
    return table[ids]


def _table_name(encoding: LabelEncoding) -> str:
    return "SYNTHIA" if encoding == "synthia_ids" else "Cityscapes label-id"


def check_same_size(image: np.ndarray, label: np.ndarray, image_name: str, label_name: str) -> None:
    image_h, image_w = image.shape[:2]
    label_h, label_w = label.shape[:2]
    if (image_h, image_w) != (label_h, label_w):
        raise IngestError(f"{label_name}: label size {label_w}x{label_h} differs from image size "
                          f"{image_w}x{image_h} ({image_name})")


def resize_image(image: np.ndarray, size: Size | None) -> np.ndarray:
    if size is None or (image.shape[1], image.shape[0]) == tuple(size):
        return image
    width, height = size
    shrinking = width <= image.shape[1] and height <= image.shape[0]
    # INTER_AREA averages the source pixels when shrinking (no aliasing); it blurs when enlarging.
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def resize_label(label: np.ndarray, size: Size | None) -> np.ndarray:
    if size is None or (label.shape[1], label.shape[0]) == tuple(size):
        return label
    # Nearest neighbour: class ids must never be blended into other ids.
    return cv2.resize(label, tuple(size), interpolation=cv2.INTER_NEAREST)


def encode_image_png(rgb: np.ndarray) -> bytes:
    return encode_png(rgb, rgb=True, compression=PNG_COMPRESSION)


def encode_label_png(train_ids: np.ndarray) -> bytes:
    return encode_png(train_ids, rgb=False, compression=PNG_COMPRESSION)


# --- conversion of one sample -----------------------------------------------------------------


@dataclass(frozen=True)
class ConvertedSample:
    """A decoded, validated and resized sample, ready to be written."""

    image: np.ndarray          # (H, W, 3) uint8 RGB
    label: np.ndarray | None   # (H, W) uint8 train ids; None when unlabelled
    # The train ids at the native resolution, kept (on request) only when `label` was resized.
    label_full: np.ndarray | None = None


def load_sample(sample: RawSample, root: DatasetRoot, size: Size | None, max_pixels: int,
                keep_full_label: bool = False) -> ConvertedSample:
    """Read and decode one raw sample into train ids at `size`; raises IngestError naming the file.

    With `keep_full_label`, a label that `size` changes is also returned at its native resolution
    (`label_full`, the unresized train ids), for scoring at full resolution as the reference works
    do. Images larger than `max_pixels` and labels that are not PNG are refused before decoding."""
    image_name = root.describe(sample.image)
    try:
        checked_id(sample.sample_id, "sample id")   # it becomes the prepared file's name
    except UnsafePathError as error:
        raise IngestError(f"{image_name}: {error}") from None
    image = decode_image(_checked(root.read_bytes(sample.image), image_name, max_pixels), image_name)
    if sample.label is None or sample.label_encoding is None:
        return ConvertedSample(resize_image(image, size), None)
    label_name = root.describe(sample.label)
    label_data = _checked(root.read_bytes(sample.label), label_name, max_pixels, label=True)
    ids = decode_label_ids(label_data, sample.label_encoding, label_name)
    check_same_size(image, ids, image_name, label_name)
    train_ids = label_to_train_ids(ids, sample.label_encoding, label_name)
    label = resize_label(train_ids, size)
    full = train_ids if keep_full_label and label.shape != train_ids.shape else None
    return ConvertedSample(resize_image(image, size), label, full)


def _checked(data: bytes, name: str, max_pixels: int, label: bool = False) -> bytes:
    try:
        check_pixels(data, name, max_pixels)
        if label:
            require_png(data, name)
    except ImageCheckError as error:
        raise IngestError(str(error)) from None
    return data


def prepared_paths(sample: RawSample) -> tuple[str, str | None]:
    """Paths of the prepared image and label, relative to the output directory."""
    image = f"images/{sample.split}/{sample.sample_id}.png"
    label = f"labels/{sample.split}/{sample.sample_id}.png" if sample.label is not None else None
    return image, label


def full_label_path(sample: RawSample) -> str:
    """Path of the native-resolution label kept beside the resized one, relative to the output."""
    return f"labels_full/{sample.split}/{sample.sample_id}.png"


def write_converted(sample: RawSample, converted: ConvertedSample, out_dir: Path) -> SampleRecord:
    image_rel, label_rel = prepared_paths(sample)
    _write(out_dir / image_rel, encode_image_png(converted.image))
    if label_rel is not None and converted.label is not None:
        _write(out_dir / label_rel, encode_label_png(converted.label))
    full_rel = None
    if label_rel is not None and converted.label_full is not None:
        full_rel = full_label_path(sample)
        _write(out_dir / full_rel, encode_label_png(converted.label_full))
    height, width = converted.image.shape[:2]
    return SampleRecord(sample_id=sample.sample_id, dataset=sample.dataset, domain=sample.domain,
                        split=sample.split, image=image_rel, label=label_rel,
                        height=int(height), width=int(width), label_full=full_rel)


def _write(path: Path, data: bytes) -> None:
    # The whole output directory is swapped in atomically, so plain writes are enough here.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def convert_sample(sample: RawSample, *, root: DatasetRoot, out_dir: str, size: Size | None,
                   strict: bool, max_pixels: int,
                   full_label_splits: frozenset[str] = frozenset()) -> SampleRecord | SkippedSample:
    """Convert one sample into `out_dir` (a worker function: module level, picklable arguments).

    A labelled sample of a split in `full_label_splits` whose label `size` resizes also keeps its
    label at native resolution (labels_full/<split>/<id>.png, the manifest's `label_full`).
    A bad sample raises IngestError when `strict`, else it is returned as a SkippedSample.
    Storage failures always raise: they are not a property of the sample.
    """
    try:
        converted = load_sample(sample, root, size, max_pixels,
                                keep_full_label=sample.split in full_label_splits)
    except IngestError as error:
        if strict:
            raise
        return SkippedSample(file=root.describe(sample.image), reason=str(error))
    return write_converted(sample, converted, Path(out_dir))
