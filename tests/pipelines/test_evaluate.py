"""`segshift evaluate`: every stage's model on target test, side by side (JSON, Markdown, PNGs, MLflow)."""
import contextlib
import io
import json
import math
from pathlib import Path

import cv2
import pytest
import torch
from mlflow.tracking import MlflowClient

from segshift.components.config import load_params
from segshift.components.data.dataset import PreparedSplit
from segshift.components.data.labels import CLASS_NAMES
from segshift.components.engine.checkpoint import save_checkpoint
from segshift.components.evaluation import evaluate, evaluate_by_group
from segshift.components.models.factory import build_model
from segshift.components.io import strict_json
from segshift.pipelines.cli import main
from segshift.pipelines.evaluate import (add_gap_closed, build_summary, gap_closed,
                                         summary_markdown, summary_per_class_rows)
from segshift.pipelines.stage_model import load_stage_model
from tests.conftest import write_params

STAGES = ["source", "inter", "intra", "oracle"]
SEEDS = {"source": 1, "inter": 2, "intra": 3, "oracle": 4}


def overrides(**extra) -> dict:
    """Tiny data and model; outputs at relative paths (relative to the project directory)."""
    return {"model.width": 0.125, "engine.device": "cpu", "engine.eval_batch_size": 2,
            "prepare.builtin.counts": {"source_train": 2, "source_val": 1, "target_train": 2,
                                       "target_val": 1, "target_test": 5},
            "paths.models": "models", "paths.metrics": "metrics", "paths.reports": "reports",
            "evaluate.out": "metrics/summary.json", "tracking.uri": "sqlite:///mlflow.db", **extra}


