"""Stages that train in rounds: LSE, FDA's multi-band ensemble + self-training, LabOR's labelling stages."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from segshift.components.data.dataset import read_label
from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.data.manifest import read_manifest
from segshift.pipelines.cli import main
from segshift.pipelines.rounds import select_round
from tests.conftest import copy_project, write_params

FAST = {"source.iterations": 2, "source.batch_size": 2, "inter.batch_size": 2,
        "engine.val_every": 2, "engine.checkpoint_every": 2, "engine.log_every": 1,
        "model.width": 0.125}


def run(project: Path, overrides: dict) -> int:
    params = write_params(project, {**FAST, **overrides})
    return main(["train", "--params", str(params), "--stage", "inter", "--quiet"])


@pytest.fixture
def project(source_project, tmp_path) -> Path:
    """A writable copy of the session's project with its source model (each test its own)."""
    root = copy_project(source_project, tmp_path)
    write_params(root, FAST)
    return root


def target_truth(project: Path) -> dict[str, np.ndarray]:
    target = project / "prepared" / "target"
    return {r["sample_id"]: read_label(target / r["label"])
            for r in read_manifest(target).to_pylist() if r["split"] == "train"}


def inter_run(project: Path):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segshift")
    runs = client.search_runs([experiment.experiment_id], "tags.`segshift.stage` = 'inter'",
                              order_by=["attributes.start_time DESC"])
    return client, runs[0]


def _candidate(name: str, metric: str, value: float | None):
    return name, f"job-{name}", {"selection": {"metric": metric, "value": value, "step": 1}, "steps": 1}


def test_select_round_keeps_the_best_on_val_in_the_metrics_direction():
    rounds = [_candidate("r1", "val_miou", 0.20), _candidate("r2", "val_miou", 0.25),
              _candidate("r3", "val_miou", 0.25), _candidate("r4", "val_miou", 0.15)]
    job, summary = select_round(rounds, {"rounds": ["kept"]})
    assert job == "job-r2"                                          # a tie keeps the earlier round
    assert summary["extra"] == {"rounds": ["kept"], "selected_round": "r2",
                                "round_val": {"val_miou": {"r1": 0.20, "r2": 0.25, "r3": 0.25, "r4": 0.15}}}
    entropy = [_candidate("r1", "val_entropy", 0.3), _candidate("r2", "val_entropy", None),
               _candidate("r3", "val_entropy", 0.1)]
    assert select_round(entropy, {})[0] == "job-r3"                # lower entropy is better
    with pytest.raises(ValueError, match="no segmentation model"):
        select_round([], {})


