"""MLflow tracking: parent/child runs across processes, params, metrics, artifacts, end states,
masking, DVC/git provenance, and concurrent logging through a real `mlflow server`.

Creating an MLflow sqlite database costs seconds (schema migrations), so the tests share one
database per module and keep apart by experiment name.
"""
from __future__ import annotations

import logging
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
    log_flat_params,
    mask_secrets,
    mask_text,
    pipeline_key,
    resolve_tracking_uri,
    set_run_tags,
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


@pytest.mark.integration
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


# --------------------------------------------------------------------------- secrets inside values
# An attacker reading the tracking server (or a shared log) must find no credential, even one
# pasted into a value whose key looks innocent. AWS's documented example keys stand in for real
# ones; each fragment below is something the old, key-name/URL-until-"/" masking let through.

AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ENDPOINT_WITH_KEYS = f"http://{AWS_KEY_ID}:{AWS_SECRET}@127.0.0.1:9000"
URL_WITH_AT_PASSWORD = "https://user:pw1@Xq9zTail@host.example/x"
SESSION_TOKEN = "FwoGZXIvYXdzEJrEXAMPLESESSIONTOKEN"
SIGNATURE = "5d1a0c2e9b8f7a6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e"
PRESIGNED = ("https://bucket.s3.amazonaws.com/data/city.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             f"&X-Amz-Credential={AWS_KEY_ID}%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
             "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
             f"&X-Amz-Security-Token={SESSION_TOKEN}&X-Amz-Signature={SIGNATURE}")
PRESIGNED_MASKED = ("https://bucket.s3.amazonaws.com/data/city.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                    "&X-Amz-Credential=***&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600"
                    "&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***&X-Amz-Signature=***")
ENV_SECRET = "env-Secret-4e1d-9c07"  # matches no pattern: only the environment gives it away
LEAKS = (AWS_KEY_ID, "wJalrXUtnFEMI", "K7MDENG", "bPxRfiCYEXAMPLEKEY", "pw1@", "Xq9zTail",
         SESSION_TOKEN, SIGNATURE, ENV_SECRET)
GIT_SHA = "3f786850e387550fdab836ed7e6dc881de23001b"


def _leaks(texts: dict[str, str]) -> dict[str, list[str]]:
    """{where: [secret fragments found there]} for every text that holds one."""
    found = {where: [leak for leak in LEAKS if leak in text] for where, text in texts.items()}
    return {where: leaks for where, leaks in found.items() if leaks}


@pytest.mark.parametrize("text, masked", [
    # An AWS key pair as S3 endpoint user-info: the secret holds "/", where the old regex stopped.
    (ENDPOINT_WITH_KEYS, "http://***@127.0.0.1:9000"),
    # A password holding "@": user-info runs to the LAST "@" before the host.
    (URL_WITH_AT_PASSWORD, "https://***@host.example/x"),
    # Presigned URLs: signatures and credentials go, the rest (which object, until when) stays.
    (PRESIGNED, PRESIGNED_MASKED),
    ("https://cdn.example/a.png?Expires=1700000000&Signature=abcXYZ~-_&Key-Pair-Id=K2JCJMDEH",
     "https://cdn.example/a.png?Expires=1700000000&Signature=***&Key-Pair-Id=***"),
    ("https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&sig=abc%2Bdef%3D",
     "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&sig=***"),
    ("https://api.example/v1/data?token=tok_abcdef&page=2",
     "https://api.example/v1/data?token=***&page=2"),
    ("https://app.example/cb#access_token=ya29.a0AfH6SMB&state=xyz",
     "https://app.example/cb#access_token=***&state=xyz"),
    # Bare AWS keys, e.g. quoted by an error message or a pasted credentials file.
    (f"aws_secret_access_key={AWS_SECRET} in ~/.aws/credentials",
     "aws_secret_access_key=*** in ~/.aws/credentials"),
    (f"InvalidAccessKeyId: The AWS Access Key Id {AWS_KEY_ID} does not exist",
     "InvalidAccessKeyId: The AWS Access Key Id *** does not exist"),
    ("temporary key ASIAY34FZKBOKMUTVV7A expired", "temporary key *** expired"),
])
def test_mask_text_masks_credentials_in_values(text, masked):
    assert mask_text(text) == masked


