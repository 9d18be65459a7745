"""`segshift rank`: the Ray Data ranking job end to end on tiny built-in data with a random model."""
import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from segshift.components.config import load_params
from segshift.components.data.dataset import read_rgb, to_tensor
from segshift.components.data.labels import NUM_CLASSES
from segshift.components.engine.checkpoint import save_checkpoint
from segshift.components.models.factory import build_model
from segshift.components.ranking import (RANKING_SCHEMA, RankingError, build_ranking_table,
                                         check_ranking_matches, file_sha256, predict_probs,
                                         pseudo_label, read_ranking)
from segshift.pipelines import rank as rank_module
from segshift.pipelines.cli import main
from segshift.pipelines.stage_model import load_stage_model
from tests.conftest import write_params

# Ray Data's own DataContext sets deprecated fields of itself when it is created (Ray 2.60).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

N = 10              # target train images
LAMBDA = 0.67       # -> 6 easy, 4 hard
THRESHOLD = 0.5


COUNTS = {"source_train": 4, "source_val": 2, "target_train": N, "target_val": 2, "target_test": 2}


def params_file(root: Path, extra: dict | None = None, variant: str | None = None) -> Path:
    """`root/params.yaml`, or a variant `root/variants/<variant>/params.yaml` of the same project."""
    directory = root if variant is None else root / "variants" / variant
    directory.mkdir(parents=True, exist_ok=True)
    return write_params(directory, {
        "prepare.out_dir": str(root / "prepared"), "prepare.builtin.counts": COUNTS,
        "model.width": 0.125, "ray.local_num_cpus": 2, "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
        "rank.lambda": LAMBDA, "rank.batch_size": 3, "rank.confidence_threshold": THRESHOLD,
        "rank.class_balanced_share": None, **(extra or {})})


@pytest.fixture(scope="module")
def ray_local():
    import ray
    yield
    if ray.is_initialized():
        ray.shutdown()


def save_random_inter_model(root: Path, params) -> Path:
    """Random weights with a sharpened classifier, so that images get distinct, confident scores."""
    torch.manual_seed(0)
    model = build_model(params.model)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.startswith("layer6"):
                tensor.mul_(200.0)
    path = root / "models" / "inter" / "model.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_config": params.model.model_dump(mode="json"),
                           "num_classes": NUM_CLASSES, "stage": "inter", "step": 0,
                           "selection": "val_miou", "val": {}})
    return path


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, ray_local) -> Path:
    """A prepared tiny project, ranked once through the CLI (one actor)."""
    root = tmp_path_factory.mktemp("rank")
    params = params_file(root)
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    save_random_inter_model(root, load_params(params))
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as stdout:
        patch.chdir(root)
        assert main(["rank", "--params", str(params), "--quiet"]) == 0
    (root / "stdout.txt").write_text(stdout.getvalue())
    return root


