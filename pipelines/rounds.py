"""Stages that train in rounds, with labelling between the rounds (`inter.method: lse | labor`,
and `fda` with `methods.fda.ensemble_betas`): the generic round runner.

A round is an ordinary run of the engine (`Round`: its method, data and starting weights, its own
checkpoints under `<checkpoints>/<stage>/<round>/`). What happens between the rounds is the
method's: its `rounds(context)` (found in components/methods/registry.py, written in the method's
own module) predicts target train with the latest model and writes the next round's labels beside
those checkpoints, through the `RoundContext` this module implements (`RoundRunner`: training on
the engine / Ray workers, MLflow, S3).

A round whose labels were written (round.json) is not labelled again, and its training resumes
from its checkpoint, so an interrupted stage picks up where it stopped.

The stage's model is the best, by `engine.selection` on target val, of the segmentation models
its rounds trained (rounds trained with `candidate=False`, such as LabOR's pixel selectors, are
not candidates), the rule the engine applies to the checkpoints of a single run. Self-training can
confirm its own mistakes: on the built-in data one LSE seed lost 4.5 val points from its first
round to its fourth, and reporting the last round would report that drift rather than the
method's best model.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from segshift.components import derive
from segshift.components.data.dataset import PreparedSplit
from segshift.components.engine.loop import Selection, resolve_device
from segshift.components.io import atomic_write_text, write_png
from segshift.components.methods.registry import method_spec, stage_method
from segshift.components.methods.rounds import Round, StageInputError, label_file
from segshift.pipelines.remote import push
from segshift.pipelines.runtime import StageJob, initial_model, run_workers, stage_config
from segshift.pipelines.stage_model import load_stage_model

ROUND_FILE = "round.json"


# -- shared machinery -------------------------------------------------------------------------------

def stage_identity(job: StageJob) -> str:
    """What a round's labels depend on besides the model it starts from: the stage's settings."""
    params = job.config
    return derive.identity({"stage": stage_config(params, job.stage).model_dump(mode="json"),
                            "methods": params.methods.model_dump(mode="json"),
                            "model": params.model.model_dump(mode="json"), "seed": params.engine.seed}, 16)


class RoundRunner:
    """Trains rounds one after another and remembers which were labelled already: the pipeline's
    `RoundContext` (components/methods/rounds.py), through which a method's `rounds` runs."""

    def __init__(self, job: StageJob, tracker):
        self.job, self.tracker = job, tracker
        self.params = job.config
        self.stage = job.stage
        self.cfg = stage_config(self.params, job.stage)
        self.stage_dir = job.stage_checkpoint_dir
        self.progress = job.progress
        self.device = resolve_device(self.params.engine.device)
        self.identity = stage_identity(job)
        self.offset = 0
        self.candidates: list[tuple[str, StageJob, dict]] = []   # rounds that train the stage's model
        self.earlier_seconds = 0.0      # training time of every round, spent before this run resumed
        self.val_curve: list[dict] = []  # every candidate round's validations, on the stage's step axis
        job.pull_checkpoints()

    def labelled_before(self, name: str) -> dict | None:
        """The saved round (and what labelling it reported) if its labels were written for these settings."""
        path = self.stage_dir / name / ROUND_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        return saved if saved.get("identity") == self.identity else None

    def save_round(self, spec: Round, report: dict, files: list[Path]) -> None:
        path = self.stage_dir / spec.name / ROUND_FILE
        atomic_write_text(path, json.dumps({"identity": self.identity, "round": dataclasses.asdict(spec),
                                            "report": report}, indent=1))
        push(self.params, self.job.project_dir, self.params.paths.checkpoints, files=[*files, path])

    def train(self, spec: Round, candidate: bool = True) -> dict:
        job = dataclasses.replace(self.job, round=dataclasses.asdict(spec))
        summary = run_workers(job, self.tracker.log_metrics)
        self.offset = spec.step_offset + spec.iterations
        self.earlier_seconds += summary.get("earlier_seconds", 0.0)
        if candidate:
            self.candidates.append((spec.name, job, summary))
            self.val_curve += [{**point, "step": spec.step_offset + point["step"], "round": spec.name}
                               for point in summary.get("val_curve", [])]
        return summary

    def round_spec(self, name: str, method: str, iterations: int, data: dict, init: str | None,
                   beta: float | None = None) -> Round:
        return Round(name=name, method=method, iterations=iterations, step_offset=self.offset,
                     data=data, init=init, beta=beta)

    @property
    def prepared(self) -> Path:
        return self.job.prepared

    def path(self, relative: str) -> Path:
        return self.job.path(relative)

    def model(self, init: str | None) -> torch.nn.Module:
        """A round's starting network (None: the stage's init), on the device, in eval mode."""
        model = load_stage_model(self.stage_dir / init, self.params) if init else initial_model(self.job)
        return model.to(self.device).eval()

    @functools.cached_property
    def target_train(self) -> PreparedSplit:
        """Target train images (the manifest is read once per stage, not once per pass)."""
        return PreparedSplit(self.prepared / "target", "train", need_labels=False)

    @functools.cached_property
    def image_size(self) -> tuple[int, int]:
        """The one (height, width) of target train: labels are written at image size."""
        sizes = self.target_train.sizes
        if len(sizes) != 1:
            raise StageInputError(f"{self.job.stage}: target train images have {len(sizes)} sizes; "
                                  "resize them when preparing to train in rounds")
        return next(iter(sizes))

    def predict(self, models: list[torch.nn.Module], desc: str) -> Iterator[tuple[list[str], list]]:
        """(sample ids, each model's output) for target train in batches, without gradients."""
        dataset = self.target_train
        loader = DataLoader(dataset, batch_size=self.params.engine.eval_batch_size, shuffle=False)
        start = 0
        with torch.inference_mode():
            for images, _ in tqdm(loader, desc=desc, disable=not self.progress, dynamic_ncols=True):
                ids = [row["sample_id"] for row in dataset.rows[start:start + len(images)]]
                start += len(images)
                images = images.to(self.device)
                yield ids, [model(images) for model in models]

    def write_labels(self, name: str, labels: Mapping[str, np.ndarray]) -> list[Path]:
        out = self.stage_dir / name / "labels"
        files = []
        for sample_id, label in labels.items():
            path = label_file(out, sample_id)
            write_png(path, np.asarray(label, np.uint8))
            files.append(path)
        return files

    def need_images(self, name: str, ids: list[str]) -> None:
        if len(ids) < self.cfg.batch_size:
            raise StageInputError(f"{self.job.stage}, round {name}: {len(ids)} target images were "
                                  f"labelled, fewer than {self.job.stage}.batch_size = {self.cfg.batch_size}")

    def log(self, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.offset)

    def log_artifact(self, path: Path, folder: str) -> None:
        if self.tracker is not None:
            self.tracker.log_artifact(path, folder)


