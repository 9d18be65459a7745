"""s3:// locations against a moto server on loopback: prepared data and checkpoints mirrored
through a local cache, Tune storage and MLflow artifacts on S3, and no credential anywhere."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from segshift.components.config import load_params
from segshift.components.data.storage import StorageError
from segshift.pipelines.cli import main
from segshift.pipelines.remote import INDEX_NAME, mirror_path, pull, push
from tests.conftest import write_params
from tests.fixtures.s3 import REGION, moto_endpoint, s3  # noqa: F401  (fixtures)
from tests.pipelines.sweep_helpers import mlflow_server, swept_project
from tests.pipelines.test_train import FAST

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def keys(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def s3_project(root: Path, s3, bucket: str, cache: str, extra: dict | None = None) -> Path:
    return write_params(root, {**FAST, "prepare.out_dir": f"s3://{bucket}/prepared",
                               "paths.checkpoints": f"s3://{bucket}/checkpoints",
                               "storage.s3_endpoint_url": s3.url, "storage.cache_dir": cache,
                               **(extra or {})})


def test_prepared_data_and_checkpoints_on_s3_resume_on_a_machine_with_an_empty_cache(s3, tmp_path, monkeypatch):
    bucket = s3.new_bucket()
    monkeypatch.chdir(tmp_path)
    params = s3_project(tmp_path, s3, bucket, "cache-a")
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    uploaded = keys(s3, bucket, "prepared/")
    mirror = tmp_path / "cache-a" / "s3" / bucket / "prepared"
    local = {p.relative_to(mirror).as_posix(): p.read_bytes() for p in mirror.rglob("*")
             if p.is_file() and p.name != INDEX_NAME}
    assert {f"prepared/{rel}": data for rel, data in local.items()} == uploaded
    assert "prepared/target/manifest.parquet" in uploaded and len(uploaded) > 20

    assert main(["train", "--stage", "source", "--params", str(params), "--quiet"]) == 0
    saved = keys(s3, bucket, "checkpoints/source/")
    assert set(saved) == {"checkpoints/source/last.pt", "checkpoints/source/best.pt"}
    last = torch.load(io.BytesIO(saved["checkpoints/source/last.pt"]), weights_only=False)
    assert last["step"] == 4

    first = json.loads((tmp_path / "metrics" / "source.json").read_text())

    # Another machine: nothing cached; it pulls the data and resumes from the checkpoint on S3
    # (here at the end: the finished run is not trained again).
    params = s3_project(tmp_path, s3, bucket, "cache-b")
    assert main(["train", "--stage", "source", "--params", str(params), "--quiet"]) == 0
    again = json.loads((tmp_path / "metrics" / "source.json").read_text())
    assert again["resumed_from"] == 4 and again["test"]["miou"] == first["test"]["miou"]
    assert (tmp_path / "cache-b" / "s3" / bucket / "prepared" / "target" / "manifest.parquet").is_file()
    assert (tmp_path / "cache-b" / "s3" / bucket / "checkpoints" / "source" / "best.pt").is_file()


def test_pull_fetches_only_what_changed_and_push_only_what_differs(s3, tmp_path):
    bucket = s3.new_bucket()
    client = s3.client()
    for name, body in {"a.txt": b"one", "sub/b.txt": b"two"}.items():
        client.put_object(Bucket=bucket, Key=f"data/{name}", Body=body)
    params = load_params(write_params(tmp_path, {"storage.s3_endpoint_url": s3.url, "storage.cache_dir": "c"}))
    location = f"s3://{bucket}/data"
    local = pull(params, tmp_path, location)
    assert local == mirror_path(params, tmp_path, location) == tmp_path / "c" / "s3" / bucket / "data"
    assert (local / "a.txt").read_bytes() == b"one" and (local / "sub" / "b.txt").read_bytes() == b"two"

    (local / "a.txt").write_bytes(b"edited locally")       # an unchanged object is not fetched again
    client.put_object(Bucket=bucket, Key="data/sub/b.txt", Body=b"two, changed")
    pull(params, tmp_path, location)
    assert (local / "a.txt").read_bytes() == b"edited locally"
    assert (local / "sub" / "b.txt").read_bytes() == b"two, changed"

    (local / "new.txt").write_bytes(b"three")
    assert push(params, tmp_path, location) == 2              # a.txt and new.txt; b.txt is equal
    assert keys(s3, bucket, "data/") == {"data/a.txt": b"edited locally", "data/sub/b.txt": b"two, changed",
                                         "data/new.txt": b"three"}
    assert push(params, tmp_path, location) == 0


def test_an_empty_prefix_is_an_error_naming_it_unless_optional(s3, tmp_path):
    bucket = s3.new_bucket()
    params = load_params(write_params(tmp_path, {"storage.s3_endpoint_url": s3.url, "storage.cache_dir": "c"}))
    with pytest.raises(StorageError, match=rf"s3://{bucket}/nothing: no objects there"):
        pull(params, tmp_path, f"s3://{bucket}/nothing")
    assert pull(params, tmp_path, f"s3://{bucket}/nothing", required=False) == tmp_path / "c" / "s3" / bucket / "nothing"
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        pull(params, tmp_path, "s3://no-such-bucket/data")


def test_a_key_that_climbs_out_of_the_mirror_is_refused_before_anything_is_written(s3, tmp_path, monkeypatch, capsys):
    bucket = s3.new_bucket()
    client = s3.client()
    client.put_object(Bucket=bucket, Key="prepared/target/manifest.parquet", Body=b"fine")
    client.put_object(Bucket=bucket, Key="prepared/../../../../ESCAPED.txt", Body=b"owned")
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    params = s3_project(work, s3, bucket, "cache")
    assert main(["train", "--stage", "source", "--params", str(params), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "prepared/../../../../ESCAPED.txt" in err and "leaves its folder" in err
    assert not list(tmp_path.rglob("ESCAPED.txt"))
    assert not (work / "cache" / "s3" / bucket / "prepared" / "target" / "manifest.parquet").exists()


def test_an_s3_location_cannot_place_its_mirror_outside_the_cache(s3, tmp_path):
    params = load_params(write_params(tmp_path, {"storage.s3_endpoint_url": s3.url, "storage.cache_dir": "c"}))
    with pytest.raises(ValueError, match="leaves its folder"):
        mirror_path(params, tmp_path, "s3://bucket/../../../home")


def test_train_on_a_missing_s3_dataset_fails_with_the_location(s3, tmp_path, monkeypatch, capsys):
    bucket = s3.new_bucket()
    monkeypatch.chdir(tmp_path)
    params = s3_project(tmp_path, s3, bucket, "cache")
    assert main(["train", "--stage", "source", "--params", str(params), "--quiet"]) == 2
    assert f"s3://{bucket}/prepared: no objects there" in capsys.readouterr().err


ACCESS_KEY = "AKIASEGSHIFTLEAKTEST"
SECRET_KEY = "segshift+leak/test+9f8e7d6c5b4a39281706"


@pytest.mark.slow
def test_sweep_with_tune_state_and_mlflow_artifacts_on_s3_leaks_no_credential(moto_endpoint, tmp_path):
    """Data, Tune state and MLflow artifacts on S3; the keys never reach MLflow or the logs."""
    s3 = moto_endpoint
    bucket = s3.new_bucket()
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_DEFAULT_REGION": REGION, "MLFLOW_S3_ENDPOINT_URL": s3.url}
    with mlflow_server(tmp_path / "mlflow", artifacts=f"s3://{bucket}/mlflow", env=env) as uri:
        params = swept_project(tmp_path, uri, {
            "storage.s3_endpoint_url": s3.url, "sweep.storage_path": f"s3://{bucket}/tune",
            "sweep.num_samples": 2, "sweep.iterations": 2, "sweep.val_every": 1,
            "sweep.scheduler.grace_period": 1})
        done = subprocess.run([sys.executable, "-m", "segshift.pipelines.cli", "sweep", "--params", str(params),
                               "--quiet"], cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("segshift").experiment_id])
        artifacts = [download(client, r.info.run_id, tmp_path / "downloaded" / r.info.run_id) for r in runs]

    assert len(runs) == 3                                   # the sweep and its 2 trials
    assert any(k.startswith("tune/") for k in keys(s3, bucket, "tune/"))
    stored = keys(s3, bucket, "mlflow/")
    assert any(k.endswith("parallel_coordinates.png") for k in stored)
    assert sum(len(a) for a in artifacts) >= 3
    texts = [done.stdout, done.stderr, (tmp_path / "mlflow" / "server.log").read_text()]
    for run in runs:
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(run.data.metrics)]
    blobs = [b for a in artifacts for b in a] + list(stored.values())
    blobs += [p.read_bytes() for p in (tmp_path / "sweeps").rglob("*") if p.is_file()]
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert not [t for t in texts if secret in t]
        assert not [b for b in blobs if secret.encode() in b]


def download(client: MlflowClient, run_id: str, into: Path) -> list[bytes]:
    """Every artifact file of a run, fetched through the server."""
    local = Path(client.download_artifacts(run_id, "", str(into.mkdir(parents=True) or into)))
    return [p.read_bytes() for p in local.rglob("*") if p.is_file()]