@pytest.mark.integration
def test_rank_writes_the_ranking_pseudo_labels_metrics_reports_and_mlflow_run(ranked):
    summary = (ranked / "stdout.txt").read_text()
    assert summary.startswith(f"rank: {N} target train images -> 6 easy / 4 hard (lambda 0.67)")
    assert "wrote data/ranking/ranking.parquet, metrics/rank.json" in summary
    out = ranked / "data" / "ranking"
    table = pq.read_table(out / "ranking.parquet")
    assert table.schema.remove_metadata().equals(RANKING_SCHEMA)
    assert table.num_rows == N
    assert sorted(table["rank"].to_pylist()) == list(range(N))
    easy = int(np.floor(LAMBDA * N))
    by_rank = sorted(table.to_pylist(), key=lambda r: r["rank"])
    assert [r["split"] for r in by_rank] == ["easy"] * easy + ["hard"] * (N - easy)
    scores = [r["score_normalised"] for r in by_rank]
    assert scores == sorted(scores) and scores[0] < scores[-1]
    assert all(r["score"] == r["score_normalised"] for r in by_rank)       # no normalisation
    assert all(0.0 <= r["score"] <= 1.0 and 0.0 < r["mean_confidence"] <= 1.0 for r in by_rank)
    assert all(sum(r["class_histogram"]) == pytest.approx(1.0, abs=1e-5) for r in by_rank)
    meta = table.schema.metadata
    assert json.loads(meta[b"segshift.manifest_sha256"]) == file_sha256(ranked / "prepared" / "target" / "manifest.parquet")
    assert json.loads(meta[b"segshift.model_sha256"]) == file_sha256(ranked / "models" / "inter" / "model.pt")
    assert json.loads(meta[b"segshift.lambda"]) == LAMBDA
    assert json.loads(meta[b"segshift.confidence_threshold"]) == THRESHOLD

    # pseudo-labels exist exactly for the easy rows, at image size, with train ids or 255
    files = {p.relative_to(out).as_posix() for p in (out / "pseudo_labels").iterdir()}
    assert files == {r["pseudo_label"] for r in by_rank if r["split"] == "easy"}
    assert all(r["pseudo_label"] is None for r in by_rank if r["split"] == "hard")
    labels = [cv2.imread(str(out / f), cv2.IMREAD_UNCHANGED) for f in sorted(files)]
    assert all(label.shape == (64, 128) and label.dtype == np.uint8 for label in labels)
    values = set(np.unique(np.stack(labels)).tolist())
    assert values <= set(range(NUM_CLASSES)) | {255}
    assert 255 in values                                    # the confidence threshold acts
    # an actor's pseudo-label is the driver's prediction of the same image
    params = load_params(ranked / "params.yaml")
    model = load_stage_model(ranked / "models" / "inter" / "model.pt", params).eval()
    first = by_rank[0]["sample_id"]
    image = to_tensor(read_rgb(ranked / "prepared" / "target" / "images" / "train" / f"{first}.png"))
    expected = pseudo_label(predict_probs(model, image[None]), THRESHOLD)[0]
    actual = cv2.imread(str(out / by_rank[0]["pseudo_label"]), cv2.IMREAD_UNCHANGED)
    assert (actual != expected).mean() < 1e-3               # equal up to float noise at ties
    check_ranking_matches(out, ranked / "prepared" / "target")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no staging left over

    metrics = json.loads((ranked / "metrics" / "rank.json").read_text())
    assert (metrics["n"], metrics["easy"], metrics["hard"], metrics["lambda"]) == (N, easy, N - easy, LAMBDA)
    assert metrics["mean_score_easy"] < metrics["mean_score_hard"]
    conditions = metrics["conditions"]
    assert sum(conditions["count"].values()) == N
    assert conditions["auroc_hard_conditions"] is None or 0.0 <= conditions["auroc_hard_conditions"] <= 1.0
    assert 0.0 <= conditions["hard_condition_share_hard_split"] <= 1.0
    for picture in ("score_histogram.png", "easy_hard_examples.png"):
        assert (ranked / "reports" / "rank" / picture).stat().st_size > 1000

    client = MlflowClient(f"sqlite:///{ranked / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segshift")
    run = next(r for r in client.search_runs([experiment.experiment_id])
               if r.data.tags.get("segshift.stage") == "rank")
    assert run.info.status == "FINISHED" and run.data.metrics["easy"] == easy
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "ranking")}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"ranking/ranking.parquet", "report/rank.json", "report/score_histogram.png",
            "report/easy_hard_examples.png"} <= artifacts


