"""`segshift sweep`: Ray Tune + Optuna (TPE) + ASHA over the ranking and the intra stage.

What one sweep does, in order:

1. checks the search space against the typed configuration (`components.search_space`);
2. runs the ranking *inference* once (Ray Data, the inter model over target train) into
   `<sweep>/cache/`: every image's score, rare-class normaliser, raw argmax label and quantised
   confidence. A trial never runs the inter model again;
3. runs `sweep.num_samples` trials with a Tune `Tuner` (OptunaSearch, TPE with a fixed seed;
   ASHA early stopping on target-val mIoU; `max_concurrent_trials`). A trial is the Ray Train V2
   pattern: this module's `run_trial` is the trial's driver and launches a `TorchTrainer` whose
   workers train the intra stage; every validation is reported to Tune through
   `TuneReportCallback`. Each trial re-splits the cached scores with its lambda, selects its
   pseudo-labels (threshold, class balancing), starts from the inter model and trains
   `sweep.iterations` steps: a split + intra training + validation, not a pipeline;
4. re-evaluates the best trial (highest target-val mIoU at any report) on target test and writes
   `<sweep>/best_params.yaml` (an overlay: `segshift preset sweeps/<name>/best_params.yaml`),
   `summary.json`, `summary.md` and two pictures (lambda vs mIoU, parallel coordinates).

MLflow: a parent run per sweep (tag `segshift.sweep`), a nested child run per trial
(`mlflow.parentRunId`), the pictures and summary on the parent. Against several trial processes
use an `mlflow server` (sqlite cannot take many writers).

`--resume` continues an interrupted sweep (`Tuner.restore`): finished trials are kept, unfinished
ones restart and pick up their own last checkpoint. Tune's state lives in `sweep.storage_path`
(local or `s3://`, `storage.s3_endpoint_url` for S3-compatible stores); trial working files live
under `<sweep>/trials/` on the project file system, which cluster nodes must share.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from segshift.components import derive
from segshift.components.config import ConfigError, Params, load_params
from segshift.components.io import (atomic_directory, atomic_write_bytes, atomic_write_text,
                                   resolve_under, strict_json)
from segshift.components.ranking import RankingError, file_sha256, split_counts
from segshift.components.search_space import as_overlay, check_search_space, tune_space, with_values
from segshift.pipelines.remote import prepared_dir, ray_storage

STAGE = "intra"
METRIC = "val_miou"
CACHE_DIR = "cache"
RECORDS_NAME = "records.parquet"
CACHE_META = "cache.json"
# A trial's driver only starts its Ray Train workers, which hold the CPUs and GPUs. Even 0.01 CPU
# per driver would leave 2 x 0.01 short of the second worker on a 2-core machine with 1 CPU per
# worker; a bundle cannot be all zero, so drivers reserve memory (they use ~0.5 GB) and no CPU.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 512 * 1024 ** 2}
WORKER_START_TIMEOUT_S = 600
TAG_SWEEP = "segshift.sweep"
TAG_SWEEP_KEY = "segshift.sweep_key"
TAG_TRIAL = "segshift.trial_id"
TAG_TRIAL_STATE = "segshift.trial_state"


class SweepError(ValueError):
    """A sweep that cannot start or resume; the message says why and what to do."""


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs; plain data, shipped to trial processes by `tune.with_parameters`."""

    params: dict[str, Any]
    project_dir: str
    sweep_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    manifest_sha: str
    model_sha: str


def sweep_dir(params: Params, project_dir: Path) -> Path:
    return resolve_under(project_dir, params.sweep.out_dir) / params.sweep.name


# -- inputs ---------------------------------------------------------------------------------------

def check_sweep_inputs(params: Params, project_dir: Path):
    """Fail fast, before Ray starts: the search space, the inter model, the prepared target, and a
    lambda range that leaves both splits non-empty at its ends."""
    from segshift.pipelines.rank import check_inputs
    check_search_space(params)
    inputs = check_inputs(params, project_dir)
    lam = params.sweep.space.get("rank.lambda")
    if lam is not None:
        for value in lam.candidates():
            try:
                split_counts(len(inputs.rows), value)
            except RankingError as exc:
                raise ConfigError(f"sweep.space['rank.lambda']: {exc}") from None
    return inputs


