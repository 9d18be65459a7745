"""Killing `dvc repro` in the middle of a training stage and running it again resumes from the last
checkpoint and ends with the metrics of an uninterrupted run; the killed stage's MLflow run ends KILLED."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.test_dvc_pipeline import BIN, _fresh_project, _run

RESUMABLE = {"inter.iterations": 120, "engine.checkpoint_every": 10, "engine.val_every": 40,
             "engine.log_every": 10}


def _checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except Exception:     # not there yet, or being renamed into place
        return 0


def _start_repro(project: Path, stage: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen([str(BIN / "dvc"), "repro", stage], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _interrupt_after_first_checkpoint(project: Path, stage: str, iterations: int) -> int:
    """Ctrl-C (SIGINT to the process group, as a terminal does) once a checkpoint exists."""
    proc = _start_repro(project, stage)
    last = project / "checkpoints" / stage / "last.pt"
    deadline = time.monotonic() + 300
    step = 0
    while time.monotonic() < deadline and proc.poll() is None:
        step = _checkpoint_step(last) if last.is_file() else 0
        if step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"dvc repro ended before it could be interrupted:\n{proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert 0 < step < iterations
    return step


@pytest.mark.slow
def test_killed_stage_resumes_and_matches_an_uninterrupted_run(tmp_path):
    reference = _fresh_project(tmp_path / "a", RESUMABLE)
    _run([str(BIN / "dvc"), "repro", "inter"], reference)
    expected = json.loads((reference / "metrics" / "inter.json").read_text())

    project = _fresh_project(tmp_path / "b", RESUMABLE)
    _run([str(BIN / "dvc"), "repro", "source"], project)
    killed_at = _interrupt_after_first_checkpoint(project, "inter", RESUMABLE["inter.iterations"])
    assert not (project / "models" / "inter" / "model.pt").exists()

    out = _run([str(BIN / "dvc"), "repro", "inter"], project)
    assert "resuming inter from step" in out
    got = json.loads((project / "metrics" / "inter.json").read_text())
    assert got["resumed_from"] >= killed_at > 0
    assert got["test"] == expected["test"]
    assert (got["selected_step"], got["val"]) == (expected["selected_step"], expected["val"])

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segshift")
    runs = client.search_runs([experiment.experiment_id], "tags.`segshift.stage` = 'inter'",
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