@pytest.mark.integration
def test_lse_trains_one_round_per_share_with_growing_selections(project, monkeypatch):
    monkeypatch.chdir(project)
    # the reference keeps int(n_c * p / 19) images per class: none of 6 target images; keep at least
    # one per present class here so that the rounds have data (the rule is tested in test_lse.py)
    from segshift.components.methods import lse as lse_lib
    rule = lse_lib.images_per_class
    monkeypatch.setattr(lse_lib, "images_per_class", lambda n, p, c: max(1, rule(n, p, c)) if n else 0)
    shares = {"methods.lse.share_start": 0.2, "methods.lse.share_step": 0.3, "methods.lse.share_max": 0.8,
              "methods.lse.crops_per_image": 2, "inter.method": "lse", "inter.iterations": 6}
    assert run(project, shares) == 0
    metrics = json.loads((project / "metrics" / "inter.json").read_text())
    rounds = metrics["rounds"]
    assert [r["share"] for r in rounds] == pytest.approx([0.2, 0.5, 0.8])
    # a larger per-class share never selects fewer images
    assert [r["images"] for r in rounds] == sorted(r["images"] for r in rounds)
    stage_dir = project / "checkpoints" / "inter"
    truth = target_truth(project)
    for r in (1, 2, 3):
        labels = sorted((stage_dir / f"round-{r}" / "labels").glob("*.png"))
        assert len(labels) == rounds[r - 1]["images"]
        label = read_label(labels[0])
        assert label.shape == next(iter(truth.values())).shape
        # the entropy thresholds leave some pixels unlabelled (p < 1)
        assert (label == IGNORE_INDEX).any()
        assert (stage_dir / f"round-{r}" / "best.pt").is_file()
    # the stage's model is the round that scores best on val, not merely the last one
    scores = metrics["round_val"]["val_miou"]
    assert sorted(scores) == ["round-1", "round-2", "round-3"]
    assert metrics["selected_round"] == max(scores, key=lambda name: (scores[name], -int(name[-1])))
    exported = torch.load(project / "models" / "inter" / "model.pt", weights_only=False)
    chosen = torch.load(stage_dir / metrics["selected_round"] / "best.pt", weights_only=False)
    assert exported["val"] == chosen["metrics"]
    assert all(torch.equal(exported["model"][k], chosen["model"][k]) for k in chosen["model"])
    # the rounds continue one MLflow history: 2 + 2 + 2 steps
    client, inter = inter_run(project)
    steps = [m.step for m in client.get_metric_history(inter.info.run_id, "loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert {"target", "lse_share", "lse_images"} <= set(inter.data.metrics)

    # a second run: every round is labelled and trained already -> nothing changes
    before = {p: p.stat().st_mtime_ns for p in stage_dir.rglob("*.png")}
    assert run(project, shares) == 0
    assert {p: p.stat().st_mtime_ns for p in stage_dir.rglob("*.png")} == before
    resumed = json.loads((project / "metrics" / "inter.json").read_text())
    # the rounds' training time, spent in the first run, still counts in the resumed stage's time
    assert resumed["seconds"] >= sum(torch.load(stage_dir / f"round-{r}" / "last.pt", weights_only=False)["seconds"]
                                     for r in (1, 2, 3))

    # another method setting: the rounds' checkpoints belong to the old one and train afresh
    assert run(project, {**shares, "methods.lse.gamma": 2.0}) == 0
    again = json.loads((project / "metrics" / "inter.json").read_text())
    assert again["resumed_from"] == 0 and metrics["resumed_from"] == 0


def test_lse_refuses_a_zoom_other_than_2x_in_one_line(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert run(project, {"inter.method": "lse", "methods.lse.scale": 1.0}) != 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "methods.lse.scale = 1" in line)
    assert "takes only 2.0" in line and "rank.class_balanced_share" in line


@pytest.mark.integration
def test_fda_ensemble_pseudo_labels_then_self_training(project, monkeypatch):
    monkeypatch.chdir(project)
    assert run(project, {"inter.method": "fda", "inter.iterations": 8,
                         "methods.fda.ensemble_betas": [0.01, 0.05, 0.09]}) == 0
    stage_dir = project / "checkpoints" / "inter"
    for name in ("beta-0.01", "beta-0.05", "beta-0.09", "self-training"):
        assert (stage_dir / name / "best.pt").is_file(), name
        # every band model, and the self-training round, trains the stage's full iterations
        assert torch.load(stage_dir / name / "last.pt", weights_only=False)["step"] == 8, name
    labels = sorted((stage_dir / "self-training" / "labels").glob("*.png"))
    assert len(labels) == len(target_truth(project))       # every target train image
    metrics = json.loads((project / "metrics" / "inter.json").read_text())
    assert metrics["ensemble"]["betas"] == [0.01, 0.05, 0.09]
    assert 0 < metrics["ensemble"]["labelled_pixels"] < 1   # per-class thresholds drop some pixels
    client, inter = inter_run(project)
    assert "pseudo" in inter.data.metrics                   # the self-training round's own loss
    # the reference's SStrain.py starts from the band models' init (--init-weights), at LB = 0.01
    saved = json.loads((stage_dir / "self-training" / "round.json").read_text())
    assert saved["round"]["init"] is None and saved["round"]["beta"] == 0.01
    # the multi-band ensemble itself is evaluated (the paper's MBT result) and logged
    bands = _band_models(project, stage_dir)
    for split in ("val", "test"):
        assert metrics["ensemble"][split]["miou"] == pytest.approx(_ensemble_miou(project, bands, split), abs=1e-9)
        assert f"fda_ensemble_{split}_miou" in inter.data.metrics
    assert set(metrics["ensemble"]["bands"]) == {"0.01", "0.05", "0.09"}
    assert metrics["headline"] == "selected_round"
    # pseudo-labels: getSudoLabel_multi.py's rule on the exact averaged confidences
    ids, labels, conf = _ensemble_train_predictions(project, bands)
    expected = _reference_thresholds(labels, conf)
    assert saved["report"]["thresholds"] == pytest.approx(expected, abs=1e-6)
    for sample_id, label, c in zip(ids, labels, conf):
        kept = label.copy()
        kept[c < np.asarray(expected, np.float32)[label]] = IGNORE_INDEX
        assert np.array_equal(read_label(stage_dir / "self-training" / "labels" / f"{sample_id}.png"), kept)


@pytest.mark.integration
def test_fda_without_self_training_reports_the_band_ensemble_as_the_stage_result(project, monkeypatch):
    monkeypatch.chdir(project)
    assert run(project, {"inter.method": "fda", "inter.iterations": 4,
                         "methods.fda.ensemble_betas": [0.01, 0.05, 0.09],
                         "methods.fda.self_training": False}) == 0
    metrics = json.loads((project / "metrics" / "inter.json").read_text())
    stage_dir = project / "checkpoints" / "inter"
    miou = _ensemble_miou(project, _band_models(project, stage_dir), "test")
    assert metrics["headline"] == "ensemble"
    assert metrics["test"]["miou"] == pytest.approx(miou, abs=1e-9) == metrics["ensemble"]["test"]["miou"]
    assert metrics["val"]["val_miou"] == metrics["ensemble"]["val"]["miou"]
    assert metrics["selected_round"].startswith("beta-")     # the exported model: the best band
    per_class = json.loads((project / "metrics" / "inter_per_class.json").read_text())
    assert per_class                                          # the report's table is the ensemble's
    _, inter = inter_run(project)                             # MLflow's test_* too, not the band's
    assert inter.data.metrics["test_miou"] == pytest.approx(metrics["test"]["miou"], abs=1e-9)


# -- FDA by hand: the reference's evaluation_multi.py / getSudoLabel_multi.py in numpy ---------------

def _band_models(project: Path, stage_dir: Path) -> list:
    from segshift.components.config import load_params
    from segshift.pipelines.stage_model import load_stage_model
    params = load_params(project / "params.yaml")
    return [load_stage_model(stage_dir / f"beta-{b}" / "best.pt", params).eval() for b in ("0.01", "0.05", "0.09")]


def _mean_softmax(models, images: torch.Tensor, size) -> np.ndarray:
    """Each model's softmax at its output size, their mean (1/3 each), bilinearly upsampled."""
    with torch.no_grad():
        mean = sum(m(images[None]).main.float().softmax(1) for m in models) / len(models)
        mean = torch.nn.functional.interpolate(mean, size=size, mode="bilinear", align_corners=False)
    return mean[0].numpy()


def _ensemble_miou(project: Path, models, split: str) -> float:
    from segshift.components.data.dataset import PreparedSplit
    dataset = PreparedSplit(project / "prepared" / "target", split, cache=False)
    hist = np.zeros((19, 19))
    for i in range(len(dataset)):
        image, label = dataset[i]
        pred = _mean_softmax(models, image, tuple(label.shape)).argmax(0)
        label = label.numpy()
        keep = label != IGNORE_INDEX
        hist += np.bincount(19 * label[keep].astype(int) + pred[keep], minlength=19 ** 2).reshape(19, 19)
    union = hist.sum(0) + hist.sum(1) - np.diag(hist)
    return float(np.mean(np.diag(hist)[union > 0] / union[union > 0]))


def _ensemble_train_predictions(project: Path, models):
    from segshift.components.data.dataset import PreparedSplit
    dataset = PreparedSplit(project / "prepared" / "target", "train", need_labels=False)
    labels, conf, ids = [], [], [row["sample_id"] for row in dataset.rows]
    for i in range(len(dataset)):
        image, _ = dataset[i]
        mean = _mean_softmax(models, image, tuple(image.shape[-2:]))
        labels.append(mean.argmax(0))
        conf.append(mean.max(0))
    return ids, np.stack(labels), np.stack(conf)


def _reference_thresholds(labels: np.ndarray, conf: np.ndarray) -> list[float]:
    thres = []
    for i in range(19):
        x = conf[labels == i]
        if len(x) == 0:
            thres.append(0.0)
            continue
        x = np.sort(x)
        thres.append(float(x[min(int(np.round(len(x) * 0.66)), len(x) - 1)]))
    return [min(t, 0.9) for t in thres]


@pytest.mark.parametrize("selection", ["spl", "ppl"])
@pytest.mark.integration
def test_labor_reveals_only_asked_pixels_within_the_budget(project, monkeypatch, selection):
    monkeypatch.chdir(project)
    budget = 0.06
    assert run(project, {"inter.method": "labor", "inter.iterations": 4, "methods.labor.stages": 2,
                         "methods.labor.selector_iterations": 2, "methods.labor.selection": selection,
                         "methods.labor.label_budget": budget, "methods.labor.points_per_image": 5,
                         "methods.labor.adapt_iterations": 1}) == 0
    metrics = json.loads((project / "metrics" / "inter.json").read_text())
    labels = metrics["labels"]
    assert [s["stage"] for s in labels["stages"]] == ["stage-1", "stage-2"]
    assert 0 < labels["share"] <= budget
    truth = target_truth(project)
    total = sum(t.size for t in truth.values())
    stage_dir = project / "checkpoints" / "inter"
    revealed = {p.stem: read_label(p) for p in (stage_dir / "stage-2" / "labels").glob("*.png")}
    known = sum(int((r != IGNORE_INDEX).sum()) for r in revealed.values())
    assert known / total <= labels["share"] + 1e-9
    for sample_id, label in revealed.items():
        asked = label != IGNORE_INDEX
        # whatever was revealed is the ground truth of those pixels
        assert np.array_equal(label[asked], truth[sample_id][asked])
    if selection == "ppl":   # points, not regions: at most points_per_image per image, all stages
        assert all(int((r != IGNORE_INDEX).sum()) <= 5 for r in revealed.values())
    assert (project / "reports" / "inter" / "labor_stage-1.png").is_file()
    client, inter = inter_run(project)
    artifacts = [a.path for a in client.list_artifacts(inter.info.run_id, "labor")]
    assert "labor/labor_stage-1.png" in artifacts


@pytest.mark.integration
def test_a_person_can_take_the_oracles_place_through_files(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    overrides = {"inter.method": "labor", "inter.iterations": 2, "methods.labor.stages": 2,
                 "methods.labor.selector_iterations": 1, "methods.labor.annotator": "files",
                 "methods.labor.annotations": "asks", "methods.labor.label_budget": 0.05,
                 "methods.labor.adapt_iterations": 0}
    truth = target_truth(project)
    for stage in ("stage-1", "stage-2"):
        assert run(project, overrides) == 2            # waits for the person
        err = capsys.readouterr().err
        requests, answers = project / "asks" / stage / "requests", project / "asks" / stage / "labels"
        assert f"label the white pixels of {requests}" in err and str(answers) in err
        for request in requests.glob("*.png"):
            asked = read_label(request) == 255
            answer = np.full(asked.shape, 7, np.uint8)  # a careless person labels everything...
            answer[asked] = truth[request.stem][asked]  # ...but only the asked pixels are taken
            answers.mkdir(parents=True, exist_ok=True)
            from segshift.components.io import write_png
            write_png(answers / request.name, answer)
    assert run(project, overrides) == 0
    labels = json.loads((project / "metrics" / "inter.json").read_text())["labels"]
    assert labels["annotator"] == "files" and 0 < labels["share"] <= 0.05
    for path in (project / "checkpoints" / "inter" / "stage-2" / "labels").glob("*.png"):
        label = read_label(path)
        known = label != IGNORE_INDEX
        assert np.array_equal(label[known], truth[path.stem][known])


@pytest.mark.integration
def test_a_persons_label_of_the_wrong_size_format_or_ids_is_refused_naming_the_file(project, monkeypatch, capsys):
    import cv2
    from segshift.components.io import write_png
    monkeypatch.chdir(project)
    overrides = {"inter.method": "labor", "inter.iterations": 2, "methods.labor.stages": 2,
                 "methods.labor.selector_iterations": 1, "methods.labor.annotator": "files",
                 "methods.labor.annotations": "careless", "methods.labor.label_budget": 0.05,
                 "methods.labor.adapt_iterations": 0}
    assert run(project, overrides) == 2
    capsys.readouterr()
    requests, answers = project / "careless" / "stage-1" / "requests", project / "careless" / "stage-1" / "labels"
    answers.mkdir(parents=True)
    shapes = {}
    for request in requests.glob("*.png"):
        shapes[request.name] = read_label(request).shape
        write_png(answers / request.name, np.zeros(shapes[request.name], np.uint8))
    victim = answers / sorted(shapes)[0]
    height, width = shapes[victim.name]
    cases = {
        "wrong size": (write_png, np.zeros((height // 2, width), np.uint8), f"request {width}x{height}"),
        "jpeg": (None, np.zeros((height, width), np.uint8), "must be a PNG file, but its content is a JPEG"),
        "bad ids": (write_png, np.full((height, width), 77, np.uint8), "train id(s) [77]"),
    }
    for case, (writer, array, expected) in cases.items():
        if writer is None:
            victim.write_bytes(cv2.imencode(".jpg", array)[1].tobytes())
        else:
            writer(victim, array)
        assert run(project, overrides) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(victim) in err[0] and expected in err[0], (case, err)


def _every_pixel_uncertain(monkeypatch):
    """The two heads disagree everywhere: the budgets, not the masks, decide what is asked."""
    from segshift.components.methods.labor import step as labor_step     # where the rounds call it
    monkeypatch.setattr(labor_step, "inconsistency_mask", lambda a, b: torch.ones(a.argmax(1).shape, dtype=torch.bool))


@pytest.mark.integration
def test_labor_spl_books_show_the_papers_share_of_pixels_in_all_stages(project, monkeypatch):
    monkeypatch.chdir(project)
    _every_pixel_uncertain(monkeypatch)
    # the defaults are the paper's: 2.2 % of the pixels over 3 stages, model A adapted first
    assert run(project, {"inter.method": "labor", "inter.iterations": 3, "methods.labor.selector_iterations": 1,
                         "methods.labor.adapt_iterations": 1}) == 0
    metrics = json.loads((project / "metrics" / "inter.json").read_text())
    labels = metrics["labels"]
    truth = target_truth(project)
    total = sum(t.size for t in truth.values())
    allowance = sum(int(0.022 * t.size + 1e-9) for t in truth.values())
    assert labels["budget"] == 0.022 and [s["stage"] for s in labels["stages"]] == ["stage-1", "stage-2", "stage-3"]
    # every stage asks, and together they reach the allowance exactly: 2.2 % up to per-image rounding
    assert all(s["pixels"] > 0 for s in labels["stages"])
    assert sum(s["pixels"] for s in labels["stages"]) == allowance
    assert labels["share"] == pytest.approx(allowance / total)
    assert 0.022 - len(truth) / total < labels["share"] <= 0.022
    # model A was adapted before stage 1 and is not a candidate for the stage's model
    stage_dir = project / "checkpoints" / "inter"
    assert (stage_dir / "adapt" / "best.pt").is_file() and labels["adapt_iterations"] == 1
    assert "adapt" not in metrics["round_val"]["val_miou"]
    assert json.loads((stage_dir / "stage-1-selector" / "round.json").read_text())["round"]["init"] == "adapt/best.pt"


@pytest.mark.integration
def test_labor_ppl_books_show_40_points_per_image_in_all_stages(project, monkeypatch):
    monkeypatch.chdir(project)
    _every_pixel_uncertain(monkeypatch)
    assert run(project, {"inter.method": "labor", "inter.iterations": 3, "methods.labor.selector_iterations": 1,
                         "methods.labor.adapt_iterations": 1, "methods.labor.selection": "ppl"}) == 0
    labels = json.loads((project / "metrics" / "inter.json").read_text())["labels"]
    images = len(target_truth(project))
    assert labels["allowance"]["points_per_image"] == 40 and labels["allowance"]["points_per_stage"] == [14, 13, 13]
    assert [s["pixels"] for s in labels["stages"]] == [14 * images, 13 * images, 13 * images]
    assert labels["most_pixels_per_image"] == 40
    revealed = [read_label(p) for p in (project / "checkpoints" / "inter" / "stage-3" / "labels").glob("*.png")]
    assert len(revealed) == images and all(int((r != IGNORE_INDEX).sum()) <= 40 for r in revealed)