@pytest.mark.integration
def test_two_actors_give_the_same_ranking_as_one(ranked, tmp_path):
    params = load_params(ranked / "params.yaml", {"rank.concurrency": 2, "rank.batch_size": 2})
    inputs = rank_module.check_inputs(params, ranked)
    records = rank_module.run_inference(params, inputs, tmp_path, progress=False)
    table = build_ranking_table(records, LAMBDA, False, THRESHOLD, "m", "x")
    single = read_ranking(ranked / "data" / "ranking")
    assert table["sample_id"].to_pylist() == single["sample_id"].to_pylist()
    assert table["split"].to_pylist() == single["split"].to_pylist()
    assert table["score"].to_pylist() == pytest.approx(single["score"].to_pylist(), rel=1e-5)
    for r in records:      # the rare-class normaliser travels with each image (IntraDA's formula)
        assert r["normaliser"] == pytest.approx((11 - r["rare_present"]) / 11 + 0.5)
        assert sum(r["class_histogram"]) == pytest.approx(1.0, abs=1e-5)
    normalised = build_ranking_table(records, LAMBDA, True, THRESHOLD, "m", "x").to_pylist()
    assert all(r["score_normalised"] == pytest.approx(r["score"] * next(
        q["normaliser"] for q in records if q["sample_id"] == r["sample_id"])) for r in normalised)
    rank_module.publish_ranking(records, params, "m", "x", raw_dir=tmp_path, out_dir=tmp_path)
    for relative in single["pseudo_label"].drop_null().to_pylist():
        one = cv2.imread(str(ranked / "data" / "ranking" / relative), cv2.IMREAD_UNCHANGED)
        two = cv2.imread(str(tmp_path / relative), cv2.IMREAD_UNCHANGED)
        assert (one != two).mean() < 1e-3


