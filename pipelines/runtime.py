"""What every run of the engine shares, whichever stage or tool starts it: the job a (possibly
remote) worker receives, a stage's settings and training data, the network it starts from, the
input checks, and the worker itself, in this process or on Ray Train.

The training stages (pipelines/train.py), the rounds of a method that trains in rounds
(pipelines/rounds.py) and the sweep's trials (pipelines/sweep.py) all train through
`train_worker`. With `engine.workers.num_workers: 0` it runs in this process; otherwise a Ray
Train `TorchTrainer` runs it on `num_workers` DDP workers (gloo on CPU, nccl on GPU), rank 0
logging to the stage's MLflow run and writing the checkpoints.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from segshift.components import derive
from segshift.components.config import AdaptationStageConfig, Params, SupervisedStageConfig
from segshift.components.data.augment import AugmentationSpec
from segshift.components.data.dataset import PreparedSplit, StepBatchSampler
from segshift.components.data.manifest import MANIFEST_NAME
from segshift.components.engine.loop import Runtime, Trainer, resolve_device, speed_settings
from segshift.components.engine.precision import SpeedSettings
from segshift.components.evaluation import evaluate, validation_metrics
from segshift.components.io import atomic_write_text, resolve_under
from segshift.components.methods import registry
from segshift.components.methods.rounds import Round, StageInputError, label_file
from segshift.components.models.factory import build_model
from segshift.components.ranking import (RANKING_NAME, check_ranking_matches, pseudo_label_paths,
                                         ranked_splits, read_ranking)
from segshift.components.stages import TRAINING
from segshift.pipelines.remote import mirror_path, prepared_dir, pull, push, ray_storage
from segshift.pipelines.stage_model import load_stage_model

# stage -> where its labelled and unlabelled images come from
STAGE_DATA: dict[str, dict[str, str]] = {
    "source": {"labelled": "source train"},
    "oracle": {"labelled": "target train"},
    "inter": {"labelled": "source train", "unlabelled": "target train"},
    "intra": {"labelled": "target train, easy split + pseudo-labels", "unlabelled": "target train, hard split"},
}
# what an adaptation stage's `init` loads: the model a previous stage exported
INIT_FROM_STAGE = {"source": "source", "inter": "inter"}
STREAMS = {"labelled": 0, "unlabelled": 1, "pseudo": 2, "annotated": 3}   # independent batch orders


@dataclass(frozen=True)
class StageJob:
    """Everything a (possibly remote) worker needs; plain data so Ray can ship it."""

    params: dict[str, Any]
    stage: str
    project_dir: str
    tracking_uri: str | None = None
    run_id: str | None = None
    progress: bool = True
    round: dict | None = None   # a Round as a dict (Ray ships plain data)

    @property
    def round_spec(self) -> Round | None:
        return Round(**self.round) if self.round else None

    @property
    def iterations(self) -> int:
        spec = self.round_spec
        return spec.iterations if spec else stage_config(self.config, self.stage).iterations

    @functools.cached_property
    def config(self) -> Params:
        """The validated params, built once per job (and once more in each Ray worker)."""
        return Params.model_validate(self.params)

    def path(self, relative: str) -> Path:
        return resolve_under(self.project_dir, relative)

    @property
    def checkpoint_dir(self) -> Path:
        """This stage's checkpoints on this machine (the mirror of an s3:// paths.checkpoints)."""
        return self.stage_checkpoint_dir / self.round["name"] if self.round else self.stage_checkpoint_dir

    @property
    def stage_checkpoint_dir(self) -> Path:
        """Where every round of the stage keeps its checkpoints and labels."""
        return mirror_path(self.config, self.project_dir, self.config.paths.checkpoints) / self.stage

    def pull_checkpoints(self) -> Path:
        """Fetch this stage's checkpoints from S3 (a run resumed on another machine); local: no-op."""
        pull(self.config, self.project_dir, self.config.paths.checkpoints, under=self.stage, required=False)
        return self.checkpoint_dir

    def push_checkpoint(self, path: Path) -> None:
        push(self.config, self.project_dir, self.config.paths.checkpoints, files=[path])

    @functools.cached_property
    def prepared(self) -> Path:
        """The prepared data on this machine (an s3:// out_dir is pulled once per process)."""
        return prepared_dir(self.config, self.project_dir)