def run_rounds(job: StageJob, tracker) -> tuple[StageJob, dict]:
    """Train the stage's rounds (its method's `rounds`, found in the registry); returns the job of
    the round selected on val (its best.pt is the stage's model) and its training summary, with
    what labelling cost under `extra`."""
    spec = method_spec(stage_method(stage_config(job.config, job.stage)))
    if spec.rounds is None:
        raise StageInputError(f"{job.stage}: method '{spec.name}' does not train in rounds")
    runner = RoundRunner(job, tracker)
    extra = spec.rounds(runner)
    job, selected = select_round(runner.candidates, extra)
    return job, {**selected, "earlier_seconds": runner.earlier_seconds, "val_curve": runner.val_curve}


def select_round(candidates: list[tuple[str, StageJob, dict]], extra: dict) -> tuple[StageJob, dict]:
    """The candidate round whose selected checkpoint scores best on val (the earlier on a tie),
    its summary carrying the stage's `extra` plus `selected_round` and every round's `round_val`."""
    if not candidates:
        raise ValueError("the stage trained no segmentation model in its rounds")
    metric = candidates[0][2]["selection"]["metric"]
    best = Selection(metric=metric)
    chosen = candidates[-1]
    for candidate in candidates:
        value = candidate[2]["selection"]["value"]
        if value is not None and best.improves(value):
            best.value, chosen = value, candidate
    name, job, summary = chosen
    scores = {n: s["selection"]["value"] for n, _, s in candidates}
    return job, {**summary, "extra": {**extra, "selected_round": name, "round_val": {metric: scores}}}