@pytest.mark.integration
def test_a_lambda_leaving_a_split_empty_exits_2_with_the_counts_before_inference(ranked, capsys, monkeypatch):
    monkeypatch.chdir(ranked)
    before = (ranked / "data" / "ranking" / "ranking.parquet").stat().st_mtime_ns
    monkeypatch.setattr(rank_module, "run_inference", lambda *a, **k: pytest.fail("inference ran"))
    params = params_file(ranked, {"rank.lambda": 0.05}, variant="lambda")
    assert main(["rank", "--params", str(params), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "segshift rank: error: rank.lambda = 0.05 with N = 10" in err and "0 easy and 10 hard" in err
    assert (ranked / "data" / "ranking" / "ranking.parquet").stat().st_mtime_ns == before


@pytest.mark.integration
def test_an_actor_pool_larger_than_the_local_ray_instance_is_refused(ranked, capsys, monkeypatch):
    monkeypatch.chdir(ranked)
    params = params_file(ranked, {"rank.concurrency": 3}, variant="pool")
    assert main(["rank", "--params", str(params), "--quiet"]) == 2
    assert ("rank.concurrency = 3 actors x 1.0 CPU need 3 CPUs but the local Ray instance has 2"
            in capsys.readouterr().err)


def test_missing_inputs_name_the_file_and_the_stage_to_run(tmp_path, capsys):
    params = params_file(tmp_path)
    assert main(["rank", "--params", str(params), "--quiet"]) == 2
    assert "run `segshift prepare`" in capsys.readouterr().err
    (tmp_path / "prepared" / "target").mkdir(parents=True)
    from segshift.components.data.manifest import SampleRecord, write_manifest
    write_manifest([SampleRecord("t", "builtin", "target", "train", "images/train/t.png", None, 8, 8)],
                   tmp_path / "prepared" / "target")
    params = params_file(tmp_path, {"paths.models": str(tmp_path / "nowhere")})
    assert main(["rank", "--params", str(params), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "inter" / "model.pt") in err
    assert "run `segshift train --stage inter` (dvc repro inter) first" in err


@pytest.mark.integration
def test_a_failed_run_keeps_the_previous_ranking_and_leaves_no_staging(ranked, monkeypatch):
    monkeypatch.chdir(ranked)
    before = (ranked / "data" / "ranking" / "ranking.parquet").read_bytes()

    def broken(params, inputs, staging, progress):
        (staging / "pseudo_labels").mkdir()
        (staging / "pseudo_labels" / "half.png").write_bytes(b"x")
        raise RankingError("simulated failure half way")

    monkeypatch.setattr(rank_module, "run_inference", broken)
    assert main(["rank", "--params", str(ranked / "params.yaml"), "--quiet"]) == 2
    assert (ranked / "data" / "ranking" / "ranking.parquet").read_bytes() == before
    assert not [p for p in (ranked / "data").iterdir() if p.name.startswith(".")]


@pytest.mark.integration
def test_a_re_prepared_target_makes_the_ranking_mismatch(ranked, tmp_path):
    params = write_params(tmp_path, {"prepare.builtin.counts": {**COUNTS, "target_train": N - 2}})
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    with pytest.raises(RankingError) as error:
        check_ranking_matches(ranked / "data" / "ranking", tmp_path / "prepared" / "target")
    message = str(error.value)
    assert "different prepared target" in message
    assert "2 ranked image(s) are not in target train" in message and "re-run `segshift rank`" in message


@pytest.mark.integration
def test_class_balanced_selection_keeps_the_most_confident_share_of_each_class(ranked, monkeypatch):
    monkeypatch.chdir(ranked)
    share = 0.5
    params = load_params(params_file(ranked, {"rank.confidence_threshold": None,
                                              "rank.class_balanced_share": share,
                                              "rank.out_dir": "data/ranking_cb",
                                              "paths.metrics": "metrics_cb", "paths.reports": "reports_cb"},
                                     variant="cb"))
    metrics = rank_module.rank_stage(params, ranked, progress=False)
    out = ranked / "data" / "ranking_cb"
    assert sorted(p.name for p in out.iterdir()) == [".segshift-output", "pseudo_labels", "ranking.parquet"]  # no confidence/
    table = read_ranking(out)
    assert json.loads(table.schema.metadata[b"segshift.class_balanced_share"]) == share
    model = load_stage_model(ranked / "models" / "inter" / "model.pt", params).eval()
    raw, kept = [], []
    for row in table.to_pylist():
        if row["split"] != "easy":
            continue
        image = to_tensor(read_rgb(ranked / "prepared" / "target" / "images" / "train" / f"{row['sample_id']}.png"))
        raw.append(pseudo_label(predict_probs(model, image[None]), None)[0])
        kept.append(cv2.imread(str(out / row["pseudo_label"]), cv2.IMREAD_UNCHANGED))
    raw, kept = np.stack(raw), np.stack(kept)
    assert ((kept == raw) | (kept == 255)).all()
    for c in np.unique(raw):
        # per class over the whole easy split (not per image): at least the share, ties included
        assert (kept == c).sum() >= share * (raw == c).sum() - 1, c
    assert 0.3 < (kept == 255).mean() < 0.7
    assert set(metrics["class_thresholds"]) >= {"road", "sky"}
    assert metrics["pseudo_label_ignored_share"] == pytest.approx((kept == 255).mean(), abs=1e-6)


@pytest.mark.parametrize("overrides, available, images, expected", [
    ({"rank.concurrency": 3}, {"CPU": 2.0}, 1000, 3),                 # explicit: as asked
    ({}, {"CPU": 2.0}, 1000, 2),                                      # auto: one actor per CPU
    ({"rank.cpus_per_actor": 2}, {"CPU": 7.0}, 1000, 3),
    ({}, {"CPU": 16.0}, 40, 2),                                       # no more than batches (32 each)
    ({"rank.gpus_per_actor": 1}, {"CPU": 16.0, "GPU": 1.0}, 1000, 1),  # one per GPU
    ({"rank.gpus_per_actor": 0.5}, {"CPU": 16.0, "GPU": 2.0}, 1000, 4),
])
def test_actor_pool_size_auto_fills_the_ray_instance(tmp_path, overrides, available, images, expected):
    cfg = load_params(write_params(tmp_path, overrides)).rank
    assert rank_module.actor_pool_size(cfg, available, images) == expected
