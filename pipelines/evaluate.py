"""`segshift evaluate`: every trained stage's model side by side on target test.

For each stage in `evaluate.stages` (in that order) the stage's selected network
`<paths.models>/<stage>/model.pt` is evaluated on the prepared target test split in one pass that
also keeps one confusion matrix per built-in target `condition`. Outputs:

- `evaluate.out` (metrics/summary.json, a DVC metric): per stage mIoU (over the head's classes:
  19, or 16 with `model.classes: synthia16`), mIoU-16, mIoU-13, pixel accuracy, per-class IoU,
  per-condition mIoU (built-in data) and the share of the source -> oracle gap the stage closes;
  fractions in [0, 1], an absent class as null (synthia16: terrain, truck and train, whose
  target pixels are ignored, not counted as errors);
- `<paths.metrics>/summary_per_class.json`: rows {class, stage, iou (%)} for `dvc plots`;
- `<paths.reports>/evaluate/summary.md`: the comparison as Markdown tables (the README's table);
- `<paths.reports>/evaluate/per_class_iou.png` and, with conditions, `per_condition_miou.png`;
- an MLflow stage run `evaluate` with `test_miou_<stage>`, `test_gap_closed_<stage>`, ... and
  all of the above as artifacts.

Test samples that carry a native-resolution label (`prepare.target.full_resolution_labels`:
Cityscapes val kept at 2048x1024) are scored at that resolution, logits upsampled bilinearly
before the argmax, as ADVENT's eval_UDA.py (components/evaluation.py); the MLflow metric
`test_images_full_resolution` counts them.

Every input (the prepared target test split, every model file and its architecture) is checked
before anything is evaluated.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from segshift.components.config import Params, load_params
from segshift.components.data.dataset import PreparedSplit
from segshift.components.data.manifest import MANIFEST_NAME
from segshift.components.evaluation import GroupedEvaluation, evaluate_by_group
from segshift.components.io import (atomic_write_text, finite_or_none, resolve_under,
                                   strict_json, write_png)
from segshift.components.methods.rounds import StageInputError
from segshift.components.visualize import grouped_bar_picture, iou_bar_picture
from segshift.pipelines.remote import prepared_dir
from segshift.pipelines.stage_model import load_stage_model

STAGE = "evaluate"


class EvaluateInputError(StageInputError):
    """A missing or unusable input of `segshift evaluate`; raised before anything is evaluated."""


# -- inputs ---------------------------------------------------------------------------------------

def model_path(params: Params, stage: str, project_dir: Path) -> Path:
    return resolve_under(project_dir, params.paths.models) / stage / "model.pt"


def check_inputs(params: Params, project_dir: Path) -> dict[str, Path]:
    """The model file of every listed stage; EvaluateInputError naming each missing input."""
    problems = []
    target = prepared_dir(params, project_dir) / "target"
    if not (target / MANIFEST_NAME).is_file():
        problems.append(f"{target / MANIFEST_NAME}: missing; run `dvc repro prepare` "
                        f"(or `segshift prepare`) first")
    stages = list(dict.fromkeys(params.evaluate.stages))
    if len(stages) != len(params.evaluate.stages):
        problems.append(f"evaluate.stages lists a stage twice: {params.evaluate.stages}")
    paths = {stage: model_path(params, stage, project_dir) for stage in stages}
    for stage, path in paths.items():
        if not path.is_file():
            problems.append(f"stage '{stage}': model {path} is missing; run `dvc repro {stage}` "
                            f"(or `segshift train --stage {stage}`) first")
    if problems:
        raise EvaluateInputError("; ".join(problems))
    return paths


def condition_order(params: Params, conditions: list[str | None]) -> list[str]:
    """Conditions present, in the configured order (easy -> hard), unknown ones after, sorted."""
    present = {c for c in conditions if c is not None}
    known = [c for c in params.prepare.builtin.conditions if c in present]
    return known + sorted(present - set(known))


# -- the summary ----------------------------------------------------------------------------------

def gap_closed(miou: float | None, source: float | None, oracle: float | None) -> float | None:
    """(miou - source) / (oracle - source): 0 = no better than source-only, 1 = as good as the
    oracle (target labels). None when any value is missing or the gap is zero."""
    values = (miou, source, oracle)
    if any(v is None or not math.isfinite(v) for v in values) or oracle == source:
        return None
    return (miou - source) / (oracle - source) + 0.0  # + 0.0: no "-0.0" for the source itself


def add_gap_closed(summary: dict[str, dict]) -> dict[str, dict]:
    """Each stage's `gap_closed`, when both `source` and `oracle` are in `summary` (in place)."""
    if "source" in summary and "oracle" in summary:
        source, oracle = summary["source"].get("miou"), summary["oracle"].get("miou")
        for entry in summary.values():
            entry["gap_closed"] = gap_closed(entry.get("miou"), source, oracle)
    return summary


