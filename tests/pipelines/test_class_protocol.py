"""SYNTHIA's 16-class protocol (`model.classes: synthia16`) wired through train, rank and evaluate:
a 16-output head trains on labels mapped to its ids (terrain, truck, train ignored), discriminators
see 16 channels, pseudo-labels are written as train ids, and evaluation ignores the 3 classes the
head does not predict instead of counting them as errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from segshift.components.config import load_params
from segshift.components.data.labels import CLASS_NAMES, IGNORE_INDEX, SYNTHIA_16_CLASSES
from segshift.components.evaluation import evaluate
from segshift.components.models.base import SegOutput
from segshift.components.models.classes import missing_train_ids, to_protocol_ids
from tests.conftest import write_params
from tests.pipelines.test_train import FAST, project, run  # noqa: F401  (project: the prepared tiny project)

MISSING = ("terrain", "truck", "train")
SYNTHIA16 = {"model.classes": "synthia16"}
# train id -> synthia16 protocol id of the classes used below
ROAD, SIDEWALK, VEGETATION, SKY, CAR, BUS = 0, 1, 8, 9, 12, 13


# --- evaluation, by hand ---------------------------------------------------------------------------

class OneHot(nn.Module):
    """A head of `channels` outputs that predicts the given (H, W) map of its own ids."""

    def __init__(self, prediction: torch.Tensor, channels: int, protocol: str):
        super().__init__()
        self.prediction, self.num_classes, self.class_protocol = prediction, channels, protocol

    def forward(self, images: torch.Tensor) -> SegOutput:
        onehot = torch.nn.functional.one_hot(self.prediction, self.num_classes).permute(2, 0, 1).float()
        return SegOutput(10.0 * onehot.expand(images.shape[0], -1, -1, -1))


class One(Dataset):
    def __init__(self, label: torch.Tensor):
        self.label = label

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return torch.zeros(3, *self.label.shape), self.label


# Target (train ids): car car truck road / sidewalk road terrain train.
TARGET = torch.tensor([[13, 13, 14, 0], [1, 0, 9, 16]])
# Prediction (train ids): car car car road / road road vegetation car. The truck and the train pixel
# are predicted car, the terrain pixel vegetation, the sidewalk pixel road.
PREDICTED = torch.tensor([[13, 13, 13, 0], [0, 0, 8, 13]])


def test_a_truck_pixel_predicted_car_is_no_error_under_synthia16_but_is_one_under_cityscapes19():
    cpu = torch.device("cpu")
    nineteen = evaluate(OneHot(PREDICTED, 19, "cityscapes19"), One(TARGET), 1, cpu).summary()
    sixteen = evaluate(OneHot(to_protocol_ids(PREDICTED, "synthia16"), 16, "synthia16"),
                       One(TARGET), 1, cpu).summary()
    iou19, iou16 = nineteen["per_class_iou"], sixteen["per_class_iou"]

    # cityscapes19, all 8 pixels: car TP 2, FP 2 (truck, train) -> 2/4; road TP 2, FP 1 (sidewalk)
    # -> 2/3; sidewalk, truck, terrain, train, vegetation 0 -> mIoU (2/3 + 1/2) / 7 = 1/6.
    assert iou19["car"] == 0.5 and iou19["road"] == pytest.approx(2 / 3)
    assert [iou19[c] for c in ("sidewalk", "truck", "terrain", "train", "vegetation")] == [0.0] * 5
    assert nineteen["miou"] == pytest.approx(1 / 6) and nineteen["pixel_accuracy"] == 0.5

    # synthia16: the truck, terrain and train pixels are ignored: car 2/2 = 1 (the truck pixel
    # predicted car is no false positive), road 2/3, sidewalk 0 -> mIoU (1 + 2/3 + 0) / 3 = 5/9,
    # over 5 pixels of which 4 right.
    assert iou16["car"] == 1.0 and iou16["road"] == pytest.approx(2 / 3) and iou16["sidewalk"] == 0.0
    assert all(math.isnan(iou16[c]) for c in MISSING)            # absent, not 0
    assert math.isnan(iou16["vegetation"])      # predicted only on an ignored (terrain) pixel
    assert sixteen["miou"] == sixteen["miou_16"] == sixteen["miou_13"] == pytest.approx(5 / 9)
    assert sixteen["pixel_accuracy"] == pytest.approx(4 / 5)
    assert list(iou16) == list(CLASS_NAMES)                      # the table keeps the 19 names


# --- discriminators --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["advent", "adaptsegnet"])
def test_the_discriminators_of_a_16_class_head_take_16_channels_and_a_step_runs(tmp_path, method):
    from segshift.components.methods.labor import build_model_a
    from segshift.components.methods.registry import build_method
    from segshift.components.models.factory import build_model
    params = load_params(write_params(tmp_path), {**SYNTHIA16, "model.width": 0.125, "inter.method": method})
    torch.manual_seed(0)
    step = build_method(build_model(params.model), params.inter, params)
    assert {name: d.conv1.in_channels for name, d in step.modules.items() if name.startswith("d_")} == {
        "d_main": 16, "d_aux": 16}
    labels = to_protocol_ids(torch.randint(0, 19, (2, 64, 64)), "synthia16")
    batch = {"labelled": (torch.randn(2, 3, 64, 64), labels), "unlabelled": (torch.randn(2, 3, 64, 64), torch.empty(0))}
    logs = step.training_step(batch, 0, lambda loss: loss.backward())
    assert torch.isfinite(logs["loss"]) and "d_main" in logs
    labor_a = build_model_a(build_model(params.model), params.inter, params)
    assert labor_a.modules["d_main"].conv1.in_channels == 16


# --- pseudo-labels are written as train ids -----------------------------------------------------------

class Fixed16(nn.Module):
    """A synthia16 head: protocol id 9 (sky) on the left half, 13 (bus) on the right half, with a
    confidence that varies along the rows."""

    num_classes, class_protocol = 16, "synthia16"

    def forward(self, images: torch.Tensor) -> SegOutput:
        n, _, h, w = images.shape
        logits = torch.zeros(n, 16, h, w)
        ramp = torch.linspace(1.0, 6.0, h).view(h, 1)
        logits[:, SKY, :, : w // 2] = ramp
        logits[:, BUS, :, w // 2:] = ramp
        return SegOutput(logits)


class Context:
    """The few RoundContext members that the labelling functions read."""

    image_size = (8, 8)
    device = torch.device("cpu")

    def __init__(self, images: int):
        self.ids = [f"img-{k:02d}" for k in range(images)]

    def model(self, init):
        return Fixed16()

    def predict(self, models, desc):
        images = torch.zeros(len(self.ids), 3, *self.image_size)
        yield self.ids, [model(images) for model in models]


def _train_ids_only(labels: dict[str, np.ndarray]) -> set[int]:
    values = set(np.unique(np.concatenate([np.asarray(v).ravel() for v in labels.values()])).tolist())
    assert values <= {10, 15, IGNORE_INDEX}, values       # sky and bus as train ids, never 9 / 13
    assert {10, 15} <= values
    return values


def test_round_methods_write_a_16_class_models_pseudo_labels_as_train_ids():
    from segshift.components.methods.fda import target_pseudo_labels
    from segshift.components.methods.labor.rounds import model_pseudo_labels
    from segshift.components.methods.lse import pseudo_labels

    labor = model_pseudo_labels(Context(2), None, "labor")
    assert _train_ids_only(labor) == {10, 15}
    assert labor["img-00"][:, :4].tolist() == [[10] * 4] * 8 and labor["img-00"][:, 4:].tolist() == [[15] * 4] * 8

    # LSE: n_c counted over the head's 16 classes: 16 images where sky is predicted keep
    # int(16 * 1.0 / 16) = 1 of them (19 would keep none)
    lse, report = pseudo_labels(Context(16), None, 1.0, "lse")
    assert report["images"] == 1 and len(report["entropy_thresholds"]) == 16
    _train_ids_only(lse)

    fda, report = target_pseudo_labels(Context(2), ["a", "b"])
    assert len(report["thresholds"]) == 16
    _train_ids_only(fda)


def test_the_rankings_labels_histograms_and_rare_classes_are_in_train_ids():
    from segshift.components.ranking import score_images
    scores = score_images(Fixed16(), torch.zeros(2, 3, 8, 8))
    assert scores.labels[0][:, :4].tolist() == [[10] * 4] * 8 and scores.labels[0][:, 4:].tolist() == [[15] * 4] * 8
    assert scores.class_histogram.shape == (2, 19)
    assert scores.class_histogram[0, 10] == scores.class_histogram[0, 15] == 0.5
    assert scores.rare_present.tolist() == [1, 1]                 # bus (15) is rare, sky is not
    histograms = scores.confidence_histograms()
    assert histograms.shape == (2, 19, 256) and histograms[0, [10, 15]].sum() == 64


# --- the source stage end to end, on the built-in data ----------------------------------------------

def test_the_source_stage_trains_a_16_output_head_and_scores_it_on_16_classes(project, monkeypatch):  # noqa: F811
    from segshift.components.models.factory import ModelError
    from segshift.pipelines.runtime import StageJob, stage_datasets
    from segshift.pipelines.stage_model import load_stage_model
    monkeypatch.chdir(project)
    overrides = {**SYNTHIA16, "source.crop": [32, 64]}
    assert run(project, "--stage", "source", overrides=overrides) == 0
    params = load_params(write_params(project, {**FAST, **overrides}))

    # the stage read its (built-in, 19-class) source labels in the head's ids
    job = StageJob(params=params.model_dump(mode="json"), stage="source", project_dir=str(project))
    labelled = stage_datasets(job)["labelled"]
    raw = np.concatenate([labelled._load(i)[1].ravel() for i in range(len(labelled))])
    assert set(missing_train_ids("synthia16")) & set(raw.tolist())   # the data has the missing classes
    read = torch.cat([labelled[(i, 0)][1].ravel() for i in range(len(labelled))])
    assert set(read.unique().tolist()) <= set(range(16)) | {IGNORE_INDEX}

    path = project / "models" / "source" / "model.pt"
    state = torch.load(path, weights_only=False)
    assert state["num_classes"] == 16 and state["model_config"]["classes"] == "synthia16"
    model = load_stage_model(path, params)
    assert model.num_classes == 16 and {c.out_channels for c in model.layer6.conv2d_list} == {16}

    test = json.loads((project / "metrics" / "source.json").read_text())["test"]
    ious = test["per_class_iou"]
    assert all(ious[c] is None or math.isnan(ious[c]) for c in MISSING)     # absent, not 0
    present = [ious[CLASS_NAMES[c]] for c in SYNTHIA_16_CLASSES if ious[CLASS_NAMES[c]] == ious[CLASS_NAMES[c]]]
    assert present and test["miou"] == pytest.approx(sum(present) / len(present))
    assert test["miou"] == pytest.approx(test["miou_16"])

    # the same model.pt under a 19-class params: one line naming the file, its count and the key
    nineteen = load_params(write_params(project, {**FAST, "model.classes": "cityscapes19"}))
    with pytest.raises(ModelError) as info:
        load_stage_model(path, nineteen)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "has 16 classes" in message
    assert "model.classes: cityscapes19" in message
