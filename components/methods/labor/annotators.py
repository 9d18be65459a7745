"""Who labels LabOR's selected pixels: the `Annotator` interface, the `OracleAnnotator` (target
ground truth, in experiments) and the `FileAnnotator` (a person, through label files)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from segshift.components.data.dataset import PreparedSplit, decode_label, read_label
from segshift.components.data.image_checks import ImageCheckError, header_size, require_png
from segshift.components.data.labels import IGNORE_INDEX, NUM_CLASSES, invalid_train_ids
from segshift.components.io import write_png
from segshift.components.methods.labor.step import _as_mask, _as_numpy, connected_regions
from segshift.components.methods.rounds import StageInputError, label_file

if TYPE_CHECKING:
    from segshift.components.methods.rounds import RoundContext


@runtime_checkable
class Annotator(Protocol):
    """Whoever labels the selected pixels: the oracle in experiments, a labelling tool in use.

    `reveal(sample_ids, masks)` gets, per target sample, a bool (H, W) map of the pixels asked for
    and returns, per sample, an (H, W) label map with the class of every asked pixel (IGNORE_INDEX
    where the annotator saw void) and IGNORE_INDEX everywhere else: never a label for a pixel that
    was not asked for. `start_stage(name)` tells it a new labelling stage begins (for its books or
    its user interface).
    """

    def start_stage(self, name: str) -> None: ...

    def reveal(self, sample_ids: Sequence[str], masks: Sequence[np.ndarray]) -> list[np.ndarray]: ...


class OracleAnnotator:
    """An annotator that knows the ground truth: reveals it for the asked pixels only, and keeps
    books per stage of what that cost.

    Per stage (`ledger`, one dict per stage, in order): `stage` name, `queries` (reveal calls),
    `images` (distinct samples asked about), `pixels` (pixels answered, a pixel asked twice counts
    twice: a person would label it twice), `new_pixels` (pixels never revealed before),
    `share` (pixels / all target pixels), `regions` (8-connected regions of the asked masks: the
    segments or clicks a person would handle; for point labelling, the number of points unless two
    touch). Reveals before any `start_stage` go to a stage named "default".

    `ground_truth` maps sample id -> (H, W) integer label map (train ids, IGNORE_INDEX for void);
    it is read, never copied or modified. All target pixels = the sum of their sizes.
    """

    def __init__(self, ground_truth: Mapping[str, np.ndarray], total_pixels: int | None = None):
        self._truth = ground_truth
        # given when `ground_truth` is read lazily (from files): counting would read every map
        self.total_pixels = int(total_pixels if total_pixels is not None else
                                sum(np.asarray(label).size for label in ground_truth.values()))
        if self.total_pixels == 0:
            raise ValueError("the oracle needs ground truth for at least one target pixel")
        self._ledger: list[dict] = []
        self._stage_images: list[set[str]] = []
        self._revealed: dict[str, np.ndarray] = {}

    def start_stage(self, name: str) -> None:
        name = str(name)
        if any(entry["stage"] == name for entry in self._ledger):
            raise ValueError(f"labelling stage {name!r} already exists; stage names must be unique")
        self._ledger.append({"stage": name, "queries": 0, "images": 0, "pixels": 0, "new_pixels": 0,
                             "share": 0.0, "regions": 0})
        self._stage_images.append(set())

    def reveal(self, sample_ids: Sequence[str], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
        sample_ids = list(sample_ids)
        masks = [_as_numpy(m) for m in masks]
        if len(sample_ids) != len(masks):
            raise ValueError(f"{len(sample_ids)} sample ids but {len(masks)} masks")
        checked = []
        for sample_id, mask in zip(sample_ids, masks):      # check everything before answering
            if sample_id not in self._truth:
                raise ValueError(f"no ground truth for sample {sample_id!r}")
            truth = np.asarray(self._truth[sample_id])
            mask = _as_mask(mask, f"mask of {sample_id!r}")
            if mask.shape != truth.shape:
                raise ValueError(f"mask of {sample_id!r} is {mask.shape}, its ground truth {truth.shape}")
            checked.append((sample_id, truth, mask))
        if not self._ledger:
            self.start_stage("default")
        entry, images = self._ledger[-1], self._stage_images[-1]
        labels = []
        for sample_id, truth, mask in checked:
            answer = np.full(truth.shape, IGNORE_INDEX, dtype=truth.dtype)
            answer[mask] = truth[mask]
            labels.append(answer)
            seen = self._revealed.setdefault(sample_id, np.zeros(truth.shape, bool))
            entry["pixels"] += int(mask.sum())
            entry["new_pixels"] += int((mask & ~seen).sum())
            entry["regions"] += connected_regions(mask)[0]
            seen |= mask
            images.add(sample_id)
        entry["queries"] += 1
        entry["images"] = len(images)
        entry["share"] = entry["pixels"] / self.total_pixels
        return labels

    @property
    def ledger(self) -> list[dict]:
        """The books, one dict per stage (copies: editing them changes nothing)."""
        return [dict(entry) for entry in self._ledger]

    @property
    def revealed_pixels(self) -> int:
        """Distinct target pixels revealed so far, over all stages."""
        return int(sum(int(seen.sum()) for seen in self._revealed.values()))

    @property
    def revealed_share(self) -> float:
        """Distinct revealed pixels / all target pixels."""
        return self.revealed_pixels / self.total_pixels


class LazyLabels(Mapping):
    """Target train ground truth read on demand (only the images the oracle is asked about)."""

    def __init__(self, dataset: PreparedSplit):
        self._paths = {row["sample_id"]: dataset.root / row["label"] for row in dataset.rows}

    def __getitem__(self, sample_id: str) -> np.ndarray:
        return read_label(self._paths[sample_id])

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


class AnnotationsPending(StageInputError):
    """The file annotator asked a person for labels that are not there yet."""


class AnswerError(StageInputError):
    """A person's label file that is not a PNG of the request's size holding train ids."""


class FileAnnotator:
    """A person labels the asked pixels: requests are written as masks (255 = label this pixel)
    to `<dir>/<stage>/requests/<id>.png`; the answers are read from `<dir>/<stage>/labels/<id>.png`
    (train ids; anything outside the request is ignored). Until every answer exists the stage
    stops with AnnotationsPending, and running it again continues from there."""

    def __init__(self, directory: Path, total_pixels: int):
        self.directory = directory
        self.books = OracleAnnotator(_AnswerFiles(self), total_pixels=total_pixels)
        self.stage = "default"

    def start_stage(self, name: str) -> None:
        self.stage = name
        self.books.start_stage(name)

    def answer_path(self, sample_id: str) -> Path:
        return label_file(self.directory / self.stage / "labels", sample_id)

    def reveal(self, sample_ids, masks) -> list[np.ndarray]:
        missing = []
        for sample_id, mask in zip(sample_ids, masks):
            request = label_file(self.directory / self.stage / "requests", sample_id)
            if not request.is_file():
                write_png(request, np.asarray(mask, np.uint8) * 255)
            if not self.answer_path(sample_id).is_file():
                missing.append(sample_id)
        if not missing:
            for sample_id, mask in zip(sample_ids, masks):
                self.check_answer(sample_id, np.asarray(mask).shape)
        if missing:
            raise AnnotationsPending(
                f"LabOR {self.stage}: {len(missing)} images wait for labels (first: {missing[0]}); "
                f"label the white pixels of {self.directory / self.stage / 'requests'}/<id>.png into "
                f"{self.directory / self.stage / 'labels'}/<id>.png (train ids, 255 elsewhere) and run the stage again")
        return self.books.reveal(sample_ids, masks)

    def check_answer(self, sample_id: str, shape: tuple[int, int]) -> None:
        """A person's label file is checked as an ingested one is: a PNG of the request's size
        holding train ids, read before it may reach the loss."""
        path = self.answer_path(sample_id)
        data = path.read_bytes()
        try:
            require_png(data, str(path))
        except ImageCheckError as error:
            raise AnswerError(f"{error}; save the answer as a PNG of train ids") from None
        size = header_size(data)
        if size != (shape[1], shape[0]):
            got = f"{size[0]}x{size[1]}" if size else "of unreadable size"
            raise AnswerError(f"{path}: the label is {got}, its request {shape[1]}x{shape[0]} "
                              "(width x height); label the request's image at its own size")
        bad = invalid_train_ids(decode_label(data, str(path)))
        if bad:
            raise AnswerError(f"{path}: train id(s) {bad[:10]} are neither a class (0..{NUM_CLASSES - 1}) "
                              f"nor ignore ({IGNORE_INDEX})")

    @property
    def ledger(self) -> list[dict]:
        return self.books.ledger

    @property
    def total_pixels(self) -> int:
        return self.books.total_pixels

    @property
    def revealed_share(self) -> float:
        return self.books.revealed_share


class _AnswerFiles(Mapping):
    def __init__(self, annotator: FileAnnotator):
        self._annotator = annotator

    def __getitem__(self, sample_id: str) -> np.ndarray:
        path = self._annotator.answer_path(sample_id)
        if not path.is_file():
            raise KeyError(sample_id)
        return read_label(path)

    def __contains__(self, sample_id) -> bool:
        return self._annotator.answer_path(sample_id).is_file()

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def build_annotator(context: RoundContext):
    labor = context.params.methods.labor
    dataset = PreparedSplit(context.prepared / "target", "train")
    total = sum(row["height"] * row["width"] for row in dataset.rows)
    if labor.annotator == "files":
        return FileAnnotator(context.path(labor.annotations), total)
    return OracleAnnotator(LazyLabels(dataset), total_pixels=total)
