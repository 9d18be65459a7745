"""Reading a prepared directory as torch tensors, with deterministic per-sample augmentation."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from segshift.components.data.image_checks import ImageCheckError, require_png
from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.data.manifest import ManifestError, read_manifest
from segshift.components.models.classes import protocol_classes, to_protocol_ids

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ManifestError(f"{path}: cannot read image (missing or corrupt)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: Path) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
        require_png(data, str(path))
    except OSError as error:
        raise ManifestError(f"{path}: cannot read label ({error.strerror or error})") from None
    except ImageCheckError as error:
        raise ManifestError(str(error)) from None
    return decode_label(data, str(path))


def decode_label(data: bytes, name: str) -> np.ndarray:
    """The train-id map of PNG bytes already read; ManifestError naming `name` otherwise."""
    label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2 or label.dtype != np.uint8:
        raise ManifestError(f"{name}: expected a single-channel uint8 train-id PNG")
    return label


def to_tensor(image: np.ndarray, per_image_norm: bool = False) -> torch.Tensor:
    """HWC uint8 RGB -> normalised CHW float. `per_image_norm` whitens each channel per image."""
    x = image.astype(np.float32) / 255.0
    if per_image_norm:
        x = (x - x.mean(axis=(0, 1))) / (x.std(axis=(0, 1)) + 1e-6)
    else:
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def random_crop_flip(image: np.ndarray, label: np.ndarray | None, crop: tuple[int, int] | None,
                     flip: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop [height, width] at a random position (padding with ignore if the image is smaller)."""
    if crop is not None:
        ch, cw = crop
        h, w = image.shape[:2]
        if h < ch or w < cw:
            pad = ((0, max(0, ch - h)), (0, max(0, cw - w)))
            image = np.pad(image, pad + ((0, 0),))
            label = None if label is None else np.pad(label, pad, constant_values=IGNORE_INDEX)
            h, w = image.shape[:2]
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = image[y:y + ch, x:x + cw]
        label = None if label is None else label[y:y + ch, x:x + cw]
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
    return image, label


class PreparedSplit(Dataset):
    """One split of a prepared domain.

    Index with an int for the plain sample, or with `(index, seed)` for a randomly cropped and
    flipped one (and, with `augmentation`, scaled, colour-jittered and blurred) whose randomness
    comes only from `seed` (so any worker reproduces it).

    `ids` keeps only those samples, in that order; `label_paths` (sample id -> absolute path)
    replaces their labels, e.g. with pseudo-labels.

    `protocol` (a `model.classes`): the labels indexing returns, in the ids of that protocol's head
    (`classes.to_protocol_ids`; synthia16: terrain, truck and train -> 255). Label files always hold
    train ids; the training stages read them through this (evaluation reads train ids: the default,
    cityscapes19, changes nothing).

    A sample may also have a native-resolution label (the manifest's optional `label_full`):
    indexing never returns it (training and batching see the prepared size only); evaluation reads
    it with `full_label(i)` when `has_full_labels`.
    """

    def __init__(self, prepared_dir: str | Path, split: str, need_labels: bool = True,
                 cache: bool = False, crop: tuple[int, int] | None = None, flip: bool = False,
                 per_image_norm: bool = False, ids: list[str] | None = None,
                 label_paths: dict[str, Path] | None = None, augmentation=None,
                 protocol: str = "cityscapes19"):
        self.root = Path(prepared_dir)
        table = read_manifest(self.root)
        rows = [r for r in table.to_pylist() if r["split"] == split]
        if ids is not None:
            rows = _select(rows, ids, f"{self.root}: split '{split}'")
        if label_paths is not None:
            rows = [{**r, "label": str(label_paths[r["sample_id"]]), "label_full": None}
                    if r["sample_id"] in label_paths else r for r in rows]
        if not rows:
            raise ManifestError(f"{self.root}: split '{split}' is empty")
        if need_labels and any(r["label"] is None for r in rows):
            raise ManifestError(f"{self.root}: split '{split}' has unlabelled samples")
        self.rows, self.split, self.need_labels = rows, split, need_labels
        self.crop, self.flip, self.per_image_norm = crop, flip, per_image_norm
        self.augmentation = augmentation   # an AugmentationSpec (scale, jitter, blur), or None
        protocol_classes(protocol)          # an unknown protocol fails here, not in a loader worker
        self.protocol = protocol
        self._cache: list[tuple[np.ndarray, np.ndarray | None]] | None = None
        if cache:
            self._cache = [self._load(i) for i in range(len(rows))]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sizes(self) -> set[tuple[int, int]]:
        return {(r["height"], r["width"]) for r in self.rows}

    @property
    def has_full_labels(self) -> bool:
        """Whether any sample has a native-resolution label to score against."""
        return self.need_labels and any(r.get("label_full") for r in self.rows)

    def full_label(self, index: int) -> torch.Tensor:
        """Sample `index`'s native-resolution label as (H, W) int64; empty when it has none."""
        path = self.rows[index].get("label_full") if self.need_labels else None
        if not path:
            return torch.empty(0, dtype=torch.int64)
        return torch.from_numpy(read_label(self.root / path).astype(np.int64))

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        row = self.rows[i]
        label = read_label(self.root / row["label"]) if row["label"] and self.need_labels else None
        return read_rgb(self.root / row["image"]), label

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self._cache[index] if self._cache is not None else self._load(index)
        if seed is not None and self.augmentation is not None:
            from segshift.components.data.augment import augment
            image, label = augment(image, label, self.augmentation, np.random.default_rng(seed))
        elif seed is not None:
            image, label = random_crop_flip(image, label, self.crop, self.flip,
                                            np.random.default_rng(seed))
        if label is not None:
            label = to_protocol_ids(label, self.protocol)
        target = torch.from_numpy(label.astype(np.int64)) if label is not None else torch.empty(0)
        return to_tensor(image, self.per_image_norm), target


def _select(rows: list[dict], ids: list[str], where: str) -> list[dict]:
    by_id = {r["sample_id"]: r for r in rows}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ManifestError(f"{where} has no sample(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                            f"({len(missing)} of {len(ids)} asked for)")
    return [by_id[i] for i in ids]


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's share of every step's global batch, as (index, augmentation seed) pairs.

    Step `s` draws from epoch-wise permutations seeded by (seed, stream, epoch), so the global batch
    of a step never depends on the number of workers, and a resumed run (start_step > 0) sees
    exactly the batches an uninterrupted one would have.
    """

    def __init__(self, dataset_size: int, global_batch: int, seed: int, stream: int,
                 start_step: int, total_steps: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} workers")
        self.n, self.batch, self.seed, self.stream = dataset_size, global_batch, seed, stream
        self.start, self.total, self.rank, self.world = start_step, total_steps, rank, world_size
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm_epoch = epoch
            self._perm = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
        return self._perm

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        positions = range(step * self.batch, (step + 1) * self.batch)
        out = []
        for p in positions:
            epoch, offset = divmod(p, self.n)
            index = int(self._permutation(epoch)[offset])
            out.append((index, int(np.random.default_rng([self.seed, self.stream, p, 1]).integers(2**31))))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            yield self.global_batch(step)[self.rank::self.world]