# -- inputs ---------------------------------------------------------------------------------------

def stage_config(params: Params, stage: str) -> SupervisedStageConfig | AdaptationStageConfig:
    if stage not in TRAINING:
        raise StageInputError(f"unknown stage '{stage}'; expected one of {list(TRAINING)}")
    return getattr(params, stage)


def init_model_path(job: StageJob) -> Path | None:
    """The exported model an adaptation stage starts from, if its `init` names a stage."""
    cfg = stage_config(job.config, job.stage)
    stage = INIT_FROM_STAGE.get(getattr(cfg, "init", ""))
    return job.path(job.config.paths.models) / stage / "model.pt" if stage else None


def ranking_dir(job: StageJob) -> Path:
    return job.path(job.config.rank.out_dir)


def stage_datasets(job: StageJob, cache: bool = False) -> dict[str, PreparedSplit]:
    """The training images of each role; `intra` reads the ranking's easy/hard split."""
    params, stage = job.config, job.stage
    cfg = stage_config(params, stage)
    prepared = job.prepared
    crop = tuple(cfg.crop) if cfg.crop else None
    augmentation = AugmentationSpec.from_config(cfg.augment, crop, cfg.flip) if cfg.augment else None
    # every label a stage trains on (source, target, pseudo-labels, revealed pixels) in the head's ids
    aug = {"cache": cache, "crop": crop, "flip": cfg.flip, "augmentation": augmentation,
           "protocol": params.model.classes}
    if job.round:
        return round_datasets(job.round_spec, prepared, job.stage_checkpoint_dir, aug)
    if stage == "intra":
        table = read_ranking(ranking_dir(job))
        easy, hard = ranked_splits(table)
        return {"labelled": PreparedSplit(prepared / "target", "train", ids=easy,
                                          label_paths=pseudo_label_paths(ranking_dir(job), table), **aug),
                "unlabelled": PreparedSplit(prepared / "target", "train", need_labels=False, ids=hard, **aug)}
    datasets = {"labelled": PreparedSplit(prepared / ("source" if stage in ("source", "inter") else "target"),
                                          "train", **aug)}
    if stage == "inter":
        datasets["unlabelled"] = PreparedSplit(prepared / "target", "train", need_labels=False, **aug)
    return datasets


def round_datasets(spec: Round, prepared: Path, stage_dir: Path, aug: dict) -> dict[str, PreparedSplit]:
    datasets = {}
    for role, data in spec.data.items():
        labels = stage_dir / data["labels_dir"] if data.get("labels_dir") else None
        ids = data.get("ids")
        label_paths = {i: label_file(labels, i) for i in ids} if labels and ids else None
        datasets[role] = PreparedSplit(prepared / data["domain"], "train", need_labels=role != "unlabelled",
                                       ids=ids, label_paths=label_paths, **aug)
    return datasets


def check_inputs(job: StageJob) -> None:
    """Fail fast, with the numbers, on inputs a stage cannot train on."""
    params = job.config
    cfg = stage_config(params, job.stage)
    prepared = job.prepared
    for domain in ("source", "target"):
        if not (prepared / domain / MANIFEST_NAME).is_file():
            raise StageInputError(f"{prepared / domain / MANIFEST_NAME}: missing; run `segshift prepare` first")
    init = init_model_path(job)
    if init is not None and not init.is_file():
        raise StageInputError(f"{job.stage}.init is '{cfg.init}' but {init} does not exist; run "
                              f"`dvc repro {cfg.init}` (or `segshift train --stage {cfg.init}`) first")
    if job.stage == "intra":
        if not (ranking_dir(job) / RANKING_NAME).is_file():
            raise StageInputError(f"{ranking_dir(job) / RANKING_NAME}: missing; run `dvc repro rank` "
                                  "(or `segshift rank`) first")
        check_ranking_matches(ranking_dir(job), prepared / "target")
    workers = max(1, params.engine.workers.num_workers)
    for role, dataset in stage_datasets(job).items():
        where = (f"{job.stage}, round {job.round['name']} ({role})" if job.round
                 else f"{job.stage} ({STAGE_DATA[job.stage][role]})")
        if len(dataset) < cfg.batch_size:
            raise StageInputError(f"{where}: {len(dataset)} training images is fewer than "
                                  f"{job.stage}.batch_size = {cfg.batch_size}")
        if cfg.crop is None and len(dataset.sizes) > 1:
            raise StageInputError(f"{where}: training images have {len(dataset.sizes)} sizes "
                                  f"({sorted(dataset.sizes)[:3]} ...); set {job.stage}.crop or resize when preparing")
    if cfg.batch_size % workers:
        raise StageInputError(f"{job.stage}.batch_size = {cfg.batch_size} is not divisible by "
                              f"engine.workers.num_workers = {workers}")


