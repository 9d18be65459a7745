"""A tiny swept project and an `mlflow server` on loopback, shared by the sweep tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from segshift.components.config import load_params
from segshift.pipelines.cli import main
from tests.conftest import write_params
from tests.pipelines.test_rank import save_random_inter_model

N = 10      # target train images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(root: Path, artifacts: str | None = None, env: dict[str, str] | None = None):
    """`mlflow server` with a sqlite backend on a free loopback port, serving artifacts stored in
    `artifacts` (default `root/artifacts`; may be s3://, with the endpoint and keys in `env`);
    yields its URI."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", artifacts or str(root / "artifacts"), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"),
        env={**os.environ, **(env or {})})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)


def swept_project(root: Path, tracking_uri: str, extra: dict | None = None) -> Path:
    """Prepared tiny data, a random inter model and a small sweep configuration; returns params."""
    params = write_params(root, {
        "prepare.out_dir": str(root / "prepared"),
        "prepare.builtin.counts": {"source_train": 4, "source_val": 2, "target_train": N,
                                   "target_val": 2, "target_test": 2},
        "model.width": 0.125, "ray.local_num_cpus": 2, "tracking.uri": tracking_uri,
        "rank.batch_size": 4, "intra.batch_size": 2,
        "sweep.num_samples": 4, "sweep.iterations": 4, "sweep.val_every": 2,
        "sweep.max_concurrent_trials": 2, "sweep.scheduler.grace_period": 2,
        "sweep.cpus_per_worker": 0.5,
        "sweep.space": {"rank.lambda": {"type": "uniform", "low": 0.3, "high": 0.8},
                        "rank.class_balanced_share": {"type": "choice", "values": [None, 0.5]},
                        "intra.optimizer.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}},
        **(extra or {})})
    if not (root / "models" / "inter" / "model.pt").exists():
        assert main(["prepare", "--params", str(params), "--quiet"]) == 0
        save_random_inter_model(root, load_params(params))
    return params
