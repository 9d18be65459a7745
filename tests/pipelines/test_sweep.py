"""`segshift sweep` end to end on tiny data: Tune + Optuna + ASHA, trials as Ray Train runs,
MLflow parent and nested trial runs on an `mlflow server`, best params, resume, bad input."""
import contextlib
import io
import json
import math
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from segshift.components.config import load_params
from segshift.components.ranking import file_sha256, read_ranking, ranking_metadata
from segshift.pipelines import sweep as sweep_module
from segshift.pipelines.cli import main
from segshift.pipelines.cluster import ClusterError, check_reachable
from segshift.pipelines.preset import apply_preset
from tests.pipelines.sweep_helpers import N, free_port, mlflow_server, swept_project

# Ray Tune trials against a real mlflow server, Ray clients: integration tests.
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep of 4 trials (ASHA, 2 at a time) against an mlflow server, through the CLI."""
    import ray
    root = tmp_path_factory.mktemp("sweep")
    with mlflow_server(root / "mlflow") as uri:
        params = swept_project(root, uri)
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
            patch.chdir(root)
            assert main(["sweep", "--params", str(params), "--quiet"]) == 0
        (root / "stdout.txt").write_text(out.getvalue())
        yield root, uri
    if ray.is_initialized():
        ray.shutdown()


def test_sweep_writes_best_params_summary_and_pictures(swept):
    root, _ = swept
    out = root / "sweeps" / "intra"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 4 and len(summary["rows"]) == 4
    assert summary["finished"] + summary["stopped"] == 4 and summary["errors"] == 0
    assert summary["steps_budget"] == 16 and 0 < summary["steps_run"] <= 16
    scores = [r["val_miou"] for r in summary["rows"]]
    assert all(0 <= s <= 1 for s in scores) and scores == sorted(scores, reverse=True)
    best = summary["best"]
    assert best["val_miou"] == max(scores) and best["trial_id"] == summary["rows"][0]["trial_id"]
    assert set(best["config"]) == {"rank.lambda", "rank.class_balanced_share", "intra.optimizer.lr"}
    # the best trial's test mIoU is the mean IoU over the classes present (a random inter model
    # learns nothing worth a floor in 4 steps: the number to check is its consistency)
    present = [v for v in best["test"]["per_class_iou"].values() if v is not None and v == v]
    assert len(best["test"]["per_class_iou"]) == 19 and present
    assert best["test"]["miou"] == pytest.approx(sum(present) / len(present), abs=1e-9)
    assert 0.3 <= best["config"]["rank.lambda"] <= 0.8
    overlay = yaml.safe_load((out / "best_params.yaml").read_text())
    assert overlay == {"rank": {"lambda": best["config"]["rank.lambda"],
                                "class_balanced_share": best["config"]["rank.class_balanced_share"]},
                       "intra": {"optimizer": {"lr": best["config"]["intra.optimizer.lr"]}}}
    # the overlay is what `segshift preset FILE` applies to params.yaml
    target = root / "applied.yaml"
    apply_preset(str(out / "best_params.yaml"), root / "params.yaml", output=target)
    applied = load_params(target)
    assert applied.rank.lambda_ == best["config"]["rank.lambda"]
    assert applied.intra.optimizer.lr == best["config"]["intra.optimizer.lr"]
    table = (out / "summary.md").read_text()
    assert f"| {best['trial_id']} |" in table and "4 trials" in table
    for picture in ("lambda_vs_miou.png", "parallel_coordinates.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / picture).stat().st_size > 5000
    assert "sweep intra: 4 trials" in (root / "stdout.txt").read_text()


def test_every_trial_reuses_the_one_ranking_inference_and_splits_with_its_own_lambda(swept):
    root, _ = swept
    out = root / "sweeps" / "intra"
    records = sweep_module.read_records(out / "cache" / "records.parquet")
    assert len(records) == N and records[0]["confidence_histogram"].shape == (19, 256)
    inter_sha = file_sha256(root / "models" / "inter" / "model.pt")
    assert json.loads((out / "cache" / "cache.json").read_text())["model_sha256"] == inter_sha
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["rows"]:
        trial = out / "trials" / row["trial_id"]
        table = read_ranking(trial / "ranking")
        meta = ranking_metadata(table)
        assert meta["model_sha256"] == inter_sha and meta["lambda"] == row["config"]["rank.lambda"]
        assert meta["class_balanced_share"] == row["config"]["rank.class_balanced_share"]
        easy = table["split"].to_pylist().count("easy")
        assert easy == math.floor(row["config"]["rank.lambda"] * N + 1e-9)
        assert sorted(p.name for p in (trial / "ranking").iterdir()) == [".segshift-output", "pseudo_labels", "ranking.parquet"]
        # scores are the cached ones: the trial never ran the inter model again
        cached = {r["sample_id"]: r["score"] for r in records}
        assert all(cached[s] == v for s, v in zip(table["sample_id"].to_pylist(), table["score"].to_pylist()))
        assert (trial / "checkpoints" / "intra" / "best.pt").is_file()


def test_mlflow_has_the_sweep_parent_and_one_nested_run_per_trial(swept):
    root, uri = swept
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("segshift").experiment_id
    parents = client.search_runs([experiment], "tags.`segshift.role` = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["segshift.sweep"] == "intra"
    summary = json.loads((root / "sweeps" / "intra" / "summary.json").read_text())
    assert parent.data.metrics["best_val_miou"] == pytest.approx(summary["best"]["val_miou"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/best_params.yaml", "sweep/summary.md", "sweep/summary.json",
            "sweep/lambda_vs_miou.png", "sweep/parallel_coordinates.png"} <= artifacts
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    rows = {r["trial_id"]: r for r in summary["rows"]}
    assert sorted(c.data.tags["segshift.trial_id"] for c in children) == sorted(rows)
    for child in children:
        row = rows[child.data.tags["segshift.trial_id"]]
        assert child.data.tags["segshift.trial_state"] == row["state"]
        assert child.info.status == ("FINISHED" if row["state"] == "finished" else "KILLED")
        # every validation Tune saw is in MLflow (a stopped trial may log one more before it ends)
        history = [m.value for m in sorted(client.get_metric_history(child.info.run_id, "val_miou"),
                                           key=lambda m: m.step)]
        assert len(history) >= row["reports"] >= 1
        assert max(history[:row["reports"]]) == pytest.approx(row["val_miou"])
        assert json.loads(child.data.params["rank.lambda"]) == row["config"]["rank.lambda"]


def test_a_second_run_asks_for_resume_or_fresh_and_resume_reruns_no_finished_trial(swept, capsys, monkeypatch):
    root, _ = swept
    monkeypatch.chdir(root)
    out = root / "sweeps" / "intra"
    assert main(["sweep", "--params", "params.yaml", "--quiet"]) == 2
    assert "pass --resume to continue it or --fresh" in capsys.readouterr().err
    before = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/checkpoints/intra/*.pt")}
    summary = json.loads((out / "summary.json").read_text())
    assert main(["sweep", "--params", "params.yaml", "--quiet", "--resume"]) == 0
    after = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/checkpoints/intra/*.pt")}
    assert after == before                      # nothing trained again
    again = json.loads((out / "summary.json").read_text())
    assert again["best"]["trial_id"] == summary["best"]["trial_id"] and again["trials"] == 4


def refused_before_any_trial(root, name: str, edit, capsys, monkeypatch) -> str:
    """Run the swept project with `edit(params)` applied as a variant; it must exit 2 without
    starting the tuner. Returns stderr."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(sweep_module, "make_tuner", lambda *a, **k: pytest.fail("tuner started"))
    variant = root / "variants" / name
    variant.mkdir(parents=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    edit(params)
    (variant / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["sweep", "--params", str(variant / "params.yaml"), "--quiet"]) == 2
    return capsys.readouterr().err


def test_lambda_bounds_that_empty_a_split_fail_before_ray_starts(swept, capsys, monkeypatch):
    err = refused_before_any_trial(swept[0], "lam", lambda p: p["sweep"]["space"].update(
        {"rank.lambda": {"type": "uniform", "low": 0.01, "high": 0.5}}), capsys, monkeypatch)
    assert "sweep.space['rank.lambda']: rank.lambda = 0.01 with N = 10" in err and "0 easy" in err


def test_a_trial_larger_than_the_local_ray_instance_is_refused_before_any_trial(swept, capsys, monkeypatch):
    err = refused_before_any_trial(swept[0], "big", lambda p: p["sweep"].update(
        {"cpus_per_worker": 1.5, "workers_per_trial": 2}), capsys, monkeypatch)
    assert ("a trial needs sweep.workers_per_trial x cpus_per_worker = 3 CPUs but the local Ray "
            "instance has 2") in err


def test_an_unreachable_cluster_fails_within_seconds_naming_the_address(tmp_path, capsys):
    port = free_port()                 # nothing listens there
    start = time.monotonic()
    with pytest.raises(ClusterError, match=f"127.0.0.1:{port} \\(from ray.address in params\\)"):
        check_reachable(f"127.0.0.1:{port}", "ray.address in params")
    assert time.monotonic() - start < 6
    with pytest.raises(ClusterError, match="not host:port"):
        check_reachable("head-node:port", "$RAY_ADDRESS")


def test_the_cli_reports_an_unreachable_ray_address_as_a_user_error(swept, capsys, monkeypatch):
    import ray
    root, uri = swept
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.chdir(root)
    port = free_port()
    variant = root / "variants" / "addr"
    variant.mkdir(parents=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ray"]["address"] = f"127.0.0.1:{port}"
    (variant / "params.yaml").write_text(yaml.safe_dump(params))
    start = time.monotonic()
    assert main(["sweep", "--params", str(variant / "params.yaml"), "--quiet", "--fresh"]) == 2
    assert time.monotonic() - start < 30
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port} (from ray.address in params)" in capsys.readouterr().err
