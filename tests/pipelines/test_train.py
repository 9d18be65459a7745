"""`segshift train`: a supervised stage end to end, its outputs, MLflow runs and input errors."""
import json
from pathlib import Path

import pytest
import torch

from mlflow.tracking import MlflowClient

from segshift.components.config import load_params
from segshift.components.engine.precision import Hardware
from segshift.pipelines.cli import main
from tests.conftest import constant_baseline, copy_project, label_histogram, write_params

FAST = {"source.iterations": 4, "oracle.iterations": 4, "source.batch_size": 2,
        "oracle.batch_size": 2, "engine.val_every": 2, "engine.checkpoint_every": 2,
        "engine.log_every": 1, "model.width": 0.125}


@pytest.fixture
def project(tiny_project) -> Path:
    """A writable copy of the session's prepared project."""
    return tiny_project


def run(project: Path, *args: str, overrides: dict | None = None) -> int:
    params = write_params(project, {**FAST, **(overrides or {})})
    return main(["train", "--params", str(params), "--quiet", *args])


def test_source_stage_writes_model_metrics_reports_and_mlflow_runs(source_project):
    """The session's source stage (tests/conftest.py: `segshift train --stage source`, FAST's recipe)."""
    project = source_project
    out = (project / "cli-output.txt").read_text()
    assert "target-test mIoU" in out
    native = Hardware.detect(torch.device("cpu")).native_bf16
    chosen = "auto -> bf16" if native else "auto -> fp32"
    assert out.count("source: precision ") == 1 and f"source: precision {chosen}: CPU" in out
    model = torch.load(project / "models" / "source" / "model.pt", weights_only=False)
    assert model["num_classes"] == 19 and model["model_config"]["width"] == 0.125
    assert model["selection"] == "val_miou" and model["step"] in (2, 4)
    metrics = json.loads((project / "metrics" / "source.json").read_text())
    # 4 steps must beat the best constant prediction (mIoU 0.0136 here) clearly: measured 0.053
    assert metrics["test"]["miou"] > 2.5 * constant_baseline(label_histogram(project))[0]
    assert len(metrics["test"]["per_class_iou"]) == 19
    assert metrics["selected_step"] == model["step"] and "val_miou" in metrics["val"]
    assert metrics["val"]["val_miou"] == pytest.approx(model["val"]["val_miou"])
    assert [p["step"] for p in metrics["val_curve"]] == [2, 4]
    assert metrics["speed"]["amp"] == ("bf16" if native else "none")
    assert metrics["speed"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    rows = json.loads((project / "metrics" / "source_per_class.json").read_text())
    assert [r["class"] for r in rows][:2] == ["road", "sidewalk"]
    for picture in ("confusion_matrix.png", "per_class_iou.png", "predictions.png"):
        assert (project / "reports" / "source" / picture).stat().st_size > 1000

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segshift")
    runs = client.search_runs([experiment.experiment_id])
    stage = next(r for r in runs if r.data.tags.get("segshift.stage") == "source")
    parent = client.get_run(stage.data.tags["mlflow.parentRunId"])
    assert stage.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert stage.data.params["source.iterations"] == "4"
    assert stage.data.params["engine.amp"] == "auto"
    assert stage.data.params["resolved.amp"] == metrics["speed"]["amp"]
    assert stage.data.params["resolved.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "test_miou" in stage.data.metrics
    history = client.get_metric_history(stage.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(stage.info.run_id, "report")}
    assert "report/predictions.png" in artifacts


def test_rerun_with_a_finished_checkpoint_resumes_at_the_end(project, monkeypatch):
    monkeypatch.chdir(project)
    assert run(project, "--stage", "oracle") == 0
    first = json.loads((project / "metrics" / "oracle.json").read_text())
    assert run(project, "--stage", "oracle") == 0
    again = json.loads((project / "metrics" / "oracle.json").read_text())
    assert again["resumed_from"] == 4 and again["test"]["miou"] == first["test"]["miou"]


def test_batch_larger_than_the_dataset_is_refused_with_the_counts(project, capsys):
    assert run(project, "--stage", "source", overrides={"source.batch_size": 64}) == 2
    err = capsys.readouterr().err
    assert "6 training images is fewer than source.batch_size = 64" in err


def test_batch_not_divisible_by_workers_is_refused(project, capsys):
    assert run(project, "--stage", "source",
               overrides={"source.batch_size": 3, "engine.workers.num_workers": 2}) == 2
    assert "not divisible by engine.workers.num_workers = 2" in capsys.readouterr().err


def test_missing_prepared_data_is_refused(tmp_path, capsys):
    params = write_params(tmp_path, FAST)
    assert main(["train", "--params", str(params), "--stage", "source", "--quiet"]) == 2
    assert "run `segshift prepare` first" in capsys.readouterr().err


def test_missing_pretrained_weights_name_the_file(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    missing = project / "no-such-weights.pth"
    assert run(project, "--stage", "source", overrides={"model.pretrained": str(missing)}) == 2
    assert str(missing) in capsys.readouterr().err


def test_a_model_of_another_width_or_class_count_is_refused_naming_the_file(project, source_project, monkeypatch):
    from segshift.components.models.factory import ModelError
    from segshift.pipelines.stage_model import load_stage_model
    monkeypatch.chdir(project)
    copy_project(source_project, project)
    path = project / "models" / "source" / "model.pt"
    wider = load_params(write_params(project, {**FAST, "model.width": 0.25}))
    with pytest.raises(ModelError, match=str(path)):
        load_stage_model(path, wider)
    state = torch.load(path, weights_only=False)
    state["model"] = {k: (v[:16] if k.startswith("layer6") or k.startswith("layer5") else v)
                      for k, v in state["model"].items()}
    torch.save(state, project / "sixteen.pt")
    with pytest.raises(ModelError, match="16 classes"):
        load_stage_model(project / "sixteen.pt", load_params(write_params(project, FAST)))


AUGMENT = {"scale": [0.75, 1.25], "brightness": 0.25, "contrast": 0.25, "saturation": 0.25, "hue": 0.05,
           "jitter_p": 0.8, "blur_p": 0.5, "blur_sigma": [0.15, 1.15]}


def test_source_augmentation_feeds_augmented_samples_and_trains(project, monkeypatch):
    import numpy as np

    from segshift.components.data.augment import AugmentationSpec, augment
    from segshift.components.data.dataset import read_label, read_rgb
    from segshift.pipelines.runtime import StageJob, stage_datasets
    monkeypatch.chdir(project)
    overrides = {"source.augment": AUGMENT, "source.crop": [32, 64]}
    params = load_params(write_params(project, {**FAST, **overrides}))
    job = StageJob(params=params.model_dump(mode="json"), stage="source", project_dir=str(project))
    train = stage_datasets(job)["labelled"]
    assert train.augmentation == AugmentationSpec.from_config(params.source.augment, (32, 64), True)
    image, label = train[(0, 7)]
    row = train.rows[0]
    expected_image, expected_label = augment(read_rgb(train.root / row["image"]), read_label(train.root / row["label"]),
                                             train.augmentation, np.random.default_rng(7))
    assert image.shape == (3, 32, 64) and torch.equal(label, torch.from_numpy(expected_label.astype(np.int64)))
    assert torch.allclose(image, train[(0, 7)][0]) and not torch.allclose(image, train[(0, 8)][0])
    assert run(project, "--stage", "source", overrides=overrides) == 0


def test_an_inverted_augmentation_range_is_a_config_error(project, capsys):
    assert run(project, "--stage", "source", overrides={"source.augment": {**AUGMENT, "scale": [1.25, 0.75]}}) == 2
    assert "source.augment" in capsys.readouterr().err
