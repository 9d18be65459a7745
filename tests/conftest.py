"""Shared fixtures: a tiny, valid params file derived from the repository's own params.yaml, the
session's tiny projects (prepared once, trained once: read them, copy them to write), and the marks.

Marks: `integration` (real services, several processes, whole pipelines: `make test-integration`),
`slow` (`make test-slow`); the default `make test` runs neither.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from segshift.components.derive import ANY_KEY, set_dotted

REPO = Path(__file__).resolve().parents[1]

TINY_BUILTIN = {
    "prepare.builtin.height": 64, "prepare.builtin.width": 128,
    "prepare.builtin.counts": {"source_train": 6, "source_val": 2, "target_train": 6,
                               "target_val": 2, "target_test": 3},
    "prepare.workers": 1,
}


def write_params(directory: Path, overrides: dict[str, Any] | None = None) -> Path:
    """params.yaml from the repo with `overrides` (dotted keys) applied, written into `directory`.
    Any key may be added (ANY_KEY), so that a test can write a file the schema refuses."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {**TINY_BUILTIN, "prepare.out_dir": str(directory / "prepared"),
                          **(overrides or {})}.items():
        set_dotted(raw, dotted, value, open_paths=ANY_KEY)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def tiny_params(tmp_path: Path) -> Path:
    return write_params(tmp_path)


# --- the session's shared machinery ------------------------------------------------------------------
# Tiny models on a small (and often shared) machine: one intra-op thread is fastest by far (a kornia
# blur of a 20x30 batch: 2.5 ms on one thread, 65 ms on two under load). Worker processes (Ray,
# subprocesses) keep torch's default.

@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _every_thread_for_slow_tests(request, _one_torch_thread):
    """The slow tests train real workloads (the calibration: minutes), where every core pays."""
    import torch
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    torch.set_num_threads(_one_torch_thread)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _mlflow_schema_once(tmp_path_factory):
    """A fresh MLflow sqlite store normally runs every schema migration (about 5 s each time); in
    this process the first store migrates a template once and every later new sqlite file gets a
    copy of that schema (sqlite's backup). The store then adds its default experiment as usual, so a
    copied database is the one MLflow would have built. Other processes migrate as usual."""
    import sqlite3

    import mlflow.store.db.utils as db_utils
    original = db_utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow-schema") / "schema.db"

    def initialize(engine):
        path = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        if not path or path == ":memory:":
            return original(engine)
        if not template.exists():
            import sqlalchemy
            scratch = sqlalchemy.create_engine(f"sqlite:///{template}")
            try:
                original(scratch)
            finally:
                scratch.dispose()
        source = sqlite3.connect(template)
        connection = engine.raw_connection()
        try:
            source.backup(connection.driver_connection)
        finally:
            connection.close()
            source.close()

    db_utils._initialize_tables = initialize
    yield
    db_utils._initialize_tables = original


# --- the session's tiny projects ---------------------------------------------------------------------

#: the training of the session's source model (the smoke run): 4 steps of the 1/8-width DeepLab-v2
SMOKE_TRAINING = {"source.iterations": 4, "source.batch_size": 2, "engine.val_every": 2,
                  "engine.checkpoint_every": 2, "engine.log_every": 1, "model.width": 0.125,
                  "evaluate.stages": ["source"]}

#: what `copy_project` leaves behind: the MLflow store (its runs' artifact paths point into the
#: original) and the params file (each test writes its own with `write_params`)
NOT_COPIED = ("mlflow.db", "mlartifacts", "mlruns", "params.yaml", "cli-output.txt")


def copy_project(source: Path, destination: Path) -> Path:
    """A writable copy of a session project (a few dozen small files): prepared data, models,
    checkpoints, metrics; no MLflow store and no params file."""
    shutil.copytree(source, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
    return destination


def run_cli(project: Path, *argv: str) -> tuple[int, str]:
    """`segshift <argv>` run in `project` (the CLI's project directory); (exit code, stdout)."""
    from segshift.pipelines.cli import main
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(project)
        code = main(list(argv))
    return code, out.getvalue()


def label_histogram(project: Path, split: str = "test"):
    """Pixels per train id (0..18) in the prepared target `split` of `project` (a numpy array)."""
    import numpy as np

    from segshift.components.data.dataset import read_label
    from segshift.components.data.labels import CLASS_NAMES, IGNORE_INDEX
    from segshift.components.data.manifest import read_manifest
    target = project / "prepared" / "target"
    counts = np.zeros(256, np.int64)
    for row in read_manifest(target).to_pylist():
        if row["split"] == split:
            counts += np.bincount(read_label(target / row["label"]).ravel(), minlength=256)
    assert counts[len(CLASS_NAMES):IGNORE_INDEX].sum() == 0 and counts[IGNORE_INDEX] < counts.sum()
    return counts[:len(CLASS_NAMES)]


def constant_baseline(histogram) -> tuple[float, float]:
    """(mIoU, pixel accuracy) of the best constant prediction: the most frequent class everywhere
    scores IoU = its pixel share on that class and 0 on every other class present."""
    share = histogram.max() / histogram.sum()
    return share / int((histogram > 0).sum()), share


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory) -> Path:
    """`segshift prepare` of the tiny built-in data (TINY_BUILTIN), once per session.
    Shared: only read it; `copy_project` it (or use `tiny_project`) to write."""
    root = tmp_path_factory.mktemp("session-prepared")
    code, _ = run_cli(root, "prepare", "--params", str(write_params(root, SMOKE_TRAINING)), "--quiet")
    assert code == 0
    return root


@pytest.fixture(scope="session")
def source_project(tmp_path_factory, prepared_project) -> Path:
    """The prepared project after `segshift train --stage source` (SMOKE_TRAINING) and `segshift
    evaluate` of that model, through the CLI, once per session; the commands' stdout in
    cli-output.txt. Shared: only read it; `copy_project` it to write."""
    root = copy_project(prepared_project, tmp_path_factory.mktemp("session-source"))
    params = str(write_params(root, SMOKE_TRAINING))
    outputs = []
    for argv in (["train", "--params", params, "--stage", "source"], ["evaluate", "--params", params]):
        code, out = run_cli(root, *argv)
        assert code == 0, out
        outputs.append(out)
    (root / "cli-output.txt").write_text("".join(outputs))
    return root


@pytest.fixture
def tiny_project(prepared_project, tmp_path) -> Path:
    """A writable copy of the session's prepared project in this test's tmp_path."""
    return copy_project(prepared_project, tmp_path)


# --- marks ---------------------------------------------------------------------------------------------

#: fixtures that start a real service for the test: a test using one is an integration test
SERVICE_FIXTURES = {"moto_endpoint": "a moto S3 server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
