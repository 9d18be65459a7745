"""A stage's report: metrics JSON, the per-class table `dvc plots` reads, and the PNG pictures."""
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from segshift.components.config import load_params
from segshift.components.data.labels import CLASS_NAMES
from segshift.components.evaluation import Evaluation
from segshift.components.models.base import SegOutput
from segshift.components.visualize import TRAIN_ID_COLOURS
from segshift.pipelines.report import PREVIEW_SAMPLES, per_class_rows, prediction_picture, write_stage_report
from tests.conftest import REPO

H, W = 16, 24


class Constant(nn.Module):
    """Predicts class `cls` everywhere, with logit `margin` over the 18 others."""

    def __init__(self, cls: int, margin: float) -> None:
        super().__init__()
        self.cls, self.margin = cls, margin
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        logits = torch.zeros(images.shape[0], 19, images.shape[2] // 8, images.shape[3] // 8)
        logits[:, self.cls] = self.margin
        return SegOutput(logits + self.anchor)


def samples(count: int, labelled: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return [(torch.randn(3, H, W), torch.full((H, W), 1) if labelled else torch.empty(0))
            for _ in range(count)]


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def tile(picture: np.ndarray, row: int, column: int, gap: int = 2) -> np.ndarray:
    return picture[row * (H + gap):row * (H + gap) + H, column * (W + gap):column * (W + gap) + W]


def test_per_class_rows_are_percent_with_absent_classes_as_null():
    rows = per_class_rows({"road": 0.123456, "sidewalk": float("nan"), "car": 1.0, "bus": 0.0})
    assert rows == [{"class": "road", "iou": 12.35}, {"class": "sidewalk", "iou": None},
                    {"class": "car", "iou": 100.0}, {"class": "bus", "iou": 0.0}]
    json.dumps(rows, allow_nan=False)             # dvc plots reads strict JSON


def test_prediction_picture_rows_are_image_truth_prediction_entropy():
    picture = prediction_picture(Constant(13, 20.0), samples(8), torch.device("cpu"), PREVIEW_SAMPLES)
    # at most PREVIEW_SAMPLES rows of 4 tiles with 2-pixel white gaps
    assert picture.shape == (6 * (H + 2) - 2, 4 * (W + 2) - 2, 3) and picture.dtype == np.uint8
    assert (tile(picture, 0, 1) == TRAIN_ID_COLOURS[1]).all()          # truth: sidewalk
    assert (tile(picture, 5, 2) == TRAIN_ID_COLOURS[13]).all()         # prediction: car
    confident = tile(picture, 0, 3).astype(int)
    unsure = tile(prediction_picture(Constant(13, 0.0), samples(1), torch.device("cpu"), 1), 0, 3).astype(int)
    # the entropy map: dark where the prediction is sure, bright where all classes tie
    assert confident.sum(-1).max() < 60 and unsure.sum(-1).min() > 400
    assert (picture[H:H + 2] == 255).all() and (picture[:, W:W + 2] == 255).all()


def test_without_labels_a_row_has_no_truth_column():
    picture = prediction_picture(Constant(0, 20.0), samples(2, labelled=False), torch.device("cpu"), 6)
    assert picture.shape == (2 * (H + 2) - 2, 3 * (W + 2) - 2, 3)
    assert (tile(picture, 1, 1) == TRAIN_ID_COLOURS[0]).all()          # the prediction is column 1


class Tracker:
    def __init__(self) -> None:
        self.logged: list[tuple[Path, str]] = []

    def log_artifact(self, path, folder):
        self.logged.append((Path(path), folder))


@pytest.mark.parametrize("with_tracker", [True, False])
def test_write_stage_report_writes_metrics_table_and_pictures(tmp_path, with_tracker):
    params = load_params(REPO / "params.yaml")
    job = SimpleNamespace(config=params, stage="inter", path=lambda relative: tmp_path / relative)
    confusion = torch.zeros(19, 19, dtype=torch.long)
    confusion[0, 0], confusion[0, 1], confusion[1, 1] = 30, 10, 60      # road 30/40, sidewalk 60/70
    evaluation = Evaluation(confusion=confusion, mean_entropy=0.25)
    per_class = {name: float("nan") for name in CLASS_NAMES} | {"road": 0.75, "sidewalk": 60 / 70}
    metrics = {"steps": 2, "test": {"miou": 0.8036, "per_class_iou": per_class}}
    tracker = Tracker() if with_tracker else None
    files = write_stage_report(job, metrics, evaluation, Constant(13, 20.0), samples(3),
                               torch.device("cpu"), tracker)

    assert set(files) == {"metrics", "per_class", "confusion_matrix.png", "per_class_iou.png", "predictions.png"}
    assert files["metrics"] == tmp_path / "metrics" / "inter.json"
    written = json.loads(files["metrics"].read_text(), parse_constant=lambda c: c)
    assert written["steps"] == 2 and written["test"]["miou"] == 0.8036
    assert written["test"]["per_class_iou"]["sidewalk"] == pytest.approx(60 / 70)
    rows = json.loads((tmp_path / "metrics" / "inter_per_class.json").read_text())
    assert [r["class"] for r in rows] == list(CLASS_NAMES)
    assert rows[0] == {"class": "road", "iou": 75.0} and rows[1] == {"class": "sidewalk", "iou": 85.71}
    assert all(r["iou"] is None for r in rows[2:])

    reports = tmp_path / "reports" / "inter"
    assert sorted(p.name for p in reports.iterdir()) == ["confusion_matrix.png", "per_class_iou.png",
                                                         "predictions.png"]
    predictions = read_rgb(reports / "predictions.png")
    assert predictions.shape == (3 * (H + 2) - 2, 4 * (W + 2) - 2, 3)
    assert (tile(predictions, 2, 2) == TRAIN_ID_COLOURS[13]).all()
    confusion_png = read_rgb(reports / "confusion_matrix.png")
    bars = read_rgb(reports / "per_class_iou.png")
    assert confusion_png.shape[:2] == (700, 800) and bars.shape[:2] == (400, 1100)   # figsize x dpi 100
    assert confusion_png.std() > 10 and bars.std() > 10          # drawn, not blank canvases
    if with_tracker:
        assert tracker.logged == [(files[name], "report") for name in files]
    else:
        assert tracker is None


def test_the_metrics_file_is_replaced_not_appended(tmp_path):
    params = load_params(REPO / "params.yaml")
    job = SimpleNamespace(config=params, stage="source", path=lambda relative: tmp_path / relative)
    evaluation = Evaluation(confusion=torch.eye(19, dtype=torch.long), mean_entropy=0.0)
    per_class = {name: 1.0 for name in CLASS_NAMES}
    for miou in (0.1, 0.2):
        write_stage_report(job, {"test": {"miou": miou, "per_class_iou": per_class}}, evaluation,
                           Constant(0, 5.0), samples(1), torch.device("cpu"), None)
    assert json.loads((tmp_path / "metrics" / "source.json").read_text())["test"]["miou"] == 0.2
    rows = json.loads((tmp_path / "metrics" / "source_per_class.json").read_text())
    assert [r["iou"] for r in rows] == [100.0] * 19
