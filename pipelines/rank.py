"""`segshift rank`: IntraDA's entropy ranking of target train with the inter-domain model.

Inference is a Ray Data job: the target train images flow through `map_batches` into a pool of
`rank.concurrency` actors (`ActorPoolStrategy`), each loading the inter model once. Actors write
every image's pseudo-label PNG into a staging directory and return only per-image scalars (score,
rare-class normaliser, mean confidence, class histogram), so no image-sized array travels back to
the driver. The driver sorts, splits by lambda and writes `ranking.parquet`; the hard images'
pseudo-labels are deleted. The staging directory is `components.io.atomic_directory`'s temporary
directory beside `rank.out_dir`, so an interrupted or failed run never leaves a half-written
ranking (the previous one stays). Actors on other nodes of a cluster must see the project
directory at the same path (a shared file system), as for the training stages.

Besides `rank.out_dir`: `<paths.metrics>/rank.json` (DVC metric), `<paths.reports>/rank/*.png`
(score histogram with the lambda cut; easiest and hardest images with prediction and entropy),
all logged to the stage's MLflow run together with ranking.parquet.
"""
from __future__ import annotations

import argparse
import io
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segshift.components.config import Params, RankConfig, load_params
from segshift.components.data.dataset import read_rgb, to_tensor
from segshift.components.data.labels import CLASS_NAMES, NUM_CLASSES
from segshift.components.data.manifest import MANIFEST_NAME, read_manifest
from segshift.components.data.synthetic import CONDITIONS, HARD_CONDITIONS
from segshift.components.io import (atomic_directory, atomic_write_bytes, atomic_write_text, check_output,
                                   finite_or_none, resolve_under, strict_json, write_png)
from segshift.components.losses import normalised_entropy
from segshift.components.models.classes import model_protocol, to_train_ids
from segshift.components.pseudo_labels import LEVELS
from segshift.components.ranking import (CONFIDENCE_DIR, EASY, HARD, RANKING_NAME, RankingError,
                                         auroc, build_ranking_table, confidence_name, file_sha256,
                                         pixel_thresholds, predict_probs, pseudo_label_items,
                                         pseudo_label_name, score_images, split_counts,
                                         write_pseudo_labels, write_ranking)
from segshift.pipelines.remote import prepared_dir

STAGE = "rank"
MODEL_STAGE = "inter"          # the ranking uses the inter-domain model
REPORT_EXAMPLES = 4            # easiest and hardest images shown in the report picture
HISTOGRAM_NAME = "score_histogram.png"
EXAMPLES_NAME = "easy_hard_examples.png"


@dataclass(frozen=True)
class RankInputs:
    project_dir: Path
    target_dir: Path
    manifest: Path
    model: Path
    out_dir: Path
    rows: list[dict]           # target train manifest rows, sorted by sample id
    easy: int
    hard: int


def check_inputs(params: Params, project_dir: str | Path) -> RankInputs:
    """Fail fast, before any inference, on inputs the ranking cannot use."""
    project_dir = Path(project_dir).resolve()
    target = prepared_dir(params, project_dir) / "target"
    manifest = target / MANIFEST_NAME
    if not manifest.is_file():
        raise RankingError(f"{manifest}: no prepared target dataset; run `segshift prepare` "
                           "(dvc repro prepare) first")
    model = resolve_under(project_dir, params.paths.models) / MODEL_STAGE / "model.pt"
    if not model.is_file():
        raise RankingError(f"{model}: no inter-domain model; run `segshift train --stage inter` "
                           "(dvc repro inter) first")
    rows = sorted((r for r in read_manifest(target).to_pylist() if r["split"] == "train"),
                  key=lambda r: r["sample_id"])
    if not rows:
        raise RankingError(f"{manifest}: the target train split is empty; nothing to rank")
    easy, hard = split_counts(len(rows), params.rank.lambda_)
    if params.engine.device == "cuda" and params.rank.gpus_per_actor == 0:
        raise RankingError("engine.device is 'cuda' but rank.gpus_per_actor = 0: the ranking actors "
                           "would see no GPU; set rank.gpus_per_actor (e.g. 1) or engine.device auto")
    return RankInputs(project_dir=project_dir, target_dir=target, manifest=manifest, model=model,
                      out_dir=resolve_under(project_dir, params.rank.out_dir), rows=rows, easy=easy, hard=hard)