def save_stage_model(params, stage: str, root: Path) -> Path:
    torch.manual_seed(SEEDS[stage])
    path = root / params.paths.models / stage / "model.pt"
    save_checkpoint(path, {"model": build_model(params.model).state_dict(),
                           "model_config": params.model.model_dump(mode="json"), "num_classes": 19,
                           "stage": stage, "step": 0, "selection": "val_miou", "val": {}})
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A prepared tiny project with four stage models, evaluated once through the CLI."""
    root = tmp_path_factory.mktemp("evaluate")
    params_file = write_params(root, overrides())
    assert main(["prepare", "--params", str(params_file), "--quiet"]) == 0
    params = load_params(params_file)
    for stage in STAGES:
        save_stage_model(params, stage, root)
    return root, params_file, params


@pytest.fixture(scope="module")
def evaluated(project):
    root, params_file, params = project
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(root)  # the CLI's project directory: relative paths resolve against it
        code = main(["evaluate", "--params", "params.yaml", "--quiet"])
    assert code == 0
    summary = json.loads((root / "metrics" / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    return root, params, summary, out.getvalue()


def test_summary_has_every_stage_and_matches_an_independent_evaluation(evaluated):
    root, params, summary, _ = evaluated
    assert list(summary) == STAGES
    test = PreparedSplit(params.prepare.out_dir + "/target", "test")
    conditions = [r["condition"] for r in test.rows]
    present = [c for c in params.prepare.builtin.conditions if c in conditions]
    assert len(present) >= 2  # the tiny test split covers several conditions
    for stage in STAGES:
        entry = summary[stage]
        assert set(entry) == {"miou", "miou_16", "miou_13", "pixel_accuracy", "per_class_iou",
                              "per_condition_miou", "gap_closed"}
        assert list(entry["per_class_iou"]) == list(CLASS_NAMES)
        assert list(entry["per_condition_miou"]) == present  # configured order, easy -> hard
        model = load_stage_model(root / "models" / stage / "model.pt", params)
        alone = evaluate(model, test, 3, torch.device("cpu")).summary()
        assert entry["miou"] == pytest.approx(alone["miou"], abs=1e-12)
        assert entry["miou_16"] == pytest.approx(alone["miou_16"], abs=1e-12)
        assert entry["pixel_accuracy"] == pytest.approx(alone["pixel_accuracy"], abs=1e-12)
        for name, value in alone["per_class_iou"].items():
            assert entry["per_class_iou"][name] == (None if math.isnan(value) else pytest.approx(value))
        grouped = evaluate_by_group(model, test, conditions, 2, torch.device("cpu"))
        assert torch.equal(sum(e.confusion for e in grouped.groups.values()), grouped.total.confusion)
        for condition in present:
            subset = torch.utils.data.Subset(test, [i for i, c in enumerate(conditions) if c == condition])
            expected = evaluate(model, subset, 3, torch.device("cpu")).summary()["miou"]
            assert entry["per_condition_miou"][condition] == pytest.approx(expected)
    assert len({summary[s]["miou"] for s in STAGES}) == 4  # different weights, different results
    source, oracle = summary["source"]["miou"], summary["oracle"]["miou"]
    for stage in STAGES:
        assert summary[stage]["gap_closed"] == pytest.approx(
            (summary[stage]["miou"] - source) / (oracle - source))
    assert summary["source"]["gap_closed"] == 0 and summary["oracle"]["gap_closed"] == pytest.approx(1)


def test_per_class_rows_markdown_and_pictures(evaluated):
    root, _, summary, printed = evaluated
    rows = json.loads((root / "metrics" / "summary_per_class.json").read_text())
    assert len(rows) == 19 * len(STAGES) and set(rows[0]) == {"class", "stage", "iou"}
    first = next(r for r in rows if r["stage"] == "inter" and r["class"] == "road")
    road = summary["inter"]["per_class_iou"]["road"]
    assert first["iou"] == (None if road is None else round(100 * road, 2))

    markdown = (root / "reports" / "evaluate" / "summary.md").read_text()
    assert markdown == summary_markdown(summary)
    lines = markdown.splitlines()
    for stage in STAGES:
        row = next(line for line in lines if line.startswith(f"| {stage} |"))
        assert f"| {100 * summary[stage]['miou']:.1f} |" in row
    assert "mIoU per condition" in markdown
    assert "| source |" in printed and "road" not in printed  # the compact table
    assert "wrote metrics/summary.json, metrics/summary_per_class.json, reports/evaluate/summary.md" in printed

    for name in ("per_class_iou.png", "per_condition_miou.png"):
        picture = cv2.imread(str(root / "reports" / "evaluate" / name))
        assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 100, name


def test_mlflow_run_has_metrics_and_artifacts(evaluated):
    root, _, summary, _ = evaluated
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segshift")
    run = next(r for r in client.search_runs([experiment.experiment_id])
               if r.data.tags.get("segshift.stage") == "evaluate")
    assert run.info.status == "FINISHED"
    for stage in STAGES:
        assert run.data.metrics[f"test_miou_{stage}"] == pytest.approx(summary[stage]["miou"])
        assert run.data.metrics[f"test_gap_closed_{stage}"] == pytest.approx(summary[stage]["gap_closed"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/summary.json", "evaluate/summary_per_class.json", "evaluate/summary.md",
            "evaluate/per_class_iou.png", "evaluate/per_condition_miou.png"} <= artifacts


def test_missing_model_is_refused_before_anything_is_evaluated(project, tmp_path, monkeypatch, capsys):
    root, _, _ = project
    params_file = write_params(tmp_path, overrides(**{
        "prepare.out_dir": str(root / "prepared"), "tracking.uri": f"sqlite:///{tmp_path / 'm.db'}"}))
    save_stage_model(load_params(params_file), "source", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--params", str(params_file), "--quiet"]) == 2
    err = capsys.readouterr().err
    missing = tmp_path / "models" / "inter" / "model.pt"
    assert str(missing) in err and "dvc repro inter" in err and "segshift train --stage inter" in err
    assert "stage 'oracle'" in err and "stage 'source'" not in err
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "m.db").exists()


def test_missing_prepared_data_is_named_too(tmp_path, monkeypatch, capsys):
    params_file = write_params(tmp_path, overrides(**{"evaluate.stages": ["oracle"]}))
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--params", str(params_file), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "prepared" / "target") in err and "segshift prepare" in err
    assert "stage 'oracle'" in err and "dvc repro oracle" in err


# -- pure functions on constructed summaries ----------------------------------------------------------

def entry(miou, **extra):
    return {"miou": miou, "miou_16": miou, "miou_13": miou, "pixel_accuracy": 0.9,
            "per_class_iou": {"road": miou, "wall": None}, **extra}


def test_gap_closed_on_constructed_summaries():
    summary = add_gap_closed({"source": entry(0.2), "inter": entry(0.3), "intra": entry(0.35),
                              "oracle": entry(0.6)})
    assert [summary[s]["gap_closed"] for s in ("source", "inter", "intra", "oracle")] == \
        pytest.approx([0.0, 0.25, 0.375, 1.0])
    assert gap_closed(0.1, 0.2, 0.6) == pytest.approx(-0.25)  # worse than source-only: negative
    assert gap_closed(0.3, 0.2, 0.2) is None and gap_closed(0.3, None, 0.6) is None
    assert gap_closed(float("nan"), 0.2, 0.6) is None
    only = add_gap_closed({"source": entry(0.2), "inter": entry(0.3)})
    assert all("gap_closed" not in e for e in only.values())


def test_nan_becomes_null_and_markdown_shows_a_dash():
    summary = {"source": entry(0.2), "oracle": entry(0.6, per_condition_miou={"clear": 0.7, "night": float("nan")})}
    summary["oracle"]["per_class_iou"]["wall"] = float("nan")
    text = strict_json(add_gap_closed(summary))
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert parsed["oracle"]["per_class_iou"]["wall"] is None
    assert parsed["oracle"]["per_condition_miou"] == {"clear": 0.7, "night": None}
    rows = summary_per_class_rows(parsed)
    assert {"class": "wall", "stage": "oracle", "iou": None} in rows
    assert {"class": "road", "stage": "source", "iou": 20.0} in rows
    markdown = summary_markdown(parsed)
    assert "| stage | mIoU | mIoU-16 | mIoU-13 | gap closed | road | wall |" in markdown
    assert "| source | 20.0 | 20.0 | 20.0 | 0.0 | 20.0 | – |" in markdown
    assert "| oracle | 60.0 | 60.0 | 60.0 | 100.0 | 60.0 | – |" in markdown
    assert "| stage | clear | night |" in markdown and "| source | – | – |" in markdown
    assert "| oracle | 70.0 | – |" in markdown
    compact = summary_markdown(parsed, per_class=False)
    assert "| stage | mIoU | mIoU-16 | mIoU-13 | gap closed |" in compact and "road" not in compact


def test_markdown_without_source_or_conditions_has_no_gap_or_condition_table():
    markdown = summary_markdown({"inter": entry(0.3), "intra": entry(0.4)})
    assert "gap closed" not in markdown and "per condition" not in markdown
    assert len([line for line in markdown.splitlines() if line.startswith("| inter") or
                line.startswith("| intra")]) == 2


def test_build_summary_leaves_out_conditions_on_real_data():
    from segshift.components.evaluation import Evaluation, GroupedEvaluation
    conf = torch.zeros(19, 19, dtype=torch.long)
    conf[0, 0], conf[1, 0] = 5, 5
    result = GroupedEvaluation(Evaluation(conf, 0.5), {None: Evaluation(conf, 0.5)}, {None: 1})
    summary = build_summary({"source": result, "oracle": result}, conditions=[])
    assert "per_condition_miou" not in summary["source"]
    assert summary["source"]["gap_closed"] is None  # no gap between equal results
    assert summary["source"]["per_class_iou"]["wall"] is None
    assert summary["source"]["per_class_iou"]["sidewalk"] == 0.0
    json.loads(strict_json(summary), parse_constant=lambda c: pytest.fail(c))


# -- Cityscapes scored at full resolution (prepare.target.full_resolution_labels) ---------------------

def test_evaluate_scores_the_test_split_at_the_native_label_resolution(tmp_path, monkeypatch):
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image
    from segshift.components.data.rawformats import write_cityscapes, write_gta5
    write_gta5(tmp_path / "gta5", n=2, size=(96, 54))
    write_cityscapes(tmp_path / "cityscapes", per_city=2, size=(128, 64))
    params_file = write_params(tmp_path, overrides(**{
        "prepare.source.kind": "gta5", "prepare.source.root": str(tmp_path / "gta5"),
        "prepare.source.resize": [64, 36],
        "prepare.target.kind": "cityscapes", "prepare.target.root": str(tmp_path / "cityscapes"),
        "prepare.target.resize": [64, 32], "prepare.target.full_resolution_labels": True,
        "engine.cache_images": False, "evaluate.stages": ["source"]}))
    assert main(["prepare", "--params", str(params_file), "--quiet"]) == 0
    params = load_params(params_file)
    save_stage_model(params, "source", tmp_path)
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", "--params", "params.yaml", "--quiet"]) == 0
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())

    test = PreparedSplit(tmp_path / "prepared" / "target", "test")
    assert test.has_full_labels and len(test) == 2
    model = load_stage_model(tmp_path / "models" / "source" / "model.pt", params).eval()
    expected = torch.zeros(19, 19, dtype=torch.long)
    with torch.no_grad():
        for i, row in enumerate(test.rows):                 # eval_UDA.py: upsample to the label, argmax
            full = np.asarray(Image.open(tmp_path / "prepared" / "target" / row["label_full"])).astype(np.int64)
            assert full.shape == (64, 128) and test[i][0].shape[-2:] == (32, 64)
            logits = F.interpolate(model(test[i][0][None]).main.float(), size=full.shape, mode="bilinear",
                                   align_corners=True)
            pred = logits[0].argmax(0).numpy().ravel()
            keep = full.ravel() != 255
            expected += torch.from_numpy(np.bincount(19 * full.ravel()[keep] + pred[keep],
                                                     minlength=361).reshape(19, 19))
    ours = evaluate(model, test, 2, torch.device("cpu"))
    assert torch.equal(ours.confusion, expected)
    assert summary["source"]["miou"] == pytest.approx(ours.summary()["miou"], abs=1e-12)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segshift")
    run = next(r for r in client.search_runs([experiment.experiment_id])
               if r.data.tags.get("segshift.stage") == "evaluate")
    assert run.data.metrics["test_images_full_resolution"] == 2


def test_without_full_resolution_labels_the_test_split_is_scored_at_the_prepared_size(project):
    _, _, params = project
    test = PreparedSplit(params.prepare.out_dir + "/target", "test")
    assert not test.has_full_labels and int(test.full_label(0).numel()) == 0
