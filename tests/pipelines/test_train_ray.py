"""Ray Train: two CPU workers (DDP over gloo) with the same global batch reproduce one worker."""

import pytest

from segshift.components.config import load_params
from segshift.pipelines.cli import main
from segshift.pipelines.runtime import StageJob, run_workers
from tests.conftest import write_params

pytestmark = pytest.mark.integration     # two Ray Train worker processes


@pytest.fixture(scope="module")
def ray_local():
    import ray
    yield
    if ray.is_initialized():
        ray.shutdown()


def losses(job: StageJob) -> list[float]:
    return [h["loss"] for h in run_workers(job, lambda metrics, step: None)["history"]]


def test_two_workers_reproduce_the_single_worker_loss_curve(tmp_path, ray_local):
    overrides = {"source.iterations": 5, "source.batch_size": 4, "engine.log_every": 1,
                 "engine.val_every": 5, "engine.checkpoint_every": 5, "model.width": 0.125,
                 # Per-worker BatchNorm statistics would differ from whole-batch ones.
                 "model.frozen_bn": True, "ray.local_num_cpus": 2}
    params_path = write_params(tmp_path, overrides)
    assert main(["prepare", "--params", str(params_path), "--quiet"]) == 0

    def job(workers: int, name: str) -> StageJob:
        params = load_params(params_path, {"engine.workers.num_workers": workers,
                                           "paths.checkpoints": str(tmp_path / name)})
        return StageJob(params=params.model_dump(mode="json"), stage="source",
                        project_dir=str(tmp_path), progress=False)

    single = losses(job(0, "single"))
    double = losses(job(2, "double"))
    assert len(single) == len(double) == 5
    assert double == pytest.approx(single, rel=2e-3)
    assert single[-1] < single[0]     # and it is actually learning
