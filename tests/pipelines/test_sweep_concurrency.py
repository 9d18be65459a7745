"""Sweeps under stress, against an `mlflow server`: 8 trials that finish at once, and a sweep
interrupted (Ctrl-C) in the middle of a trial, then resumed. Slow: each starts many processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.pipelines.sweep_helpers import mlflow_server, swept_project

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def segshift(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "segshift.pipelines.cli", *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def trial_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("segshift")
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("segshift.role") == "trial"]


def test_eight_trials_finishing_at_once_lose_no_run_and_no_metric(tmp_path):
    with mlflow_server(tmp_path / "mlflow") as uri:
        params = swept_project(tmp_path, uri, {
            "sweep.num_samples": 8, "sweep.max_concurrent_trials": 8, "sweep.scheduler.name": "fifo",
            "sweep.iterations": 2, "sweep.val_every": 1, "sweep.cpus_per_worker": 0.2,
            "engine.log_every": 1})
        process = segshift(tmp_path, "sweep", "--params", str(params), "--quiet")
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
        client = MlflowClient(uri)
        runs = trial_runs(client)
        histories = {r.data.tags["segshift.trial_id"]: {
            name: [m.step for m in client.get_metric_history(r.info.run_id, name)]
            for name in ("val_miou", "loss")} for r in runs}
    summary = json.loads((tmp_path / "sweeps" / "intra" / "summary.json").read_text())
    assert summary["trials"] == 8 and summary["finished"] == 8 and summary["errors"] == 0
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert set(histories) == {row["trial_id"] for row in summary["rows"]}
    for trial, history in histories.items():
        assert history == {"val_miou": [1, 2], "loss": [1, 2]}, trial
    for run in runs:
        assert set(run.data.params) == {"rank.lambda", "rank.class_balanced_share", "intra.optimizer.lr"}


def test_a_sweep_interrupted_mid_trial_resumes_without_rerunning_finished_trials(tmp_path):
    with mlflow_server(tmp_path / "mlflow") as uri:
        params = swept_project(tmp_path, uri, {
            "sweep.num_samples": 3, "sweep.max_concurrent_trials": 1, "sweep.scheduler.name": "fifo",
            "sweep.iterations": 8, "sweep.val_every": 2, "engine.checkpoint_every": 2})
        client = MlflowClient(uri)
        process = segshift(tmp_path, "sweep", "--params", str(params), "--quiet")
        finished = wait_for_second_trial_mid_run(client, process)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=300)
        assert process.returncode == 130, err[-3000:]
        assert "continue with `segshift sweep --resume`" in err
        assert not (tmp_path / "sweeps" / "intra" / "best_params.yaml").exists()
        done_id = finished.data.tags["segshift.trial_id"]
        checkpoint = tmp_path / "sweeps" / "intra" / "trials" / done_id / "checkpoints" / "intra" / "best.pt"
        stamp = checkpoint.stat().st_mtime_ns

        process = segshift(tmp_path, "sweep", "--params", str(params), "--quiet", "--resume")
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
        runs = {r.data.tags["segshift.trial_id"]: r for r in trial_runs(client)}
        done_history = [m.step for m in client.get_metric_history(runs[done_id].info.run_id, "val_miou")]
    summary = json.loads((tmp_path / "sweeps" / "intra" / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["finished"] == 3
    assert len(runs) == 3 and {r.info.status for r in runs.values()} == {"FINISHED"}
    # the trial that had finished before Ctrl-C was neither trained nor logged again
    assert checkpoint.stat().st_mtime_ns == stamp
    assert done_history == [2, 4, 6, 8]
    assert (tmp_path / "sweeps" / "intra" / "best_params.yaml").is_file()


def wait_for_second_trial_mid_run(client: MlflowClient, process: subprocess.Popen):
    """Block until one trial run is FINISHED and another has logged a validation; return the first."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        runs = trial_runs(client)
        done = [r for r in runs if r.info.status == "FINISHED"]
        running = [r for r in runs if r.info.status == "RUNNING" and "val_miou" in r.data.metrics]
        if done and running:
            return done[0]
        time.sleep(1)
    process.kill()
    pytest.fail("no second trial reached its first validation within 10 minutes")