def stage_entry(result: GroupedEvaluation, conditions: list[str]) -> dict:
    """One stage's entry of summary.json (NaN already turned into None)."""
    total = result.total.summary()
    entry = {key: total[key] for key in ("miou", "miou_16", "miou_13", "pixel_accuracy")}
    entry["per_class_iou"] = total["per_class_iou"]
    if conditions:
        entry["per_condition_miou"] = {c: result.groups[c].summary()["miou"] for c in conditions}
    return finite_or_none(entry)


def build_summary(results: dict[str, GroupedEvaluation], conditions: list[str]) -> dict[str, dict]:
    """summary.json's content: one entry per stage, in the order of `results`."""
    return add_gap_closed({stage: stage_entry(result, conditions) for stage, result in results.items()})


def summary_per_class_rows(summary: dict[str, dict]) -> list[dict]:
    """[{class, stage, iou (%)}] over all stages (null for an absent class), for `dvc plots`."""
    return [{"class": name, "stage": stage, "iou": None if v is None else round(100 * v, 2)}
            for stage, entry in summary.items() for name, v in entry["per_class_iou"].items()]


# -- Markdown -------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    text = f"{100 * value:.1f}"
    return "0.0" if text == "-0.0" else text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(cells) + " |" for cells in (header, align, *rows)]


def summary_markdown(summary: dict[str, dict], per_class: bool = True) -> str:
    """The comparison as Markdown: one row per stage with mIoU (the head's classes), mIoU-16, mIoU-13,
    gap closed (when source and oracle are present) and, with `per_class`, every class's IoU;
    then mIoU per target condition when the summary has conditions. All in %, 1 decimal;
    "–" where a value is undefined (class absent, no gap)."""
    stages = list(summary)
    with_gap = any("gap_closed" in summary[s] for s in stages)
    classes = list(next(iter(summary.values()))["per_class_iou"]) if per_class and stages else []
    header = ["stage", "mIoU", "mIoU-16", "mIoU-13"] + (["gap closed"] if with_gap else []) + classes
    rows = []
    for stage in stages:
        entry = summary[stage]
        row = [stage, _pct(entry["miou"]), _pct(entry["miou_16"]), _pct(entry["miou_13"])]
        if with_gap:
            row.append(_pct(entry.get("gap_closed")))
        row += [_pct(entry["per_class_iou"].get(name)) for name in classes]
        rows.append(row)
    lines = ["### Target test: mIoU" + (" and per-class IoU" if classes else "") + " (%)", "",
             *_table(header, rows)]
    if with_gap:
        lines += ["", "gap closed: share of the source-only → oracle mIoU gap the stage closes "
                      "(0 = source-only, 100 = oracle)."]
    conditions = list(dict.fromkeys(c for s in stages for c in summary[s].get("per_condition_miou", {})))
    if conditions:
        rows = [[stage] + [_pct(summary[stage].get("per_condition_miou", {}).get(c)) for c in conditions]
                for stage in stages]
        lines += ["", "### Target test: mIoU per condition (%)", "", *_table(["stage", *conditions], rows)]
    return "\n".join(lines) + "\n"


# -- the stage ------------------------------------------------------------------------------------

