"""The default suite's end-to-end run: `segshift prepare`, `segshift train --stage source` and
`segshift evaluate` through the command line on the session's tiny project (tests/conftest.py
`source_project`: built once, shared read-only), checked for its files and for what the 4-step
source model must reach. The whole pipeline under `dvc repro` is an integration test
(tests/test_dvc_pipeline.py)."""
import json
import re

import pytest
import torch

from segshift.components.config import load_params
from segshift.components.data.dataset import PreparedSplit
from segshift.components.data.labels import CLASS_NAMES
from segshift.components.data.manifest import read_manifest
from segshift.components.evaluation import evaluate
from segshift.pipelines.stage_model import load_stage_model
from tests.conftest import SMOKE_TRAINING, TINY_BUILTIN, constant_baseline, label_histogram


def test_prepare_writes_both_domains_with_the_configured_counts(source_project):
    counts = TINY_BUILTIN["prepare.builtin.counts"]
    for domain in ("source", "target"):
        rows = read_manifest(source_project / "prepared" / domain).to_pylist()
        by_split = {s: sum(r["split"] == s for r in rows) for s in {r["split"] for r in rows}}
        assert by_split == {s.split("_", 1)[1]: n for s, n in counts.items() if s.startswith(domain)}
        for row in rows:
            assert (source_project / "prepared" / domain / row["image"]).stat().st_size > 0
            assert (row["height"], row["width"]) == (64, 128)


def test_train_writes_the_model_metrics_and_report(source_project):
    model = torch.load(source_project / "models" / "source" / "model.pt", weights_only=False)
    assert model["stage"] == "source" and model["num_classes"] == 19
    assert model["model_config"]["width"] == SMOKE_TRAINING["model.width"]
    metrics = json.loads((source_project / "metrics" / "source.json").read_text())
    assert metrics["steps"] == SMOKE_TRAINING["source.iterations"] and metrics["resumed_from"] == 0
    assert metrics["selected_step"] == model["step"] and model["step"] in (2, 4)   # validated every 2 steps
    assert list(metrics["test"]["per_class_iou"]) == list(CLASS_NAMES)
    rows = json.loads((source_project / "metrics" / "source_per_class.json").read_text())
    assert [r["class"] for r in rows] == list(CLASS_NAMES)
    for picture in ("confusion_matrix.png", "per_class_iou.png", "predictions.png"):
        assert (source_project / "reports" / "source" / picture).stat().st_size > 1000
    printed = (source_project / "cli-output.txt").read_text()
    shown = re.search(r"source: target-test mIoU (\d+\.\d)", printed)
    assert shown and float(shown.group(1)) == round(100 * metrics["test"]["miou"], 1)


def test_the_source_model_learned_more_than_a_constant_prediction(source_project):
    """4 Adam steps at lr 0.002 on 6 source images; measured (CPU, seed 0, twice alike): target-test
    mIoU 0.053, pixel accuracy 0.44. The best constant prediction (the most frequent class, road,
    everywhere) scores mIoU 0.0136 and pixel accuracy 0.232 on these labels: the model must clear
    both by a wide margin."""
    metrics = json.loads((source_project / "metrics" / "source.json").read_text())
    constant_miou, constant_accuracy = constant_baseline(label_histogram(source_project))
    assert constant_miou == pytest.approx(0.0136, abs=5e-4) and constant_accuracy == pytest.approx(0.232, abs=5e-3)
    assert metrics["test"]["miou"] > 2.5 * constant_miou
    assert metrics["test"]["pixel_accuracy"] > 1.6 * constant_accuracy
    assert metrics["val"]["val_miou"] > 2.5 * constant_miou


def test_the_reported_numbers_are_those_of_the_exported_model(source_project):
    """metrics/source.json and evaluate's summary both score models/source/model.pt on target test."""
    params = load_params(source_project / "params.yaml")
    model = load_stage_model(source_project / "models" / "source" / "model.pt", params)
    alone = evaluate(model, PreparedSplit(source_project / "prepared" / "target", "test"), 3,
                     torch.device("cpu")).summary()
    metrics = json.loads((source_project / "metrics" / "source.json").read_text())
    summary = json.loads((source_project / "metrics" / "summary.json").read_text())
    assert list(summary) == ["source"]
    for reported in (metrics["test"], summary["source"]):
        assert reported["miou"] == pytest.approx(alone["miou"], abs=1e-9)
        assert reported["pixel_accuracy"] == pytest.approx(alone["pixel_accuracy"], abs=1e-9)
    markdown = (source_project / "reports" / "evaluate" / "summary.md").read_text()
    assert f"| source | {100 * alone['miou']:.1f} |" in markdown
