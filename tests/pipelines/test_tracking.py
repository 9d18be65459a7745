"""MLflow tracking: parent/child runs across processes, params, metrics, artifacts, end states,
masking, DVC/git provenance, and concurrent logging through a real `mlflow server`.

Creating an MLflow sqlite database costs seconds (schema migrations), so the tests share one
database per module and keep apart by experiment name.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from segshift.components.config import Params, TrackingConfig, load_params
from segshift.pipelines.tracking import (
    CONFIG_ARTIFACT,
    PARENT_RUN_ENV,
    StageTracker,
    dvc_stage_hash,
    flatten_params,
    git_dirty,
    pipeline_key,
    resolve_tracking_uri,
)
from tests.conftest import REPO

_CLEAN_ENV = ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV, "DVC_STAGE", "DVC_ROOT")

# A stage process: opens a stage run, prints its id, then sleeps (to be killed) or logs metrics.
WORKER = textwrap.dedent("""
    import sys, time
    from segshift.components.config import load_params
    from segshift.pipelines.tracking import StageTracker

    params_file, experiment, stage, project_dir, mode = sys.argv[1:6]
    params = load_params(params_file, overrides={"tracking.experiment": experiment})
    with StageTracker(params, stage, project_dir) as tracker:
        print(tracker.run_id, flush=True)
        if mode == "sleep":
            time.sleep(120)
        else:
            for step in range(int(mode)):
                tracker.log_metrics({"loss": 1.0 / (step + 1), "miou": step / 100}, step=step)
""")


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    # The developer's own MLflow settings, or DVC's when run under `dvc repro`, must not leak in.
    for name in _CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # also for the worker processes


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A project directory whose default tracking store (mlflow.db) all tests share."""
    return tmp_path_factory.mktemp("project")


@pytest.fixture
def experiment(request) -> str:
    return f"{request.node.name}-{uuid.uuid4().hex[:6]}"


def _params(experiment: str, **overrides) -> Params:
    return load_params(REPO / "params.yaml", overrides={"tracking.experiment": experiment,
                                                        **overrides})