def data_fingerprint(prepared: Path) -> str:
    digest = hashlib.sha256()
    for domain in ("source", "target"):
        digest.update((prepared / domain / MANIFEST_NAME).read_bytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def run_fingerprint(job: StageJob, amp: str) -> str:
    """What a resumable checkpoint must match: the stage, model, seed, precision (as resolved on
    this machine), the settings of the method the stage names (`methods.<method>`: a checkpoint of
    LSE at scale 2 is not one of LSE at scale 1) and every input."""
    params, stage = job.config, job.stage
    stage_cfg = getattr(params, stage)
    method = getattr(params.methods, getattr(stage_cfg, "method", ""), None)
    identity = {"stage": stage, "stage_config": stage_cfg.model_dump(mode="json"),
                "method": method.model_dump(mode="json") if method is not None else None,
                "model": params.model.model_dump(mode="json"), "seed": params.engine.seed,
                "amp": amp, "data": data_fingerprint(job.prepared)}
    init = init_model_path(job)
    if init is not None:
        identity["init"] = file_digest(init)
    if stage == "intra":
        identity["ranking"] = file_digest(ranking_dir(job) / RANKING_NAME)
    if job.round:
        identity["round"] = job.round
        if job.round.get("init"):
            identity["round_init"] = file_digest(job.stage_checkpoint_dir / job.round["init"])
    return derive.identity(identity, 16)


# -- the worker -----------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_source(datasets: dict[str, PreparedSplit], global_batch: int, total_micro_steps: int,
                 seed: int, runtime: Runtime, loader_workers: int) -> Callable[[str, int], Any]:
    def make(role: str, start: int):
        sampler = StepBatchSampler(len(datasets[role]), global_batch, seed, STREAMS[role], start,
                                   total_micro_steps, runtime.rank, runtime.world_size)
        return iter(DataLoader(datasets[role], batch_sampler=sampler, num_workers=loader_workers,
                               pin_memory=runtime.device.type == "cuda"))
    return make


def initial_model(job: StageJob) -> torch.nn.Module:
    """The network a stage starts from: ImageNet backbone / scratch, or a previous stage's model."""
    params = job.config
    cfg = stage_config(params, job.stage)
    if job.round and job.round.get("init"):
        return load_stage_model(job.stage_checkpoint_dir / job.round["init"], params)
    init = getattr(cfg, "init", "imagenet")
    if init in INIT_FROM_STAGE:
        return load_stage_model(init_model_path(job), params)
    model_cfg = params.model if init == "imagenet" else params.model.model_copy(update={"pretrained": None})
    return build_model(model_cfg, endpoint_url=params.storage.s3_endpoint_url)


def build_method(job: StageJob, model: torch.nn.Module):
    """The stage's `method:` over its network, or the step its round names (components/methods/registry.py)."""
    params = job.config
    return registry.build_method(model, stage_config(params, job.stage), params, job.round_spec)


def shifted_log(log: Callable[[dict[str, float], int], None], offset: int):
    """A round's steps continue the stage's history in MLflow, after the rounds before it."""
    if not offset:
        return log
    return lambda metrics, step: log(metrics, step + offset)


