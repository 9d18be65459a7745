"""`segshift train --stage {source,oracle,inter,intra}`: the training stages.

source / oracle train with labels only (Supervised); inter (source -> target) and intra (easy target
split with pseudo-labels -> hard split) adapt with the method their `method:` names, found in
components/methods/registry.py; methods that train in rounds run through pipelines/rounds.py.

A stage checks its inputs, opens its MLflow run and trains through the shared worker
(pipelines/runtime.py: in this process or on Ray Train). At the end it evaluates the selected
checkpoint (chosen on target val only) on target test and writes the stage's outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from segshift.components.config import Params, load_params
from segshift.components.data.dataset import PreparedSplit
from segshift.components.engine.checkpoint import load_checkpoint, save_checkpoint
from segshift.components.engine.loop import resolve_device
from segshift.components.evaluation import evaluate
from segshift.components.methods import registry
from segshift.components.stages import TRAINING
from segshift.pipelines.rounds import run_rounds
from segshift.pipelines.runtime import StageJob, check_inputs, run_workers, stage_config
from segshift.pipelines.stage_model import load_stage_model


# -- outputs ----------------------------------------------------------------------------------------

def export_model(job: StageJob, best: dict) -> Path:
    params = job.config
    out = job.path(params.paths.models) / job.stage / "model.pt"
    save_checkpoint(out, {"model": best["model"], "model_config": params.model.model_dump(mode="json"),
                          "num_classes": params.model.num_classes, "stage": job.stage, "step": best["step"],
                          "selection": best["selection"], "val": best["metrics"]})
    return out


def finish_stage(job: StageJob, summary: dict, seconds: float, tracker) -> dict:
    """Evaluate the selected checkpoint on target test and write metrics, tables and pictures."""
    from segshift.pipelines.report import write_stage_report
    params = job.config
    best_path = job.checkpoint_dir / "best.pt"
    best = load_checkpoint(best_path)
    model = load_stage_model(best_path, params)
    device = resolve_device(params.engine.device)
    model.to(device)
    test = PreparedSplit(job.prepared / "target", "test", cache=False)
    evaluation = evaluate(model, test, params.engine.eval_batch_size, device, progress=job.progress,
                          desc=f"{job.stage} test")
    model_path = export_model(job, best)
    metrics = {"stage": job.stage, "test": evaluation.summary(), "val": best["metrics"],
               "selected_step": best["step"], "selection": summary["selection"],
               "steps": summary["steps"], "resumed_from": summary["resumed_from"],
               "seconds": round(seconds + summary.get("earlier_seconds", 0.0), 1),
               "speed": summary.get("speed", {}), "val_curve": summary.get("val_curve", []),
               **summary.get("extra", {})}
    write_stage_report(job, metrics, evaluation, model, test, device, tracker)
    if tracker is not None:
        tracker.log_params({"resolved": summary.get("speed", {})})
        # the stage's headline: a round method may report more than its selected model (FDA's
        # ensemble without self-training), as metrics["test"] does
        tracker.log_metrics({f"test_{k}": v for k, v in metrics["test"].items()
                             if isinstance(v, float)}, step=summary["steps"])
        tracker.log_artifact(model_path, "model")
    return metrics


def train_stage(params: Params, stage: str, project_dir: Path, progress: bool = True) -> dict:
    from segshift.pipelines.tracking import StageTracker
    job = StageJob(params=params.model_dump(mode="json"), stage=stage,
                   project_dir=str(Path(project_dir).resolve()), progress=progress)
    check_inputs(job)
    start = time.perf_counter()
    with StageTracker(params, stage=stage, project_dir=job.project_dir) as tracker:
        job = dataclasses.replace(job, tracking_uri=tracker.tracking_uri, run_id=tracker.run_id)
        if trains_in_rounds(params, stage):
            job, summary = run_rounds(job, tracker)
        else:
            summary = run_workers(job, tracker.log_metrics)
        return finish_stage(job, summary, time.perf_counter() - start, tracker)


def trains_in_rounds(params: Params, stage: str) -> bool:
    """LSE, LabOR and FDA's multi-band ensemble: several training runs with labelling between them
    (the method's `MethodSpec.trains_in_rounds`)."""
    return registry.trains_in_rounds(stage_config(params, stage), params)


def _cmd_train(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    metrics = train_stage(params, args.stage, Path.cwd(), progress=not args.quiet)
    test = metrics["test"]
    print(f"{args.stage}: target-test mIoU {100 * test['miou']:.1f} (selected step "
          f"{metrics['selected_step']} on {metrics['selection']['metric']}); "
          f"wrote {params.paths.models}/{args.stage}/model.pt and {params.paths.metrics}/{args.stage}.json")
    return 0


def build_train_parser(sub, add_params) -> None:
    parser = sub.add_parser("train", help=f"train one stage (DVC stages {', '.join(TRAINING)})")
    parser.add_argument("--stage", required=True, choices=TRAINING)
    add_params(parser)
    parser.set_defaults(func=_cmd_train)