# -- the Ray Data job -----------------------------------------------------------------------------

class ScoreActor:
    """A Ray Data actor: loads the model once, scores batches and leaves each image's raw argmax
    label and quantised confidence map in the output directory (`pseudo_labels/`, `confidence/`)."""

    def __init__(self, params: dict, model_path: str, target_dir: str, out_dir: str):
        from segshift.components.engine.loop import resolve_device
        from segshift.pipelines.stage_model import load_stage_model
        config = Params.model_validate(params)
        self.device = resolve_device(config.engine.device)
        self.model = load_stage_model(Path(model_path), config).to(self.device).eval()
        self.target, self.out = Path(target_dir), Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(s) for s in batch["sample_id"]]
        images = [read_rgb(self.target / str(rel)) for rel in batch["image"]]
        n = len(ids)
        out = {"score": np.zeros(n), "normaliser": np.zeros(n), "rare_present": np.zeros(n, np.int32),
               "mean_confidence": np.zeros(n), "class_histogram": np.zeros((n, NUM_CLASSES), np.float32),
               "confidence_histogram": np.zeros((n, NUM_CLASSES, LEVELS), np.int32)}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):           # one forward pass per image size
            groups.setdefault(image.shape[:2], []).append(i)
        for index in groups.values():
            x = torch.stack([to_tensor(images[i]) for i in index]).to(self.device)
            scores = score_images(self.model, x)
            histograms = scores.confidence_histograms()
            for j, i in enumerate(index):
                write_png(self.out / pseudo_label_name(ids[i]), scores.labels[j])
                write_png(self.out / confidence_name(ids[i]), scores.confidence_q[j])
                out["confidence_histogram"][i] = histograms[j]
                for key in out.keys() - {"confidence_histogram"}:
                    out[key][i] = getattr(scores, key)[j]
        return {"sample_id": np.array(ids, dtype=object), **out}


def actor_pool_size(cfg: RankConfig, available: dict[str, float], images: int) -> int:
    """`rank.concurrency`, with `auto` resolved: as many actors as `available` (the Ray
    instance's resources) has room for, and no more than there are batches to score. One
    single-threaded actor per core beats one actor using them all (BENCHMARKS.md)."""
    if cfg.concurrency != "auto":
        return cfg.concurrency
    fits = [available.get("CPU", 1) / cfg.cpus_per_actor]
    if cfg.gpus_per_actor > 0:
        fits.append(available.get("GPU", 0) / cfg.gpus_per_actor)
    return max(1, min(int(min(fits)), math.ceil(images / cfg.batch_size)))


def _check_resources(params: Params, actors: int) -> None:
    """On a local Ray instance, an actor pool larger than the machine would wait forever."""
    from segshift.pipelines.cluster import local_shortfall
    cfg = params.rank
    per_actor = {"CPU": cfg.cpus_per_actor, "GPU": cfg.gpus_per_actor}
    short = local_shortfall(params, {r: actors * n for r, n in per_actor.items()})
    if short:
        resource, need, have = short
        raise RankingError(
            f"rank.concurrency = {actors} actors x {per_actor[resource]} {resource} need {need:g} "
            f"{resource}s but the local Ray instance has {have:g}; lower "
            f"rank.concurrency or rank.{resource.lower()}s_per_actor (or raise ray.local_num_cpus)")