def train_worker(job: StageJob, runtime: Runtime, log: Callable[[dict[str, float], int], None],
                 on_validation: Callable[[dict[str, float], int], None] | None = None) -> dict:
    params, stage = job.config, job.stage
    cfg, engine = stage_config(params, stage), params.engine
    seed_everything(engine.seed + runtime.rank)
    log = shifted_log(log, job.round["step_offset"] if job.round else 0)
    prepared = job.prepared
    checkpoints = job.pull_checkpoints()    # first: a round's labels live beside its checkpoints
    datasets = stage_datasets(job, cache=engine.cache_images)
    val = PreparedSplit(prepared / "target", "val", cache=engine.cache_images,
                        need_labels=engine.selection == "val_miou")
    method = build_method(job, initial_model(job))
    speed = speed_settings(engine, runtime.device)
    if runtime.is_main and not (job.round and job.round["step_offset"]):
        announce_speed(stage, speed)
    trainer = Trainer(
        method, engine, job.iterations, cfg.accumulation,
        checkpoint_path=checkpoints / "last.pt", best_path=checkpoints / "best.pt",
        fingerprint=run_fingerprint(job, speed.amp), runtime=runtime, speed=speed,
        validate=lambda m: validation_metrics(evaluate(m, val, engine.eval_batch_size, runtime.device)),
        on_log=log if runtime.is_main else None, on_validation=on_validation,
        on_checkpoint=job.push_checkpoint,
        progress=job.progress, desc=f"{stage} {job.round['name']}" if job.round else stage)
    source = batch_source(datasets, cfg.batch_size, job.iterations * cfg.accumulation, engine.seed,
                          runtime, engine.loader_workers)
    result = trainer.fit(source)
    summary = {"steps": result.steps, "resumed_from": result.resumed_from,
               "selection": {"metric": result.selection.metric, "value": result.selection.value,
                             "step": result.selection.step},
               "history": result.history, "val_curve": result.val_curve,
               "earlier_seconds": result.earlier_seconds,
               "speed": speed.record()}
    return summary


def announce_speed(stage: str, speed: SpeedSettings) -> None:
    """Once per stage, before its first step: the precision and layout this machine trains in."""
    from tqdm import tqdm
    tqdm.write(f"{stage}: precision {speed.reason}")
    if speed.warning:
        tqdm.write(f"warning: {speed.warning}")


def _ray_worker(config: dict) -> None:
    """Entry point of each Ray Train worker: rank and device come from Ray's context."""
    import ray.train
    import ray.train.torch
    job = StageJob(**config)
    context = ray.train.get_context()
    runtime = Runtime(rank=context.get_world_rank(), world_size=context.get_world_size(),
                      device=ray.train.torch.get_device())
    log = mlflow_logger(job) if runtime.is_main else (lambda metrics, step: None)
    summary = train_worker(job, runtime, log)
    metrics = {"steps": summary["steps"], "resumed_from": summary["resumed_from"],
               "summary": json.dumps(summary)}
    # Ray Train keeps reported metrics only together with a checkpoint, and only rank 0's.
    if runtime.is_main:
        with tempfile.TemporaryDirectory() as tmp:
            atomic_write_text(Path(tmp) / "summary.json", metrics["summary"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def mlflow_logger(job: StageJob) -> Callable[[dict[str, float], int], None]:
    """Rank 0 of a Ray worker group logs into the stage run the driver opened."""
    if not job.run_id:
        return lambda metrics, step: None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    client = MlflowClient(job.tracking_uri)

    def log(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(job.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
    return log


def run_workers(job: StageJob, log: Callable[[dict[str, float], int], None]) -> dict:
    """Run the worker function in-process (0 workers) or as a Ray Train TorchTrainer."""
    params = job.config
    workers = params.engine.workers
    if workers.num_workers == 0:
        runtime = Runtime(device=resolve_device(params.engine.device))
        return train_worker(job, runtime, log)
    from segshift.pipelines.cluster import connect_ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    connect_ray(params)
    storage_path, filesystem = ray_storage(params, job.project_dir,
                                           f"{params.paths.checkpoints.rstrip('/')}/ray")
    resources = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        resources["GPU"] = max(workers.gpus_per_worker, 1)
    trainer = TorchTrainer(
        _ray_worker, train_loop_config=dataclasses.asdict(job),
        scaling_config=ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"segshift-{job.stage}",
                             storage_path=storage_path, storage_filesystem=filesystem))
    result = trainer.fit()
    return json.loads(result.metrics["summary"])
