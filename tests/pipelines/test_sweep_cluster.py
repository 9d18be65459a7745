"""A sweep submitted through the Ray Jobs API to a two-node Ray cluster on loopback (slow)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.pipelines.sweep_helpers import free_port, mlflow_server, swept_project

BIN = Path(sys.executable).parent


def ray_cli(*args: str, env: dict) -> None:
    subprocess.run([str(BIN / "ray"), *args], check=True, env=env, capture_output=True, timeout=180)


@pytest.mark.slow
def test_a_sweep_submitted_to_a_two_node_cluster_logs_its_trials_and_best_params(tmp_path):
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient
    if ray.is_initialized():
        ray.shutdown()
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    with mlflow_server(tmp_path / "mlflow") as uri:
        swept_project(tmp_path, uri, {
            "sweep.out_dir": str(tmp_path / "sweeps"), "paths.models": str(tmp_path / "models"),
            "sweep.cpus_per_worker": 0.4, "ray.local_num_cpus": None})
        try:
            ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=1",
                    "--include-dashboard=true", env=env)
            ray_cli("start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1", env=env)
            client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
            nodes = None
            # No --working-dir here: two nodes on one machine share Ray's session directory, and
            # the second node's runtime-env agent deletes the unpacked working_dir (the driver's
            # cwd) once its trial actors are done. On a real cluster each node has its own.
            job = client.submit_job(
                entrypoint=f"cd {tmp_path} && {BIN / 'segshift'} sweep --params params.yaml --quiet --fresh",
                runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "SEGSHIFT_TRACEBACK": "1"}})
            deadline = time.monotonic() + 900
            while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED):
                assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
                time.sleep(2)
            logs = client.get_job_logs(job)
            assert status == JobStatus.SUCCEEDED, logs[-4000:]
            assert "sweep intra: 4 trials" in logs
            import ray as ray_client
            ray_client.init(address=f"127.0.0.1:{gcs}")
            nodes = [n for n in ray_client.nodes() if n["Alive"]]
            ray_client.shutdown()
        finally:
            ray_cli("stop", "--force", env=env)
        assert nodes is not None and len(nodes) == 2
        best = yaml.safe_load((tmp_path / "sweeps" / "intra" / "best_params.yaml").read_text())
        assert 0.3 <= best["rank"]["lambda"] <= 0.8
        summary = json.loads((tmp_path / "sweeps" / "intra" / "summary.json").read_text())
        mlflow = MlflowClient(uri)
        experiment = mlflow.get_experiment_by_name("segshift").experiment_id
        parent = mlflow.search_runs([experiment], "tags.`segshift.role` = 'sweep'")[0]
        assert parent.info.status == "FINISHED"
        children = mlflow.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted(c.data.tags["segshift.trial_id"] for c in children) == sorted(r["trial_id"] for r in summary["rows"])
        assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    shutil.rmtree(tmp_path / "sweeps", ignore_errors=True)