def test_mask_text_masks_credential_environment_values(monkeypatch):
    session = "IQoJb3JpZ2luX2VjEXAMPLE/session+token=="
    # Read when masking, not at import: a credential exported after start-up counts as well.
    assert mask_text(f"cache at /tmp/{ENV_SECRET}") == f"cache at /tmp/{ENV_SECRET}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", session)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "tracking-pass-123")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tracking-token-456")
    assert mask_text(f"cache at /tmp/{ENV_SECRET}") == "cache at /tmp/***"
    assert mask_text(f"{session} | tracking-pass-123 | tracking-token-456") == "*** | *** | ***"
    # URL-encoded, as it appears inside a query string.
    assert mask_text("?t=IQoJb3JpZ2luX2VjEXAMPLE%2Fsession%2Btoken%3D%3D") == "?t=***"


def test_mask_text_keeps_what_is_not_a_credential(tmp_path, monkeypatch):
    # Short credential values (fixtures' "testing", MinIO's "minio") would mask common words;
    # other variables, and those that only name a credential's file, are no secrets.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "minio")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Ada Lovelace Byron")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("SEGSHIFT_NOTE", "plainly-not-secret")
    ordinary = [
        "data/prepared", f"sqlite:///{tmp_path}/mlflow.db", "http://127.0.0.1:9000",
        "s3://segshift-data/prepared/v1", "minio", "Ada Lovelace Byron",
        str(tmp_path / "credentials"),
        "plainly-not-secret", "user@example.com", "https://pypi.org/simple/?page=2&sort=name",
        GIT_SHA, GIT_SHA.upper(),  # git commits are 40 hex characters, like a secret key's length
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",  # DVC stage hash
        "0a1b2c3d4e5f60718293a4b5c6d7e8f9",  # MLflow run id
        "home/user/projects/segshift/data/prepare",  # 40 characters of a path
        "pipeline 3f786850 9f86d081", "[1, 2, 3, 4]", "null", "0.25",
    ]
    assert [mask_text(text) for text in ordinary] == ordinary
    # Masking is surgical: the words around a credential stay readable.
    assert (mask_text(f"endpoint {ENDPOINT_WITH_KEYS} at commit {GIT_SHA}, cache data/prepared")
            == f"endpoint http://***@127.0.0.1:9000 at commit {GIT_SHA}, cache data/prepared")


def test_mask_secrets_masks_by_key_name_and_by_value():
    tree = {"storage": {"s3_endpoint_url": ENDPOINT_WITH_KEYS, "cache_dir": "data/cache"},
            "mirrors": [PRESIGNED, (URL_WITH_AT_PASSWORD, 3)], "db_password": "hunter22",
            "api_token": None, ENDPOINT_WITH_KEYS: "a URL as a key"}
    assert mask_secrets(tree) == {
        "storage": {"s3_endpoint_url": "http://***@127.0.0.1:9000", "cache_dir": "data/cache"},
        "mirrors": [PRESIGNED_MASKED, ("https://***@host.example/x", 3)], "db_password": "***",
        "api_token": None, "http://***@127.0.0.1:9000": "a URL as a key"}


def test_tracker_log_records_are_masked(caplog):
    # What the tracker prints (warnings, a traceback it logs) can quote a URL or a config value.
    tracker_log = logging.getLogger("segshift.pipelines.tracking")
    caplog.set_level(logging.DEBUG, logger=tracker_log.name)
    tracker_log.warning("endpoint %s unreachable", ENDPOINT_WITH_KEYS)
    try:
        raise RuntimeError(f"GET {PRESIGNED} failed")
    except RuntimeError:
        tracker_log.exception("could not record the end of stage run %s", "r1")
    assert _leaks({"log": caplog.text}) == {}
    assert "endpoint http://***@127.0.0.1:9000 unreachable" in caplog.text
    assert "Traceback" in caplog.text  # the traceback is kept, only masked
    assert f"RuntimeError: GET {PRESIGNED_MASKED} failed" in caplog.text


def _artifact_texts(client: MlflowClient, run_id: str, dst: Path) -> dict[str, str]:
    """Every artifact of the run, downloaded from the store, as text (binary files decoded
    leniently: a secret in them would still show)."""
    root = Path(client.download_artifacts(run_id, "", str(dst)))
    return {f"{run_id[:6]}:{f.relative_to(root)}": f.read_bytes().decode("utf-8", "replace")
            for f in sorted(root.rglob("*")) if f.is_file()}


def _run_texts(run) -> dict[str, str]:
    texts = {f"{run.info.run_id[:6]} name": run.info.run_name}
    for kind, entries in (("param", run.data.params), ("tag", run.data.tags)):
        texts.update({f"{run.info.run_id[:6]} {kind} {k}": f"{k}={v}" for k, v in entries.items()})
    return texts