def _client(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def _runs(client: MlflowClient, experiment: str) -> dict[str, object]:
    exp = client.get_experiment_by_name(experiment)
    return {run.info.run_name: run for run in client.search_runs([exp.experiment_id])}


def _worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
    return {**env, **extra}


def _start_worker(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(REPO / "params.yaml"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)


def _read_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        pytest.fail(f"worker printed nothing in {timeout}s: {proc.stderr.read()}")
    return proc.stdout.readline().strip()


# --------------------------------------------------------------------------- pure functions

def test_tracking_uri_resolution(tmp_path, monkeypatch):
    given = TrackingConfig(uri="http://127.0.0.1:5000", experiment="x")
    unset = TrackingConfig(uri=None, experiment="x")
    assert resolve_tracking_uri(given, tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(unset, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(unset, tmp_path) == "http://tracking:5000"
    relative = TrackingConfig(uri="sqlite:///runs/m.db", experiment="x")
    assert resolve_tracking_uri(relative, tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs/m.db"


def test_flatten_params_formats_truncates_and_masks():
    flat = flatten_params({
        "model": {"rates": [1, 2], "pretrained": None, "frozen_bn": False, "width": 0.25},
        "storage": {"s3_endpoint_url": "http://minio:pw@localhost:9000", "aws_secret_key": "x"},
        "auth": {"user": "u"}, "api_token": None, "empty": {}, "long": "a" * 7000,
    })
    assert flat["model.rates"] == "[1, 2]" and flat["model.pretrained"] == "null"
    assert flat["model.frozen_bn"] == "false" and flat["model.width"] == "0.25"
    assert flat["storage.s3_endpoint_url"] == "http://***@localhost:9000"
    assert flat["storage.aws_secret_key"] == "***" and flat["auth.user"] == "***"
    assert flat["api_token"] == "null"  # nothing to hide
    assert flat["empty"] == "{}"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")


def test_pipeline_key_follows_commit_and_params():
    tree = {"a": {"b": 1}}
    assert pipeline_key("c1", tree) == pipeline_key("c1", {"a": {"b": 1}})
    assert pipeline_key("c1", tree) != pipeline_key("c2", tree)
    assert pipeline_key("c1", tree) != pipeline_key("c1", {"a": {"b": 2}})


# --------------------------------------------------------------------------- runs in a sqlite store

def test_stages_of_one_configuration_share_a_parent(store, experiment):
    params = _params(experiment)
    for stage in ("source", "inter"):
        with StageTracker(params, stage, store) as tracker:
            tracker.log_params({f"extra.p{i}": i for i in range(150)})  # > one 100-param batch
    with StageTracker(_params(experiment, **{"prepare.builtin.seed": 1}), "source", store):
        pass

    client = _client(store)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags["segshift.role"] == "pipeline"]
    children = [r for r in runs if r.data.tags["segshift.role"] == "stage"]
    assert len(parents) == 2 and len(children) == 3
    first, changed = (r.info.run_id for r in parents)
    assert [c.data.tags["mlflow.parentRunId"] for c in children] == [first, first, changed]
    assert [c.info.run_name for c in children] == ["source", "inter", "source"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parents[0].info.run_name.startswith("pipeline nogit ")

    params_logged = children[0].data.params
    assert params_logged["prepare.builtin.seed"] == "0" and params_logged["model.rates"] == "[1, 2, 3, 4]"
    assert params_logged["prepare.builtin.counts.source_train"] == "2000"
    assert params_logged["extra.p149"] == "149" and len(params_logged) > 200
    assert children[2].data.params["prepare.builtin.seed"] == "1"
    assert parents[0].data.params["prepare.builtin.seed"] == "0"


def test_metrics_and_artifacts_land_beside_the_db_whatever_the_cwd(store, experiment, tmp_path,
                                                                   monkeypatch):
    elsewhere = tmp_path / "trial_dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as Ray Tune does
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG fake")
    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.json").write_text("{}")

    with StageTracker(_params(experiment), "evaluate", store) as tracker:
        for step in range(3):
            tracker.log_metrics({"miou": 0.1 * step, "iou/road": 0.5}, step=step)
        tracker.log_artifact(report, "reports")
        tracker.log_artifact(png)
        tracker.log_figure(png, "plots/entropy.png")
        tracker.log_dict({"easy": 2}, "splits/summary.json")
        tracker.log_text("hello", "notes/readme.txt")
        tracker.set_tags({"custom": 1})
        run_id = tracker.run_id

    client = _client(store)
    history = client.get_metric_history(run_id, "miou")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert client.get_run(run_id).data.tags["custom"] == "1"
    root = store / "mlartifacts" / run_id / "artifacts"
    for rel in ("reports/summary.json", "plot.png", "plots/entropy.png", "splits/summary.json",
                "notes/readme.txt", CONFIG_ARTIFACT):
        assert (root / rel).is_file(), rel
    config = yaml.safe_load((root / CONFIG_ARTIFACT).read_text())
    assert config["tracking"]["experiment"] == experiment
    assert list(elsewhere.iterdir()) == []  # no mlflow.db, mlruns or mlartifacts in the CWD
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the fluent URI is restored afterwards


def test_exception_ends_child_and_parent_failed(store, experiment):
    with pytest.raises(RuntimeError, match="boom"):
        with StageTracker(_params(experiment), "rank", store):
            raise RuntimeError("boom")
    runs = _runs(_client(store), experiment)
    assert runs["rank"].info.status == "FAILED"
    assert runs["rank"].data.tags["segshift.error"] == "RuntimeError: boom"
    [parent] = [r for name, r in runs.items() if name.startswith("pipeline")]
    assert parent.info.status == "FAILED"


def test_sigterm_ends_run_killed(store, experiment, tmp_path):
    proc = _start_worker(tmp_path, [experiment, "train", str(store), "sleep"], _worker_env())
    run_id = _read_line(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert "StageTerminated" in proc.stderr.read()
    client = _client(store)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "KILLED"


def test_disabled_tracker_creates_no_run(store, experiment, tmp_path):
    with StageTracker(_params(experiment), "source", store, enabled=False) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_params({"a": 1})
        tracker.log_artifact(tmp_path)
        tracker.log_figure(tmp_path / "none.png", "x.png")
        tracker.log_dict({}, "d.json")
        tracker.log_text("t", "t.txt")
        tracker.set_tags({"a": 1})
        assert tracker.run_id is None and tracker.child_env() == {}
    assert _client(store).get_experiment_by_name(experiment) is None


def test_credentials_are_never_logged(store, experiment, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekret-env")
    params = _params(experiment, **{"storage.s3_endpoint_url": "http://minio:sekret-url@host:9000"})
    with StageTracker(params, "prepare", store) as tracker:
        tracker.log_params({"storage": {"aws_secret_access_key": "sekret-param"},
                            "db_password": "sekret-pw"})
        run_id = tracker.run_id

    client = _client(store)
    run = client.get_run(run_id)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    config = (store / "mlartifacts" / run_id / "artifacts" / CONFIG_ARTIFACT).read_text()
    logged = [*run.data.params.values(), *run.data.tags.values(), *parent.data.params.values(),
              *parent.data.tags.values(), config]
    assert not [value for value in logged if "sekret" in value]
    assert run.data.params["storage.aws_secret_access_key"] == "***"
    assert run.data.params["db_password"] == "***"
    assert run.data.params["storage.s3_endpoint_url"] == "http://***@host:9000"


# --------------------------------------------------------------------------- git and DVC provenance

def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


def _dvc(repo, *args):
    # The CLI in a subprocess, as users run it: in-process DVC logs to streams pytest has closed.
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc), *args], cwd=repo, check=True, capture_output=True, text=True)


def test_git_and_dvc_stage_tags(store, experiment, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.txt").write_text("a")
    (repo / "params.yaml").write_text("foo: 1\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": f"{sys.executable} -c \"import shutil; shutil.copytree('src', 'out')\"",
        "deps": ["src"], "params": ["foo"], "outs": ["out"]}}}))
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")

    params = _params(experiment, **{"tracking.uri": f"sqlite:///{store / 'mlflow.db'}"})
    with StageTracker(params, "make", repo) as tracker:
        run_id = tracker.run_id
    tags = _client(store).get_run(run_id).data.tags
    assert tags["git.commit"] == _git(repo, "rev-parse", "HEAD") and tags["git.dirty"] == "false"
    assert tags["dvc.stage"] == "make"

    # The hash is DVC's own run-cache key for the stage: a repro files its run under it.
    _dvc(repo, "repro", "make")
    assert [p.name for p in (repo / ".dvc" / "cache" / "runs").glob("*/*")] == [tags["dvc.stage_hash"]]
    _git(repo, "add", "dvc.lock")
    _git(repo, "commit", "-qm", "lock")
    (repo / "dvc.lock").write_text((repo / "dvc.lock").read_text() + "# rewritten by dvc\n")
    assert git_dirty(repo) is False  # dvc.lock changes under every `dvc repro`: not code
    (repo / "src" / "a.txt").write_text("changed")
    assert dvc_stage_hash(repo, "make") not in (None, tags["dvc.stage_hash"])
    assert git_dirty(repo) is True
    assert dvc_stage_hash(repo, "no-such-stage") is None and dvc_stage_hash(tmp_path, "make") is None


# --------------------------------------------------------------------------- a real tracking server

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"mlflow server not healthy after {timeout}s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_server(store) -> Iterator[str]:
    """`mlflow server` in front of the project's database (as a team would run it); reusing the
    module's database spares the seconds its schema migrations take."""
    port = _free_port()
    log = store / "server.log"
    # Job execution starts extra consumer processes the tests do not need.
    env = _worker_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--default-artifact-root", str(store / "server-artifacts")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_concurrent_stages_through_a_server_lose_nothing(mlflow_server, experiment, tmp_path):
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    env = _worker_env(MLFLOW_TRACKING_URI=mlflow_server, **{PARENT_RUN_ENV: parent})
    steps, workers = 25, 3
    procs = []
    for i in range(workers):
        (tmp_path / f"w{i}").mkdir()
        procs.append(_start_worker(tmp_path / f"w{i}",
                                   [experiment, f"trial{i}", str(tmp_path), str(steps)], env))
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()

    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == [f"trial{i}" for i in range(workers)]
    for run in children:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "loss")) == steps
        assert len(client.get_metric_history(run.info.run_id, "miou")) == steps
        assert run.data.params["prepare.builtin.seed"] == "0"
        assert CONFIG_ARTIFACT in [f.path for f in client.list_artifacts(run.info.run_id, "config")]
    # A parent passed in belongs to whoever passed it: its status is theirs to set.
    assert client.get_run(parent).info.status == "RUNNING"
    assert len(client.search_runs([experiment_id])) == workers + 1
