"""IntraDA's entropy ranking: score target images, split them easy/hard, make pseudo-labels.

Step 2 of IntraDA (Pan et al., CVPR 2020): the inter-domain model predicts every target training
image; each image is scored by the mean of its normalised entropy map, images are sorted by score
(ascending), the first floor(lambda * N) form the *easy* split and the rest the *hard* split; the
easy images' argmax predictions become pseudo-labels for the intra-domain stage.

The result lives in one directory (`rank.out_dir`):

    ranking.parquet          one row per target train image, in rank order (see RANKING_SCHEMA)
    pseudo_labels/<id>.png   uint8 train ids (255 = ignore), for the easy rows only

Everything here is plain library code (numpy, torch, pyarrow): no Ray, MLflow or CLI. The
`segshift rank` stage (pipelines/rank.py) runs `score_images` inside Ray Data actors and
`build_ranking_table` on the driver; the intra stage reads the result with `read_ranking`,
`check_ranking_matches`, `ranked_splits` and `pseudo_label_paths`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from segshift.components.data.labels import IGNORE_INDEX, NUM_CLASSES, RARE_CLASSES
from segshift.components.data.manifest import MANIFEST_NAME
from segshift.components.io import atomic_write_bytes
from segshift.components.losses import normalised_entropy, upsample
from segshift.components.models.classes import model_protocol, to_train_ids
from segshift.components.pseudo_labels import (LEVELS, apply_class_thresholds,
                                               class_balanced_thresholds, class_confidence_histogram,
                                               quantise_confidence)

RANKING_NAME = "ranking.parquet"
PSEUDO_LABEL_DIR = "pseudo_labels"
CONFIDENCE_DIR = "confidence"      # raw inference output only; never part of a published ranking
EASY, HARD = "easy", "hard"
EXAMPLES = 5          # ids quoted in error messages

RANKING_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),             # mean normalised entropy (raw)
    pa.field("score_normalised", pa.float64(), nullable=False),  # the ranking key; = score if off
    pa.field("rank", pa.int32(), nullable=False),                # 0 = easiest
    pa.field("split", pa.string(), nullable=False),              # easy | hard
    pa.field("mean_confidence", pa.float64(), nullable=False),   # mean max-softmax over pixels
    pa.field("class_histogram", pa.list_(pa.float32(), NUM_CLASSES), nullable=False),
    pa.field("pseudo_label", pa.string(), nullable=True),        # relative to out_dir; null if hard
    pa.field("condition", pa.string(), nullable=True),           # built-in data: weather/light
])

# Schema metadata (what the ranking was computed from); values are JSON.
META_MANIFEST = "segshift.manifest_sha256"
META_MODEL = "segshift.model_sha256"
META_LAMBDA = "segshift.lambda"
META_NORMALISATION = "segshift.entropy_normalisation"
META_THRESHOLD = "segshift.confidence_threshold"
META_CLASS_BALANCED = "segshift.class_balanced_share"
META_KEYS = (META_MANIFEST, META_MODEL, META_LAMBDA, META_NORMALISATION, META_THRESHOLD,
             META_CLASS_BALANCED)


class RankingError(ValueError):
    """A ranking that cannot be computed or used; the message says why and what to run."""


# -- pure helpers -----------------------------------------------------------------------------------

def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def image_scores(probs: Any) -> np.ndarray:
    """Score of each image of (N, C, H, W) softmax probabilities: the mean over its pixels of
    the normalised entropy -sum_c p log p / log C, in [0, 1]; float64, shape (N,).

    The reference (IntraDA `entropy.py`) averages ADVENT's `prob_2_entropy` map, -p log2 p / log2 C
    kept per class channel, over all N*C*H*W elements, i.e. it computes this score divided by C.
    A constant factor changes neither the ranking nor the split; ours stays in [0, 1].
    """
    probs = _as_tensor(probs).float()
    if probs.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) probabilities, got shape {tuple(probs.shape)}")
    return normalised_entropy(probs).flatten(1).double().mean(1).cpu().numpy()


def rare_classes_present(pred: Any) -> int:
    """How many of the 11 rare classes (RARE_CLASSES) occur in an (H, W) prediction."""
    present = np.unique(np.asarray(pred))
    return int(np.isin(np.asarray(RARE_CLASSES), present).sum())


def rare_class_normaliser(pred: Any) -> float:
    """IntraDA's entropy normalisation factor of one image's argmax prediction (H, W):

        normaliser = (R - r) / R + 0.5,   R = 11 rare classes, r = rare classes present in `pred`

    so it runs from 1.5 (no rare class) down to 0.5 (all 11). The normalised score is
    `score * normaliser`: images showing many rare classes (wall, fence, pole, light, sign,
    terrain, rider, truck, bus, train, motorcycle) rank easier, so their pseudo-labels reach the
    intra stage. Verified against the reference: IntraDA (github.com/feipanir/IntraDA, also
    cited as feipan664/IntraDA) `entropyrk/entropy.py` at 01de1351dc8b2d992accd9b3e0011d8d687c26fc,
    `normalizor = (11 - len(find_rare_class(pred_trg_main))) / 11.0 + 0.5`, where
    `find_rare_class` intersects the classes of the argmax prediction with
    rare_class = [3, 4, 5, 6, 7, 9, 12, 14, 15, 16, 17], and the image's entry is
    `pred_trg_entropy.mean() * normalizor`.
    """
    return _normaliser(rare_classes_present(pred))


def _normaliser(rare_present: Any) -> Any:
    total = len(RARE_CLASSES)
    return (total - rare_present) / total + 0.5


def split_counts(n: int, lam: float) -> tuple[int, int]:
    """(easy, hard) sizes for N images and share lambda: easy = floor(lambda * N).

    The floor is taken with a 1e-9 tolerance so that binary rounding cannot drop an image
    (0.29 * 100 is 28.999999999999996 in floating point; the reference's `int()` gives 28, we 29).
    Raises RankingError, naming lambda, N and both counts, when either split would be empty.
    """
    if not 0 < lam < 1:
        raise RankingError(f"rank.lambda = {lam} must be strictly between 0 and 1")
    easy = int(math.floor(lam * n + 1e-9))
    hard = n - easy
    if easy == 0 or hard == 0:
        hint = (f"use rank.lambda >= 1/N = {1 / n:.4g}" if n >= 2 and easy == 0 else
                f"use rank.lambda < {1 - 1 / n:.4g}" if n >= 2 else
                "prepare at least 2 target train images")
        raise RankingError(f"rank.lambda = {lam} with N = {n} target train images gives {easy} easy "
                           f"and {hard} hard images; both splits need at least one image ({hint})")
    return easy, hard


def split_by_lambda(scores: Sequence[float] | np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the easy and hard images, each in rank order (ascending score).

    Ties keep their input order (stable sort), so the result is deterministic for a fixed input
    order (the stage sorts by sample id first). Empty splits raise RankingError (`split_counts`).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"expected one score per image, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise RankingError(f"{int(np.isnan(scores).sum())} image score(s) are NaN; the model "
                           "produced non-finite outputs")
    easy, _ = split_counts(len(scores), lam)
    order = np.argsort(scores, kind="stable")
    return order[:easy], order[easy:]


def pseudo_label(probs: Any, threshold: float | None) -> np.ndarray:
    """Argmax train ids (uint8) of (C, H, W) or (N, C, H, W) probabilities; with a threshold,
    pixels whose max probability is below it become IGNORE_INDEX (255). Confidences are compared
    at the rank stage's 1/255 resolution (`pixel_thresholds`)."""
    probs = _as_tensor(probs)
    if probs.ndim not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (N, C, H, W) probabilities, got {tuple(probs.shape)}")
    confidence, label = probs.max(dim=-3)
    label = label.to(torch.uint8).cpu().numpy()
    if threshold is not None:
        level = pixel_thresholds([], threshold, None)[0]
        label[quantise_confidence(confidence.cpu().numpy()) < level] = IGNORE_INDEX
    return label


def auroc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the `positive` images (higher = more positive).

    Rank-based (Mann-Whitney U): the probability that a random positive scores above a random
    negative, ties counted one half (average ranks). 1 = perfect, 0.5 = chance or all tied,
    0 = reversed; NaN when either class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {positive.shape} must be 1-D, same length")
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                       # 1-based rank of the last member of each group
    average_rank = ends - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# -- inference on a batch -----------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchScores:
    """Per-image results of one batch (N images of one size)."""

    score: np.ndarray              # (N,) float64 mean normalised entropy
    normaliser: np.ndarray         # (N,) float64 rare-class factor (applied only if enabled)
    rare_present: np.ndarray       # (N,) int32
    mean_confidence: np.ndarray    # (N,) float64 mean max-softmax
    class_histogram: np.ndarray    # (N, NUM_CLASSES) float32 share of pixels per predicted class
    labels: np.ndarray             # (N, H, W) uint8 argmax train ids (no pixel dropped yet)
    confidence_q: np.ndarray       # (N, H, W) uint8 max softmax, quantised (pseudo_labels.py)
    entropy: np.ndarray | None = None      # (N, H, W) float32, when asked for (pictures)

    def confidence_histograms(self) -> np.ndarray:
        """(N, NUM_CLASSES, 256) int32: each image's pixels per predicted class and confidence level."""
        return np.stack([class_confidence_histogram(label, conf).astype(np.int32)
                         for label, conf in zip(self.labels, self.confidence_q)])


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax of the main head, upsampled (bilinear) to the image size: (N, C, H, W) float32."""
    logits = model(images).main.float()
    return upsample(logits, tuple(images.shape[-2:])).softmax(1)


@torch.inference_mode()
def score_images(model: torch.nn.Module, images: torch.Tensor, keep_entropy: bool = False) -> BatchScores:
    """Everything the ranking needs about a batch of same-size normalised images (N, 3, H, W).

    The entropy is normalised by log C of the head (16 for model.classes: synthia16); the argmax is
    mapped to train ids first, so labels, class histograms and the rare classes are in train ids."""
    probs = predict_probs(model, images)
    confidence, argmax = probs.max(1)
    argmax = to_train_ids(argmax, model_protocol(model))
    argmax_np = argmax.to(torch.uint8).cpu().numpy()
    _, _, h, w = probs.shape
    hist = torch.stack([torch.bincount(a.flatten(), minlength=max(NUM_CLASSES, probs.shape[1]))[:NUM_CLASSES]
                        for a in argmax]).double() / (h * w)
    rare = np.array([rare_classes_present(a) for a in argmax_np], np.int32)
    entropy = normalised_entropy(probs) if keep_entropy else None
    return BatchScores(
        score=image_scores(probs),
        normaliser=_normaliser(rare.astype(np.float64)),
        rare_present=rare,
        mean_confidence=confidence.flatten(1).double().mean(1).cpu().numpy(),
        class_histogram=hist.float().cpu().numpy(),
        labels=argmax_np,
        confidence_q=quantise_confidence(confidence.cpu().numpy()),
        entropy=None if entropy is None else entropy.cpu().numpy(),
    )


# -- pseudo-labels of the easy split ------------------------------------------------------------------

def confidence_name(sample_id: str) -> str:
    """Where an image's quantised confidence map lives beside its raw argmax label (relative)."""
    return f"{CONFIDENCE_DIR}/{sample_id}.png"


def pixel_thresholds(easy_histograms: Sequence[np.ndarray], threshold: float | None,
                     class_balanced_share: float | None) -> np.ndarray:
    """The uint8 confidence level each predicted class must reach to stay a pseudo-label pixel:
    the global `threshold` (at 1/255 resolution: level floor(255 t), so every pixel with
    confidence >= t stays and every one below t - 1/255 goes) and, with a class-balanced
    share, each class's CBST threshold over the easy images' summed histograms; the larger wins."""
    levels = np.zeros(NUM_CLASSES, np.int16)
    if threshold is not None:
        levels[:] = math.floor(threshold * (LEVELS - 1) + 1e-9)
    if class_balanced_share is not None:
        total = np.sum(np.stack(easy_histograms), axis=0) if len(easy_histograms) else \
            np.zeros((NUM_CLASSES, LEVELS), np.int64)
        levels = np.maximum(levels, class_balanced_thresholds(total, class_balanced_share))
    return levels


def write_pseudo_labels(table: pa.Table, levels: np.ndarray, raw_dir: str | Path,
                        out_dir: str | Path) -> dict[str, float]:
    """The easy rows' pseudo-labels: raw argmax labels and confidences from `raw_dir`
    (`pseudo_labels/`, `confidence/`), pixels below their class's level -> 255, written to
    `out_dir/pseudo_labels/` (which may be `raw_dir`: rewritten in place). Returns each easy
    image's share of ignored pixels."""
    from segshift.components.io import write_png
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    ignored: dict[str, float] = {}
    for sid, _ in pseudo_label_items(table):
        label = _read_uint8_png(raw_dir / pseudo_label_name(sid))
        confidence = _read_uint8_png(raw_dir / confidence_name(sid))
        label = apply_class_thresholds(label, confidence, levels)
        write_png(out_dir / pseudo_label_name(sid), label)
        ignored[sid] = float((label == IGNORE_INDEX).mean())
    return ignored


def _read_uint8_png(path: Path) -> np.ndarray:
    import cv2
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 2 or array.dtype != np.uint8:
        raise RankingError(f"{path}: missing or not a single-channel uint8 PNG; re-run `segshift rank`")
    return array


# -- the ranking table --------------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pseudo_label_name(sample_id: str) -> str:
    """Where an image's pseudo-label lives, relative to the ranking directory."""
    return f"{PSEUDO_LABEL_DIR}/{sample_id}.png"


def build_ranking_table(records: Sequence[Mapping[str, Any]], lam: float, normalise: bool,
                        threshold: float | None, manifest_sha256: str, model_sha256: str,
                        class_balanced_share: float | None = None) -> pa.Table:
    """The ranking of per-image `records` (sample_id, score, normaliser, mean_confidence,
    class_histogram, condition), in rank order with the provenance metadata.

    The ranking key is `score * normaliser` when `normalise`, else `score`; records are ordered by
    sample id first, so ties rank by sample id whatever order the records arrived in.
    """
    records = sorted(records, key=lambda r: r["sample_id"])
    ids = [r["sample_id"] for r in records]
    if len(set(ids)) != len(ids):
        raise RankingError(f"{len(ids) - len(set(ids))} duplicate sample id(s) among the scored images")
    score = np.array([r["score"] for r in records], np.float64)
    normaliser = np.array([r["normaliser"] for r in records], np.float64)
    key = score * normaliser if normalise else score.copy()
    easy_idx, hard_idx = split_by_lambda(key, lam)
    order = np.concatenate([easy_idx, hard_idx])
    n_easy = len(easy_idx)
    rows = []
    for rank, i in enumerate(order):
        r = records[int(i)]
        split = EASY if rank < n_easy else HARD
        rows.append({
            "sample_id": r["sample_id"], "score": float(score[i]), "score_normalised": float(key[i]),
            "rank": rank, "split": split, "mean_confidence": float(r["mean_confidence"]),
            "class_histogram": [float(v) for v in np.asarray(r["class_histogram"], np.float32)],
            "pseudo_label": pseudo_label_name(r["sample_id"]) if split == EASY else None,
            "condition": r.get("condition"),
        })
    metadata = {META_MANIFEST: manifest_sha256, META_MODEL: model_sha256, META_LAMBDA: lam,
                META_NORMALISATION: normalise, META_THRESHOLD: threshold,
                META_CLASS_BALANCED: class_balanced_share}
    schema = RANKING_SCHEMA.with_metadata({k: json.dumps(v) for k, v in metadata.items()})
    return pa.Table.from_pylist(rows, schema=schema)


def write_ranking(table: pa.Table, out_dir: str | Path) -> Path:
    """Write `ranking.parquet` into `out_dir` atomically."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return atomic_write_bytes(Path(out_dir) / RANKING_NAME, sink.getvalue())


def ranking_metadata(table: pa.Table) -> dict[str, Any]:
    """The provenance metadata of a ranking table, decoded: manifest_sha256, model_sha256, lambda,
    entropy_normalisation, confidence_threshold, class_balanced_share."""
    raw = table.schema.metadata or {}
    return {key.split(".", 1)[1]: json.loads(raw[key.encode()]) for key in META_KEYS
            if key.encode() in raw}


def read_ranking(out_dir: str | Path) -> pa.Table:
    """The ranking table of `out_dir` (rank order), checked against RANKING_SCHEMA."""
    path = Path(out_dir) / RANKING_NAME
    if not path.is_file():
        raise RankingError(f"{path}: no ranking; run `segshift rank` (dvc repro rank) first")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise RankingError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc}); "
                           "re-run `segshift rank`") from None
    problems = []
    for field in RANKING_SCHEMA:
        if field.name not in table.column_names:
            problems.append(f"missing column '{field.name}'")
        elif not table.schema.field(field.name).type.equals(field.type):
            problems.append(f"column '{field.name}' is {table.schema.field(field.name).type}, "
                            f"expected {field.type}")
    missing_meta = [k for k in META_KEYS if k.encode() not in (table.schema.metadata or {})]
    if missing_meta:
        problems.append(f"missing metadata {missing_meta}")
    if problems:
        raise RankingError(f"{path}: not a segshift ranking ({'; '.join(problems)}); "
                           "re-run `segshift rank`")
    return table.select(RANKING_SCHEMA.names).sort_by("rank")


def _examples(ids: Sequence[str]) -> str:
    shown = ", ".join(sorted(ids)[:EXAMPLES])
    return shown + (", ..." if len(ids) > EXAMPLES else "")


def check_ranking_matches(out_dir: str | Path, prepared_target_dir: str | Path) -> None:
    """Raise RankingError unless the ranking in `out_dir` was made from the current prepared target
    (same manifest bytes, same train sample ids) and every easy row's pseudo-label exists."""
    import pyarrow.compute as pc
    out_dir, target = Path(out_dir), Path(prepared_target_dir)
    table = read_ranking(out_dir)
    manifest = target / MANIFEST_NAME
    if not manifest.is_file():
        raise RankingError(f"{manifest}: no prepared target manifest; run `segshift prepare` first")
    train = pq.read_table(manifest, columns=["sample_id", "split"])
    train_ids = set(train.filter(pc.equal(train["split"], "train"))["sample_id"].to_pylist())
    ranked_ids = set(table["sample_id"].to_pylist())
    problems = []
    recorded = ranking_metadata(table).get("manifest_sha256")
    current = file_sha256(manifest)
    if recorded != current:
        problems.append(f"it was computed from a different prepared target (manifest sha256 "
                        f"{str(recorded)[:12]}, now {current[:12]})")
    missing, extra = sorted(train_ids - ranked_ids), sorted(ranked_ids - train_ids)
    if missing:
        problems.append(f"{len(missing)} of {len(train_ids)} target train image(s) are not ranked "
                        f"(e.g. {_examples(missing)})")
    if extra:
        problems.append(f"{len(extra)} ranked image(s) are not in target train (e.g. {_examples(extra)})")
    absent = [sid for sid, rel in pseudo_label_items(table) if not (out_dir / rel).is_file()]
    if absent:
        problems.append(f"{len(absent)} easy image(s) have no pseudo-label file under "
                        f"{out_dir / PSEUDO_LABEL_DIR} (e.g. {_examples(absent)})")
    if problems:
        raise RankingError(f"{out_dir / RANKING_NAME} does not match {target}: " + "; ".join(problems)
                           + "; re-run `segshift rank` (dvc repro rank)")


def ranked_splits(table: pa.Table) -> tuple[list[str], list[str]]:
    """(easy sample ids, hard sample ids), each in rank order (easiest first)."""
    rows = sorted(zip(table["rank"].to_pylist(), table["split"].to_pylist(),
                      table["sample_id"].to_pylist()))
    return ([sid for _, split, sid in rows if split == EASY],
            [sid for _, split, sid in rows if split == HARD])


def pseudo_label_items(table: pa.Table) -> list[tuple[str, str]]:
    return [(sid, rel) for sid, split, rel in zip(table["sample_id"].to_pylist(),
                                                  table["split"].to_pylist(),
                                                  table["pseudo_label"].to_pylist())
            if split == EASY]


def pseudo_label_paths(out_dir: str | Path, table: pa.Table) -> dict[str, Path]:
    """{easy sample id: path of its pseudo-label PNG (under `out_dir`)}, in rank order."""
    out_dir = Path(out_dir)
    items = pseudo_label_items(table)
    broken = [sid for sid, rel in items if not rel]
    if broken:
        raise RankingError(f"{out_dir / RANKING_NAME}: {len(broken)} easy row(s) have no "
                           f"pseudo_label path (e.g. {_examples(broken)}); re-run `segshift rank`")
    return {sid: out_dir / rel for sid, rel in items}