# -- the ranking inference, once per sweep ----------------------------------------------------------

RECORD_COLUMNS = ("sample_id", "score", "normaliser", "rare_present", "mean_confidence",
                  "class_histogram", "confidence_histogram", "condition")


def write_records(records: list[dict], path: Path) -> None:
    table = pa.table({
        "sample_id": [r["sample_id"] for r in records],
        "score": [r["score"] for r in records], "normaliser": [r["normaliser"] for r in records],
        "rare_present": [r["rare_present"] for r in records],
        "mean_confidence": [r["mean_confidence"] for r in records],
        "class_histogram": [np.asarray(r["class_histogram"], np.float32).tolist() for r in records],
        "confidence_histogram": [np.asarray(r["confidence_histogram"]).ravel().tolist() for r in records],
        "condition": [r["condition"] for r in records]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue())


def read_records(path: Path) -> list[dict]:
    from segshift.components.data.labels import NUM_CLASSES
    from segshift.components.pseudo_labels import LEVELS
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["class_histogram"] = np.asarray(row["class_histogram"], np.float32)
        row["confidence_histogram"] = np.asarray(row["confidence_histogram"], np.int64).reshape(NUM_CLASSES, LEVELS)
    return rows


def ranking_cache(params: Params, inputs, directory: Path, progress: bool) -> tuple[str, str]:
    """The scored target train (records) and the raw labels under `<sweep>/cache/`, computed with
    the inter model unless a cache of the same model and prepared target is already there.
    Returns (manifest sha256, model sha256); the trials read the records themselves."""
    from segshift.pipelines.rank import run_inference
    manifest_sha, model_sha = file_sha256(inputs.manifest), file_sha256(inputs.model)
    cache = directory / CACHE_DIR
    identity = {"manifest_sha256": manifest_sha, "model_sha256": model_sha}
    meta = cache / CACHE_META
    if meta.is_file() and json.loads(meta.read_text()) == identity and (cache / RECORDS_NAME).is_file():
        return manifest_sha, model_sha
    with atomic_directory(cache, writer="segshift sweep (ranking cache)") as staging:
        records = run_inference(params, inputs, staging, progress)
        write_records(records, staging / RECORDS_NAME)
        atomic_write_text(staging / CACHE_META, json.dumps(identity))
    return manifest_sha, model_sha


# -- one trial ----------------------------------------------------------------------------------------

def trial_params(base: Params, values: dict[str, Any], trial_dir: Path) -> Params:
    """The trial's configuration: the searched values, the sweep's length and validation interval,
    and every output path inside the trial's own directory (the prepared data shared)."""
    sweep = base.sweep
    return with_values(base, {
        **values,
        "intra.iterations": sweep.iterations,
        "engine.val_every": sweep.val_every, "engine.checkpoint_every": sweep.val_every,
        "engine.selection": "val_miou",
        "engine.workers.num_workers": sweep.workers_per_trial,
        "engine.workers.use_gpu": sweep.gpus_per_worker > 0,
        "engine.workers.cpus_per_worker": sweep.cpus_per_worker,
        "engine.workers.gpus_per_worker": sweep.gpus_per_worker,
    }).relocated(trial_dir)


def materialise_trial_ranking(ctx: SweepContext, params: Params, records: list[dict]) -> None:
    """The trial's ranking directory from the cached inference: its split and pseudo-labels."""
    from segshift.pipelines.rank import publish_ranking
    out = resolve_under(ctx.project_dir, params.rank.out_dir)
    with atomic_directory(out, writer="segshift sweep (trial ranking)") as staging:
        publish_ranking(records, params, ctx.manifest_sha, ctx.model_sha,
                        raw_dir=Path(ctx.sweep_dir) / CACHE_DIR, out_dir=staging)


def trial_child_run(ctx: SweepContext, sweep_name: str, trial_id: str, values: dict[str, Any]) -> str:
    """The trial's MLflow run under the sweep's parent: found again when a resumed sweep restarts it."""
    from mlflow import MlflowClient
    from segshift.pipelines.tracking import TAG_PARENT, TAG_ROLE, TAG_STAGE, log_flat_params
    client = MlflowClient(ctx.tracking_uri)
    found = client.search_runs([ctx.experiment_id], f"tags.`{TAG_TRIAL}` = '{trial_id}' and "
                               f"tags.`{TAG_PARENT}` = '{ctx.parent_run_id}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(ctx.experiment_id, run_name=f"trial {trial_id}", tags={
        TAG_PARENT: ctx.parent_run_id, TAG_ROLE: "trial", TAG_STAGE: "sweep-trial", TAG_TRIAL: trial_id,
        TAG_SWEEP: sweep_name})
    log_flat_params(client, run.info.run_id, {k: json.dumps(v) for k, v in sorted(values.items())})
    return run.info.run_id


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: the driver of a Ray Train run of the intra stage (Ray Train V2 pattern)."""
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from segshift.pipelines.runtime import StageJob
    ctx = SweepContext(**context)
    base = Params.model_validate(ctx.params)
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(ctx.sweep_dir) / "trials" / trial_id
    params = trial_params(base, config, trial_dir)
    materialise_trial_ranking(ctx, params, read_records(Path(ctx.sweep_dir) / CACHE_DIR / RECORDS_NAME))
    inter = resolve_under(ctx.project_dir, base.paths.models) / "inter" / "model.pt"
    if params.intra.init == "inter":
        (trial_dir / "models" / "inter").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(inter, trial_dir / "models" / "inter" / "model.pt")
    run_id = trial_child_run(ctx, base.sweep.name, trial_id, config)
    job = StageJob(params=params.model_dump(mode="json"), stage=STAGE, project_dir=ctx.project_dir,
                   tracking_uri=ctx.tracking_uri, run_id=run_id, progress=False)
    # Ray Train's default 60 s for starting workers is short on a busy laptop where trial
    # processes import torch side by side; the driver's value reaches controller and workers.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKER_START_TIMEOUT_S))
    workers = params.engine.workers
    resources = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        resources["GPU"] = workers.gpus_per_worker
    trainer = TorchTrainer(
        _trial_worker, train_loop_config=dataclasses.asdict(job),
        scaling_config=ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"intra-{trial_id}", storage_path=str(trial_dir / "train"),
                             callbacks=[TuneReportCallback()]))
    trainer.fit()
    from mlflow import MlflowClient
    MlflowClient(ctx.tracking_uri).set_terminated(run_id, "FINISHED")


def _trial_worker(config: dict) -> None:
    """Each Ray Train worker of a trial: the intra stage's worker function, reporting every
    validation (target-val mIoU and the step) to Ray Train, hence to Tune and ASHA."""
    import ray.train
    import ray.train.torch
    from segshift.components.engine.loop import Runtime
    from segshift.pipelines.runtime import StageJob, mlflow_logger, train_worker
    job = StageJob(**config)
    context = ray.train.get_context()
    runtime = Runtime(rank=context.get_world_rank(), world_size=context.get_world_size(),
                      device=ray.train.torch.get_device())
    log = mlflow_logger(job) if runtime.is_main else (lambda metrics, step: None)

    def report(metrics: dict[str, float], step: int) -> None:
        ray.train.report({**{k: float(v) for k, v in metrics.items()}, "step": step})
    train_worker(job, runtime, log, on_validation=report)


# -- the sweep ------------------------------------------------------------------------------------

def storage(params: Params, project_dir: Path, directory: Path) -> tuple[str, Any]:
    """(Tune storage path, pyarrow filesystem or None): `sweep.storage_path` (a path or s3://)
    or `<sweep>/tune`."""
    return ray_storage(params, project_dir, params.sweep.storage_path or str(directory / "tune"))


def _scheduler(params: Params):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    cfg = params.sweep
    if cfg.scheduler.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=cfg.iterations, grace_period=cfg.scheduler.grace_period,
                         reduction_factor=cfg.scheduler.reduction_factor)


def _searcher(params: Params):
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=params.sweep.seed))


def sweep_key(params: Params, model_sha: str, manifest_sha: str) -> str:
    """What a resumed sweep must match: its settings, what a trial re-runs, and its inputs."""
    settings = {name: getattr(params, name).model_dump(mode="json") for name in ("sweep", "rank", "intra")}
    return derive.identity({**settings, "model": model_sha, "data": manifest_sha}, 16)


def parent_run(params: Params, project_dir: Path, key: str, resume: bool) -> tuple[str, str, str]:
    """(tracking uri, experiment id, parent run id): a resumed sweep continues its parent."""
    from mlflow import MlflowClient
    from segshift.pipelines.tracking import (TAG_ROLE, TAG_STAGE, ensure_experiment, flatten_params,
                                             log_flat_params, resolve_tracking_uri)
    uri = resolve_tracking_uri(params.tracking, project_dir)
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, params.tracking.experiment, uri)
    if resume:
        found = client.search_runs([experiment], f"tags.`{TAG_SWEEP_KEY}` = '{key}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return uri, experiment, found[0].info.run_id
    run = client.create_run(experiment, run_name=f"sweep {params.sweep.name}", tags={
        TAG_ROLE: "sweep", TAG_STAGE: "sweep", TAG_SWEEP: params.sweep.name, TAG_SWEEP_KEY: key})
    tree = {"sweep": params.sweep.model_dump(mode="json"), "rank": params.rank.model_dump(mode="json"),
            "intra": params.intra.model_dump(mode="json")}
    log_flat_params(client, run.info.run_id, flatten_params(tree))
    return uri, experiment, run.info.run_id


def make_tuner(params: Params, ctx: SweepContext, resume: bool):
    from ray import tune
    path, fs = storage(params, Path(ctx.project_dir), Path(ctx.sweep_dir))
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=dataclasses.asdict(ctx)),
                                    TRIAL_DRIVER_RESOURCES)
    experiment = f"{path.rstrip('/')}/{params.sweep.name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        if not resume:
            raise SweepError(f"sweep '{params.sweep.name}' already has Tune state at "
                             f"{params.sweep.storage_path or experiment}: pass --resume to continue "
                             "it or --fresh to discard it and start again")
        return tune.Tuner.restore(experiment, trainable, resume_errored=True, storage_filesystem=fs)
    if resume:
        raise SweepError(f"nothing to resume: no Tune state for sweep '{params.sweep.name}' at "
                         f"{params.sweep.storage_path or experiment}")
    cfg = params.sweep
    return tune.Tuner(
        trainable, param_space=tune_space(cfg.space),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=cfg.num_samples,
                                    max_concurrent_trials=cfg.max_concurrent_trials,
                                    search_alg=_searcher(params), scheduler=_scheduler(params)),
        run_config=tune.RunConfig(name=cfg.name, storage_path=path, storage_filesystem=fs,
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=0)))


def discard_previous(params: Params, project_dir: Path, directory: Path) -> None:
    """--fresh: remove the previous Tune state and trial directories (the cache is kept)."""
    path, fs = storage(params, project_dir, directory)
    experiment = f"{path.rstrip('/')}/{params.sweep.name}"
    if fs is None:
        shutil.rmtree(experiment, ignore_errors=True)
    else:
        try:
            fs.delete_dir(experiment)
        except (FileNotFoundError, OSError):
            pass
    shutil.rmtree(directory / "trials", ignore_errors=True)


def check_trial_fits(params: Params) -> None:
    """On a local Ray instance, a trial whose workers need more than the machine has would wait
    for them until Ray Train's start timeout; say so at once."""
    from segshift.pipelines.cluster import local_shortfall
    cfg = params.sweep
    short = local_shortfall(params, {"CPU": cfg.workers_per_trial * cfg.cpus_per_worker,
                                     "GPU": cfg.workers_per_trial * cfg.gpus_per_worker})
    if short:
        resource, need, have = short
        raise SweepError(
            f"a trial needs sweep.workers_per_trial x {resource.lower()}s_per_worker = {need:g} "
            f"{resource}s but the local Ray instance has {have:g}; lower them "
            "(or raise ray.local_num_cpus, or use a cluster: ray.address)")


def check_complete(results, params: Params) -> None:
    """Tune returns normally after Ctrl-C, with its state saved and some trials unfinished: that is
    an interruption to resume, not a sweep to report on."""
    ended = results.num_terminated + results.num_errors
    if ended < max(len(results), params.sweep.num_samples):
        raise KeyboardInterrupt(f"{ended} of {params.sweep.num_samples} trials of sweep '{params.sweep.name}' "
                                "ended; continue with `segshift sweep --resume`")


def trial_rows(results, params: Params) -> list[dict]:
    """One row per trial: its values, best val mIoU (any report), steps run and state."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        config = {k: v for k, v in (result.config or {}).items() if k in params.sweep.space}
        best = float(history[METRIC].max()) if history is not None and METRIC in history else math.nan
        steps = int(history["step"].max()) if history is not None and "step" in history else 0
        state = "error" if result.error else ("finished" if steps >= params.sweep.iterations else "stopped")
        rows.append({"trial_id": _trial_id(result),
                     "config": config, METRIC: best, "steps": steps, "state": state,
                     "reports": 0 if history is None else int(len(history))})
    return sorted(rows, key=lambda r: -r[METRIC] if math.isfinite(r[METRIC]) else math.inf)


def _trial_id(result) -> str:
    metrics = result.metrics or {}
    return str(metrics.get("trial_id") or Path(result.path).name)


def close_trial_runs(ctx: SweepContext, rows: list[dict]) -> None:
    """Trial runs whose process Tune ended (ASHA) or that failed are closed here: FINISHED when
    the trial ran all its steps, KILLED when stopped early, FAILED on an error."""
    from mlflow import MlflowClient
    client = MlflowClient(ctx.tracking_uri)
    states = {r["trial_id"]: r["state"] for r in rows}
    runs = client.search_runs([ctx.experiment_id], f"tags.`mlflow.parentRunId` = '{ctx.parent_run_id}'",
                              max_results=10000)
    for run in runs:
        state = states.get(run.data.tags.get(TAG_TRIAL, ""))
        if state is None:
            continue
        client.set_tag(run.info.run_id, TAG_TRIAL_STATE, state)
        if run.info.status == "RUNNING":
            # Tune ends a trial's process when ASHA stops it, also at its last step (max_t)
            client.set_terminated(run.info.run_id, {"finished": "FINISHED", "stopped": "KILLED"}.get(state, "FAILED"))


def evaluate_best(ctx: SweepContext, params: Params, trial_id: str) -> dict:
    """The best trial's selected checkpoint on target test."""
    from segshift.components.data.dataset import PreparedSplit
    from segshift.components.engine.loop import resolve_device
    from segshift.components.evaluation import evaluate
    from segshift.pipelines.stage_model import load_stage_model
    checkpoint = Path(ctx.sweep_dir) / "trials" / trial_id / "checkpoints" / STAGE / "best.pt"
    device = resolve_device(params.engine.device)
    model = load_stage_model(checkpoint, params).to(device)
    test = PreparedSplit(prepared_dir(params, ctx.project_dir) / "target", "test")
    return evaluate(model, test, params.engine.eval_batch_size, device).summary()


def summary_markdown(summary: dict) -> str:
    keys = list(summary["space"])
    lines = [f"# Sweep `{summary['name']}`", "",
             f"{summary['trials']} trials, {summary['finished']} finished, {summary['stopped']} stopped "
             f"early by {summary['scheduler']}, {summary['errors']} failed; {summary['steps_run']} "
             f"training steps of {summary['steps_budget']} without early stopping; "
             f"{summary['seconds']:.0f} s.", "",
             f"Best trial `{summary['best']['trial_id']}`: target-val mIoU "
             f"{100 * summary['best'][METRIC]:.1f}, target-test mIoU {100 * summary['best']['test']['miou']:.1f}.",
             "", "| trial | " + " | ".join(keys) + " | val mIoU | steps | state |",
             "|---|" + "---|" * len(keys) + "---|---|---|"]
    for row in summary["rows"]:
        values = " | ".join(_fmt(row["config"].get(k)) for k in keys)
        lines.append(f"| {row['trial_id']} | {values} | {100 * row[METRIC]:.1f} | {row['steps']} | {row['state']} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value)


def run_sweep(params: Params, project_dir: Path, resume: bool = False, fresh: bool = False,
              progress: bool = True) -> dict:
    from segshift.pipelines.cluster import connect_ray
    from segshift.pipelines.sweep_report import write_pictures
    project_dir = project_dir.resolve()
    inputs = check_sweep_inputs(params, project_dir)
    directory = sweep_dir(params, project_dir)
    if fresh and resume:
        raise SweepError("--fresh and --resume exclude each other")
    if fresh:
        discard_previous(params, project_dir, directory)
    start = time.perf_counter()
    connect_ray(params)
    check_trial_fits(params)
    manifest_sha, model_sha = ranking_cache(params, inputs, directory, progress)
    key = sweep_key(params, model_sha, manifest_sha)
    uri, experiment, parent = parent_run(params, project_dir, key, resume)
    ctx = SweepContext(params=params.model_dump(mode="json"), project_dir=str(project_dir),
                       sweep_dir=str(directory), tracking_uri=uri, experiment_id=experiment,
                       parent_run_id=parent, manifest_sha=manifest_sha, model_sha=model_sha)
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    try:
        tuner = make_tuner(params, ctx, resume)
        results = tuner.fit()
        check_complete(results, params)
        rows = trial_rows(results, params)
        close_trial_runs(ctx, rows)
        finite = [r for r in rows if math.isfinite(r[METRIC])]
        if not finite:
            raise SweepError(f"no trial of sweep '{params.sweep.name}' reported {METRIC}; see the "
                             f"trial errors under {directory / 'trials'}")
        best = finite[0]
        best_test = evaluate_best(ctx, params, best["trial_id"])
        summary = {
            "name": params.sweep.name, "space": {k: v.model_dump(mode="json") for k, v in params.sweep.space.items()},
            "scheduler": params.sweep.scheduler.name, "trials": len(rows),
            "finished": sum(r["state"] == "finished" for r in rows),
            "stopped": sum(r["state"] == "stopped" for r in rows),
            "errors": sum(r["state"] == "error" for r in rows),
            "steps_run": sum(r["steps"] for r in rows),
            "steps_budget": len(rows) * params.sweep.iterations,
            "seconds": round(time.perf_counter() - start, 1),
            "best": {"trial_id": best["trial_id"], "config": best["config"], METRIC: best[METRIC],
                     "test": best_test},
            "rows": rows,
        }
        best_file = directory / "best_params.yaml"
        shown = best_file.relative_to(project_dir) if best_file.is_relative_to(project_dir) else best_file
        outputs = [
            atomic_write_text(best_file, f"# best of sweep '{params.sweep.name}' (target-val mIoU "
                                         f"{best[METRIC]:.4f}); apply with: segshift preset {shown}\n"
                                         + yaml.safe_dump(as_overlay(best["config"]), sort_keys=True)),
            atomic_write_text(directory / "summary.json", strict_json(summary)),
            atomic_write_text(directory / "summary.md", summary_markdown(summary)),
            *write_pictures(rows, params, directory),
        ]
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in {
            "best_val_miou": best[METRIC], "best_test_miou": best_test["miou"],
            "steps_run": summary["steps_run"], "trials": len(rows)}.items()])
        for path in outputs:
            client.log_artifact(parent, str(path), "sweep")
        client.set_terminated(parent, "FINISHED")
        return summary
    except KeyboardInterrupt:
        client.set_terminated(parent, "KILLED")
        raise
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise


def _cmd_sweep(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    summary = run_sweep(params, Path.cwd(), resume=args.resume, fresh=args.fresh, progress=not args.quiet)
    best = summary["best"]
    print(f"sweep {summary['name']}: {summary['trials']} trials ({summary['stopped']} stopped early); "
          f"best {best['trial_id']} val mIoU {100 * best[METRIC]:.1f}, test mIoU "
          f"{100 * best['test']['miou']:.1f} with {json.dumps(best['config'])}; wrote "
          f"{params.sweep.out_dir}/{params.sweep.name}/best_params.yaml and summary.md")
    return 0


def build_sweep_parser(sub, add_params) -> None:
    parser = sub.add_parser("sweep", help="Ray Tune + Optuna sweep over rank/intra params, reusing the "
                                          "inter model and the ranking inference")
    add_params(parser)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    group.add_argument("--fresh", action="store_true", help="discard a previous sweep of the same name")
    parser.set_defaults(func=_cmd_sweep)
