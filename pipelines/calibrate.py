"""`segshift calibrate`: measure the built-in domain gap (source-only vs oracle vs colour-normalised).

The generator is only useful if adaptation has something to close: a model trained on source
labels must fall well short of one trained on target labels, and whitening each image's colours
(the cheapest possible "adaptation") must not be enough.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from segshift.components.config import Params, load_params
from segshift.components.data.dataset import PreparedSplit
from segshift.components.engine.loop import Runtime, Trainer, resolve_device
from segshift.components.evaluation import evaluate
from segshift.components.io import atomic_write_text
from segshift.components.methods.supervised import Supervised
from segshift.components.models.factory import build_model
from segshift.pipelines.remote import prepared_dir
from segshift.pipelines.runtime import batch_source

# (name, training domain, per-image colour normalisation)
CALIBRATION_RUNS = (("source_only", "source", False), ("oracle", "target", False),
                    ("source_only_colour_norm", "source", True))


def train_quick(params: Params, train: PreparedSplit, desc: str, workdir: Path,
                progress: bool) -> torch.nn.Module:
    """The `source` stage's recipe on the shared engine, shortened to `calibrate.iterations`."""
    cal = params.calibrate
    stage = params.source.model_copy(update={"iterations": cal.iterations, "batch_size": cal.batch_size})
    runtime = Runtime(device=resolve_device(params.engine.device))
    torch.manual_seed(cal.seed)
    method = Supervised(build_model(params.model, endpoint_url=params.storage.s3_endpoint_url), stage)
    trainer = Trainer(method, params.engine, stage.iterations, stage.accumulation,
                      checkpoint_path=workdir / "last.pt", best_path=workdir / "best.pt",
                      fingerprint=f"calibrate-{desc}", runtime=runtime, progress=progress, desc=desc)
    trainer.fit(batch_source({"labelled": train}, stage.batch_size, stage.iterations * stage.accumulation,
                             cal.seed, runtime, params.engine.loader_workers))
    return method.segmenter


def calibrate(params: Params, prepared: Path, progress: bool = True) -> dict:
    results: dict = {}
    device = resolve_device(params.engine.device)
    for name, domain, colour_norm in CALIBRATION_RUNS:
        start = time.perf_counter()
        train = PreparedSplit(prepared / domain, "train", cache=True, flip=params.source.flip,
                              per_image_norm=colour_norm, protocol=params.model.classes)
        test = PreparedSplit(prepared / "target", "test", cache=True, per_image_norm=colour_norm)
        with tempfile.TemporaryDirectory() as workdir:
            model = train_quick(params, train, name, Path(workdir), progress)
        results[name] = evaluate(model, test, params.engine.eval_batch_size, device).summary()
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    oracle = results["oracle"]["miou"]
    results["ratios"] = {name: results[name]["miou"] / oracle
                         for name in ("source_only", "source_only_colour_norm")}
    return results


def _cmd_calibrate(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    results = calibrate(params, prepared_dir(params, Path.cwd()), progress=not args.quiet)
    atomic_write_text(params.calibrate.out, json.dumps(results, indent=2))
    for name in ("source_only", "oracle", "source_only_colour_norm"):
        print(f"{name:26s} target-test mIoU {100 * results[name]['miou']:5.1f}")
    for name, ratio in results["ratios"].items():
        print(f"{name:26s} / oracle = {ratio:.2f}")
    return 0


def build_calibrate_parser(sub, add_params) -> None:
    parser = sub.add_parser("calibrate", help="measure the domain gap of the prepared data")
    add_params(parser)
    parser.set_defaults(func=_cmd_calibrate)