def test_secrets_in_values_never_reach_mlflow_or_the_log(store, experiment, tmp_path, monkeypatch,
                                                         caplog, capfd):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    caplog.set_level(logging.DEBUG, logger="segshift.pipelines.tracking")
    params = _params(experiment, **{"storage.s3_endpoint_url": ENDPOINT_WITH_KEYS,
                                    "storage.cache_dir": f"/tmp/cache/{ENV_SECRET}"})
    everything = f"{ENDPOINT_WITH_KEYS}\n{URL_WITH_AT_PASSWORD}\n{PRESIGNED}\n{ENV_SECRET}\n"
    notes = tmp_path / "notes.md"
    notes.write_text(everything)
    folder = tmp_path / "bundle"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "sources.json").write_text(f'{{"mirror": "{PRESIGNED}"}}')
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    (folder / "plot.png").write_bytes(png)
    svg = tmp_path / "figure.svg"
    svg.write_text(f"<svg><title>{ENDPOINT_WITH_KEYS}</title></svg>")

    with pytest.raises(RuntimeError):
        # A DVC stage name is printed when no stage hash is found (the store is no DVC repo).
        with StageTracker(params, "prepare", store, dvc_stage=f"prepare-{ENV_SECRET}",
                          tags={"source": PRESIGNED, "note": f"key {ENV_SECRET}"}) as tracker:
            run_id = tracker.run_id
            tracker.log_params({"data": {"mirror": PRESIGNED, "backup": URL_WITH_AT_PASSWORD},
                                "notes": f"credential {ENV_SECRET}"})
            tracker.set_tags({"endpoint": ENDPOINT_WITH_KEYS})
            tracker.log_text(everything, "notes/all.txt")
            # A Path is no string to mask in the tree: only its JSON text shows the secret.
            tracker.log_dict({"endpoint": ENDPOINT_WITH_KEYS, "mirrors": [PRESIGNED],
                              "env": ENV_SECRET, "path": Path(f"/x/{ENV_SECRET}")},
                             "extra/urls.json")
            tracker.log_dict({"endpoint": ENDPOINT_WITH_KEYS, "backup": URL_WITH_AT_PASSWORD},
                             "extra/urls.yaml")
            tracker.log_artifact(notes, "docs")
            tracker.log_artifact(folder, "bundle")
            tracker.log_figure(svg, "plots/figure.svg")
            raise RuntimeError(f"download of {PRESIGNED} via {URL_WITH_AT_PASSWORD} failed")
    client = _client(store)
    # Sweeps log trial params and tags through these directly.
    log_flat_params(client, run_id, {"sweep.trial_url": PRESIGNED})
    set_run_tags(client, run_id, {"sweep.endpoint": ENDPOINT_WITH_KEYS})

    run = client.get_run(run_id)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    out, err = capfd.readouterr()
    texts = {**_run_texts(run), **_run_texts(parent), "stdout": out, "stderr": err,
             "log": caplog.text, **_artifact_texts(client, run_id, tmp_path / "child"),
             **_artifact_texts(client, parent.info.run_id, tmp_path / "parent")}
    assert _leaks(texts) == {}
    # ...and every artifact was indeed read back (an empty download would prove nothing).
    child = {name.split(":", 1)[1] for name in texts if name.startswith(f"{run_id[:6]}:")}
    assert child == {CONFIG_ARTIFACT, "notes/all.txt", "extra/urls.json", "extra/urls.yaml",
                     "docs/notes.md", "bundle/plot.png", "bundle/sub/sources.json",
                     "plots/figure.svg"}
    assert f"{parent.info.run_id[:6]}:{CONFIG_ARTIFACT}" in texts

    # Masked, not dropped: the rest of every value is still there to read.
    assert run.data.params["storage.s3_endpoint_url"] == "http://***@127.0.0.1:9000"
    assert run.data.params["data.mirror"] == PRESIGNED_MASKED
    assert run.data.params["storage.cache_dir"] == "/tmp/cache/***"
    assert run.data.tags["segshift.error"] == (f"RuntimeError: download of {PRESIGNED_MASKED} via "
                                               "https://***@host.example/x failed")
    assert "no dvc.stage_hash for 'prepare-***'" in caplog.text
    artifacts = store / "mlartifacts" / run_id / "artifacts"
    assert (artifacts / "bundle" / "plot.png").read_bytes() == png  # binary files go as they are
    assert "http://***@127.0.0.1:9000" in (artifacts / CONFIG_ARTIFACT).read_text()
    assert notes.read_text() == everything  # the files on disk are the stage's: left untouched


# --------------------------------------------------------------------------- git and DVC provenance

def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


def _dvc(repo, *args):
    # The CLI in a subprocess, as users run it: in-process DVC logs to streams pytest has closed.
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc), *args], cwd=repo, check=True, capture_output=True, text=True)


@pytest.mark.integration
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


@pytest.mark.integration
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