def tracked_metrics(summary: dict[str, dict]) -> dict[str, float]:
    """Flat MLflow metrics: test_miou_<stage>, test_miou_16_<stage>, ..., test_gap_closed_<stage>,
    test_miou_<stage>_<condition> and test_iou_<class>_<stage>; undefined values left out."""
    metrics: dict[str, float | None] = {}
    for stage, entry in summary.items():
        for key in ("miou", "miou_16", "miou_13", "pixel_accuracy", "gap_closed"):
            if key in entry:
                metrics[f"test_{key}_{stage}"] = entry[key]
        for condition, value in entry.get("per_condition_miou", {}).items():
            metrics[f"test_miou_{stage}_{condition}"] = value
        for name, value in entry["per_class_iou"].items():
            metrics[f"test_iou_{name.replace(' ', '_')}_{stage}"] = value
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def write_outputs(params: Params, project_dir: Path, summary: dict[str, dict]) -> dict[str, Path]:
    """summary.json, summary_per_class.json, summary.md and the pictures; returns their paths."""
    reports = resolve_under(project_dir, params.paths.reports) / STAGE
    reports.mkdir(parents=True, exist_ok=True)
    metrics_dir = resolve_under(project_dir, params.paths.metrics)
    files = {
        "summary": atomic_write_text(resolve_under(project_dir, params.evaluate.out), strict_json(summary)),
        "per_class": atomic_write_text(metrics_dir / "summary_per_class.json",
                                       strict_json(summary_per_class_rows(summary))),
        "markdown": atomic_write_text(reports / "summary.md", summary_markdown(summary)),
    }
    nan = float("nan")
    series = {stage: {name: nan if v is None else v for name, v in entry["per_class_iou"].items()}
              for stage, entry in summary.items()}
    files["per_class_iou.png"] = write_png(
        reports / "per_class_iou.png", iou_bar_picture(series, "per-class IoU on target test"))
    conditions = {stage: entry["per_condition_miou"] for stage, entry in summary.items()
                  if "per_condition_miou" in entry}
    if conditions:
        files["per_condition_miou.png"] = write_png(
            reports / "per_condition_miou.png",
            grouped_bar_picture(conditions, "mIoU per condition on target test"))
    else:  # a stale picture from an earlier run on other data must not outlive its data
        (reports / "per_condition_miou.png").unlink(missing_ok=True)
    return files


def evaluate_stages(params: Params, project_dir: Path, progress: bool = True) -> tuple[dict, dict[str, Path]]:
    """Evaluate every listed stage on target test; write and track the outputs.

    Returns (summary, written files).
    """
    from segshift.components.engine.loop import resolve_device
    from segshift.pipelines.tracking import StageTracker
    project_dir = Path(project_dir).resolve()
    paths = check_inputs(params, project_dir)
    test = PreparedSplit(prepared_dir(params, project_dir) / "target", "test",
                         cache=params.engine.cache_images)
    # Load every model first: a wrong architecture fails before any evaluation.
    models = {stage: load_stage_model(path, params) for stage, path in paths.items()}
    groups = [row.get("condition") for row in test.rows]
    conditions = condition_order(params, groups)
    device = resolve_device(params.engine.device)
    start = time.perf_counter()
    with StageTracker(params, stage=STAGE, project_dir=project_dir) as tracker:
        results = {}
        for stage, model in models.items():
            model.to(device)
            results[stage] = evaluate_by_group(
                model, test, groups, params.engine.eval_batch_size, device, progress=progress,
                desc=f"{stage} test", loader_workers=params.engine.loader_workers)
            model.to("cpu")
            models[stage] = None  # free memory as we go
        summary = build_summary(results, conditions)
        files = write_outputs(params, project_dir, summary)
        tracker.log_metrics(tracked_metrics(summary))
        tracker.log_metrics({"test_images": len(test), "seconds": time.perf_counter() - start,
                             "test_images_full_resolution": sum(bool(r.get("label_full")) for r in test.rows),
                             **{f"test_images_{c}": groups.count(c) for c in conditions}})
        for path in files.values():
            tracker.log_artifact(path, STAGE)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary, files


def _cmd_evaluate(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    summary, files = evaluate_stages(params, Path.cwd(), progress=not args.quiet)
    print(summary_markdown(summary, per_class=False))
    cwd = Path.cwd().resolve()
    shown = [str(p.relative_to(cwd)) if p.is_relative_to(cwd) else str(p) for p in files.values()]
    print("wrote " + ", ".join(shown))
    return 0


def build_evaluate_parser(sub, add_params) -> None:
    parser = sub.add_parser("evaluate", help="every stage's model on target test, side by side "
                                             "(DVC stage evaluate)")
    add_params(parser)
    parser.set_defaults(func=_cmd_evaluate)