def run_inference(params: Params, inputs: RankInputs, out_dir: Path, progress: bool) -> list[dict]:
    """Score every target train image with a Ray Data actor pool; one dict per image. Raw labels
    and confidences land in `out_dir` (`write_pseudo_labels` turns them into pseudo-labels)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from segshift.pipelines.cluster import connect_ray
    connect_ray(params)
    cfg = params.rank
    items = [{"sample_id": r["sample_id"], "image": r["image"]} for r in inputs.rows]
    actors = actor_pool_size(cfg, ray.cluster_resources(), len(items))
    _check_resources(params, actors)
    blocks = min(len(items), max(actors, math.ceil(len(items) / cfg.batch_size)))
    context = DataContext.get_current()
    saved = (context.enable_progress_bars, context.print_on_execution_start)
    context.enable_progress_bars = context.print_on_execution_start = progress
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    if not progress:
        data_logger.setLevel(logging.ERROR)   # --quiet: no execution plan or progress lines
    try:
        resources: dict[str, Any] = {"num_cpus": cfg.cpus_per_actor}
        if cfg.gpus_per_actor > 0:
            resources["num_gpus"] = cfg.gpus_per_actor
        dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            ScoreActor, batch_size=cfg.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"params": params.model_dump(mode="json"),
                                   "model_path": str(inputs.model),
                                   "target_dir": str(inputs.target_dir),
                                   "out_dir": str(out_dir)},
            **resources)
        results = dataset.take_all()
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved
        data_logger.setLevel(saved_level)
    conditions = {r["sample_id"]: r["condition"] for r in inputs.rows}
    records = [{"sample_id": str(r["sample_id"]), "score": float(r["score"]),
                "normaliser": float(r["normaliser"]), "rare_present": int(r["rare_present"]),
                "mean_confidence": float(r["mean_confidence"]),
                "class_histogram": np.asarray(r["class_histogram"], np.float32),
                "confidence_histogram": np.asarray(r["confidence_histogram"], np.int64),
                "condition": conditions.get(str(r["sample_id"]))} for r in results]
    scored = {r["sample_id"] for r in records}
    if len(records) != len(items) or scored != set(conditions):
        raise RankingError(f"the inference job returned {len(records)} result(s) for {len(scored)} "
                           f"image(s); expected {len(items)}")
    return records


def publish_ranking(records: list[dict], params: Params, manifest_sha: str, model_sha: str,
                    raw_dir: Path, out_dir: Path) -> tuple[Any, np.ndarray, dict[str, float]]:
    """Split the scored images by lambda and write the ranking into `out_dir`: ranking.parquet
    and the easy images' pseudo-labels (threshold and class balancing applied to the raw labels
    in `raw_dir`). Returns (table, per-class confidence levels, ignored share per easy image)."""
    cfg = params.rank
    table = build_ranking_table(records, cfg.lambda_, cfg.entropy_normalisation,
                                cfg.confidence_threshold, manifest_sha, model_sha,
                                cfg.class_balanced_share)
    easy = {sid for sid, _ in pseudo_label_items(table)}
    levels = pixel_thresholds([r["confidence_histogram"] for r in records if r["sample_id"] in easy],
                              cfg.confidence_threshold, cfg.class_balanced_share)
    ignored = write_pseudo_labels(table, levels, raw_dir, out_dir)
    write_ranking(table, out_dir)
    return table, levels, ignored


# -- metrics and pictures ---------------------------------------------------------------------------

def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def ranking_metrics(table, ignored: dict[str, float], params: Params, seconds: float) -> dict:
    """rank.json: counts, scores per split and, when conditions are known (built-in data), how
    well the ranking finds the hard conditions."""
    cfg = params.rank
    split = np.array(table["split"].to_pylist())
    score = table["score"].to_numpy()
    key = table["score_normalised"].to_numpy()
    confidence = table["mean_confidence"].to_numpy()
    easy, hard = split == EASY, split == HARD
    easy_ids = [sid for sid, s in zip(table["sample_id"].to_pylist(), split) if s == EASY]
    metrics: dict[str, Any] = {
        "n": int(len(split)), "easy": int(easy.sum()), "hard": int(hard.sum()),
        "lambda": cfg.lambda_, "entropy_normalisation": cfg.entropy_normalisation,
        "confidence_threshold": cfg.confidence_threshold,
        "class_balanced_share": cfg.class_balanced_share,
        "mean_score_easy": _mean(score[easy]), "mean_score_hard": _mean(score[hard]),
        "mean_score_normalised_easy": _mean(key[easy]), "mean_score_normalised_hard": _mean(key[hard]),
        "cut_score": float((key[easy].max() + key[hard].min()) / 2),
        "mean_confidence_easy": _mean(confidence[easy]), "mean_confidence_hard": _mean(confidence[hard]),
        "pseudo_label_ignored_share": float(np.mean([ignored[s] for s in easy_ids])),
        "seconds": round(seconds, 1),
    }
    conditions = table["condition"].to_pylist()
    if all(c is not None for c in conditions):
        cond = np.array(conditions)
        hard_condition = np.isin(cond, HARD_CONDITIONS)
        present = [c for c in CONDITIONS if c in set(conditions)] + sorted(set(conditions) - set(CONDITIONS))
        metrics["conditions"] = {
            "hard_conditions": list(HARD_CONDITIONS),
            # The ranking key (score_normalised; = score without normalisation) as a detector of
            # hard-condition images: 1 = all of them rank after every other image.
            "auroc_hard_conditions": finite_or_none(auroc(key, hard_condition)),
            "hard_condition_share_all": float(hard_condition.mean()),
            "hard_condition_share_hard_split": float(hard_condition[hard].mean()),
            "hard_condition_share_easy_split": float(hard_condition[easy].mean()),
            "mean_score": {c: float(key[cond == c].mean()) for c in present},
            "count": {c: int((cond == c).sum()) for c in present},
        }
    return metrics


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The numeric metrics for MLflow: nested keys joined with '_' (the `conditions` level left
    out, e.g. `mean_score_fog`); None, strings, lists and booleans dropped."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            prefix = "" if key == "conditions" else f"{key}_"
            flat.update({prefix + k: v for k, v in flat_metrics(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat


def histogram_picture(table, metrics: dict) -> bytes:
    """PNG: histogram of the ranking key, hard-condition images stacked when known, the cut line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    key = table["score_normalised"].to_numpy()
    conditions = table["condition"].to_pylist()
    figure, ax = plt.subplots(figsize=(7, 4), dpi=100)
    bins = np.linspace(key.min(), key.max() + 1e-12, min(40, max(5, len(key) // 5)) + 1)
    if all(c is not None for c in conditions):
        hard = np.isin(np.array(conditions), HARD_CONDITIONS)
        ax.hist([key[~hard], key[hard]], bins=bins, stacked=True,
                label=["other conditions", "/".join(HARD_CONDITIONS)], color=["#4c72b0", "#dd8452"])
    else:
        ax.hist(key, bins=bins, color="#4c72b0", label="target train")
    ax.axvline(metrics["cut_score"], color="black", linestyle="--",
               label=f"cut: λ = {metrics['lambda']:g} ({metrics['easy']} easy / {metrics['hard']} hard)")
    auc = metrics.get("conditions", {}).get("auroc_hard_conditions")
    title = "IntraDA ranking: " + ("normalised " if metrics["entropy_normalisation"] else "") + "entropy score"
    ax.set_title(title + (f" (AUROC hard conditions {auc:.2f})" if auc is not None else ""), fontsize=10)
    ax.set_xlabel("score (mean normalised entropy" + (" x rare-class factor)" if
                                                      metrics["entropy_normalisation"] else ")"))
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


@torch.inference_mode()
def examples_picture(params: Params, inputs: RankInputs, table) -> np.ndarray:
    """Rows: the easiest, then the hardest images: image | prediction | entropy map."""
    import cv2
    from segshift.components.visualize import grid, prediction_rows
    from segshift.pipelines.stage_model import load_stage_model
    ids = table["sample_id"].to_pylist()          # rank order
    k = min(REPORT_EXAMPLES, sum(s == EASY for s in table["split"].to_pylist()),
            sum(s == HARD for s in table["split"].to_pylist()))
    chosen = ids[:k] + ids[len(ids) - k:]
    image_of = {r["sample_id"]: r["image"] for r in inputs.rows}
    # A handful of images: the driver uses a GPU when it has one, else the CPU (a cluster's driver
    # may have no GPU even when the actors do).
    device = torch.device("cuda" if params.engine.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = load_stage_model(inputs.model, params).to(device).eval()
    rows = []
    for sid in chosen:
        x = to_tensor(read_rgb(inputs.target_dir / image_of[sid]))[None].to(device)
        probs = predict_probs(model, x)
        prediction = to_train_ids(probs.argmax(1), model_protocol(model))     # coloured as train ids
        rows += prediction_rows(x.cpu().numpy(), None, prediction.cpu().numpy(),
                                normalised_entropy(probs).cpu().numpy())
    height, width = rows[0][0].shape[:2]
    rows = [[tile if tile.shape[:2] == (height, width) else
             cv2.resize(tile, (width, height), interpolation=cv2.INTER_NEAREST) for tile in row]
            for row in rows]
    for row, text in ((rows[0], "easiest"), (rows[k], "hardest")):
        row[0] = row[0].copy()
        cv2.putText(row[0], text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
    easy, hard = grid(rows[:k]), grid(rows[k:])
    band = np.full((8, easy.shape[1], 3), 0, np.uint8)      # a black band between the two groups
    return np.concatenate([easy, band, hard])


# -- the stage --------------------------------------------------------------------------------------

def rank_stage(params: Params, project_dir: str | Path, progress: bool = True) -> dict:
    """Run the ranking; returns the metrics written to `<paths.metrics>/rank.json`."""
    from segshift.pipelines.tracking import StageTracker
    inputs = check_inputs(params, project_dir)
    check_output(inputs.out_dir)       # before the MLflow run and the inference
    cfg = params.rank
    manifest_sha, model_sha = file_sha256(inputs.manifest), file_sha256(inputs.model)
    start = time.perf_counter()
    with StageTracker(params, stage=STAGE, project_dir=inputs.project_dir) as tracker:
        with atomic_directory(inputs.out_dir, writer="segshift rank") as staging:
            records = run_inference(params, inputs, staging, progress)
            table, levels, ignored = publish_ranking(records, params, manifest_sha, model_sha,
                                                     raw_dir=staging, out_dir=staging)
            for sid, split in zip(table["sample_id"].to_pylist(), table["split"].to_pylist()):
                if split == HARD:
                    (staging / pseudo_label_name(sid)).unlink()
            shutil.rmtree(staging / CONFIDENCE_DIR)
        metrics = ranking_metrics(table, ignored, params, time.perf_counter() - start)
        if cfg.class_balanced_share is not None:
            metrics["class_thresholds"] = {name: round(int(t) / (LEVELS - 1), 4)
                                           for name, t in zip(CLASS_NAMES, levels)}
        metrics_path = atomic_write_text(resolve_under(inputs.project_dir, params.paths.metrics) / "rank.json",
                                         strict_json(metrics))
        reports = resolve_under(inputs.project_dir, params.paths.reports) / STAGE
        pictures = [atomic_write_bytes(reports / HISTOGRAM_NAME, histogram_picture(table, metrics)),
                    write_png(reports / EXAMPLES_NAME, examples_picture(params, inputs, table))]
        tracker.set_tags({"segshift.model_sha256": model_sha, "segshift.manifest_sha256": manifest_sha})
        tracker.log_metrics(flat_metrics(metrics))
        tracker.log_artifact(inputs.out_dir / RANKING_NAME, "ranking")
        for path in (metrics_path, *pictures):
            tracker.log_artifact(path, "report")
    return metrics


def summary_line(metrics: dict, params: Params) -> str:
    auc = metrics.get("conditions", {}).get("auroc_hard_conditions")
    quality = f"; AUROC of the score for {'/'.join(HARD_CONDITIONS)} {auc:.3f}" if auc is not None else ""
    return (f"rank: {metrics['n']} target train images -> {metrics['easy']} easy / {metrics['hard']} "
            f"hard (lambda {metrics['lambda']:g}{', normalised' if metrics['entropy_normalisation'] else ''})"
            f"{quality}; wrote {params.rank.out_dir}/{RANKING_NAME}, {params.paths.metrics}/rank.json "
            f"and {params.paths.reports}/{STAGE}/")


def _cmd_rank(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    metrics = rank_stage(params, Path.cwd(), progress=not args.quiet)
    print(summary_line(metrics, params))
    return 0


def build_rank_parser(sub, add_params) -> None:
    parser = sub.add_parser("rank", help="entropy ranking of target train with the inter model: "
                                         "easy/hard split and pseudo-labels (DVC stage rank)")
    add_params(parser)
    parser.set_defaults(func=_cmd_rank)
