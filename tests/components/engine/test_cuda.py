"""The engine on a CUDA GPU: fp16 with a grad scaler, bf16, channels-last, nccl (DDP and Ray Train).

Skipped without a GPU; `make gpu-check` runs them on one.
"""
import os

import pytest
import torch

from segshift.components.config import load_params
from segshift.components.engine.checkpoint import load_checkpoint
from segshift.components.engine.loop import Runtime, Trainer
from segshift.components.engine.precision import Hardware, resolve_speed
from segshift.components.methods.supervised import Supervised
from segshift.components.models.factory import build_model
from tests.components.engine.test_loop import batches, params, source_train  # noqa: F401 (fixture)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CUDA = torch.device("cuda", 0)


def cuda_trainer(p, tmp_path, amp: str, channels_last, runtime=None):
    torch.manual_seed(0)
    runtime = runtime or Runtime(device=CUDA)
    method = Supervised(build_model(p.model), p.source)
    speed = resolve_speed(amp, channels_last, Hardware.detect(CUDA))
    return Trainer(method, p.engine, p.source.iterations, p.source.accumulation,
                   checkpoint_path=tmp_path / "last.pt", best_path=tmp_path / "best.pt", fingerprint="cuda",
                   runtime=runtime, progress=False, speed=speed)


def logits_dtypes(trainer) -> list[torch.dtype]:
    seen, model, step = [], trainer.method.modules["model"], trainer.method.training_step

    def spied(batch, i, backward):
        seen.append(model(batch["labelled"][0]).main.dtype)
        return step(batch, i, backward)
    trainer.method.training_step = spied
    return seen


def test_fp16_with_a_grad_scaler_trains_and_checkpoints_the_scaler(tmp_path, source_train):  # noqa: F811
    p = params(**{"source.iterations": 4})
    trainer = cuda_trainer(p, tmp_path, "fp16", False)
    seen = logits_dtypes(trainer)
    result = trainer.fit(batches(source_train, p))
    assert seen == [torch.float16] * 4
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["scaler"] and state["scaler"]["scale"] > 0


def test_bf16_on_a_gpu_with_it(tmp_path, source_train):  # noqa: F811
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    p = params(**{"source.iterations": 2})
    trainer = cuda_trainer(p, tmp_path, "auto", "auto")
    assert trainer.speed.amp == "bf16" and trainer.speed.channels_last
    seen = logits_dtypes(trainer)
    trainer.fit(batches(source_train, p))
    assert seen == [torch.bfloat16] * 2


def test_channels_last_weights_and_inputs_on_the_gpu(tmp_path, source_train):  # noqa: F811
    p = params(**{"source.iterations": 2})
    trainer = cuda_trainer(p, tmp_path, "none", True)
    trainer.fit(batches(source_train, p))
    conv = next(m for m in trainer.method.segmenter.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.device.type == "cuda"
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_nccl_ddp_step_on_one_gpu(tmp_path, source_train):  # noqa: F811
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        total = torch.ones(3, device=CUDA)
        dist.all_reduce(total)
        assert total.tolist() == [1.0, 1.0, 1.0]
        p = params(**{"source.iterations": 2})
        # the engine wraps DDP only for several workers; one GPU gives one rank, so wrap it here
        trainer = cuda_trainer(p, tmp_path, "auto", False, runtime=Runtime(rank=0, world_size=1, device=CUDA))
        trainer.method.modules["model"] = torch.nn.parallel.DistributedDataParallel(
            trainer.method.modules["model"].to(CUDA), device_ids=[0])
        result = trainer.fit(batches(source_train, p))
        assert len(result.history) == 2
    finally:
        dist.destroy_process_group()


def test_a_ray_train_stage_on_the_gpu(tmp_path):
    """The path users take: one Ray Train worker with a GPU (nccl), in-process Ray."""
    import ray

    from segshift.pipelines.cli import main
    from segshift.pipelines.runtime import StageJob, run_workers
    from tests.conftest import write_params
    path = write_params(tmp_path, {"source.iterations": 3, "source.batch_size": 2, "engine.val_every": 3,
                                   "engine.checkpoint_every": 3, "model.width": 0.125,
                                   "engine.workers.num_workers": 1, "engine.workers.use_gpu": True,
                                   "engine.workers.gpus_per_worker": 1})
    assert main(["prepare", "--params", str(path), "--quiet"]) == 0
    p = load_params(path)
    try:
        summary = run_workers(StageJob(params=p.model_dump(mode="json"), stage="source",
                                       project_dir=str(tmp_path), progress=False), lambda m, s: None)
    finally:
        ray.shutdown()
    assert summary["steps"] == 3 and summary["speed"]["device"].startswith("CUDA")
