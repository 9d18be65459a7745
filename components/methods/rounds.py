"""Methods that train in rounds, with labelling between the rounds: what they share.

A round is an ordinary run of the engine (`Round`: its step, data and starting weights, its own
checkpoints under `<checkpoints>/<stage>/<round>/`). A round method's `rounds(context)` (in its own
module: `lse.rounds`, `fda.rounds`, `labor.rounds`) decides the rounds, and between them predicts
target train with the latest model and writes the next round's labels, through a `RoundContext`
that the pipeline implements (pipelines/rounds.py: training on Ray workers, MLflow, S3). It returns
what labelling cost (the stage's `extra` metrics); the pipeline then selects the stage's model among
the rounds that trained a segmentation model.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from segshift.components.losses import upsample
from segshift.components.paths import confined

if TYPE_CHECKING:
    from segshift.components.config import AdaptationStageConfig, Params
    from segshift.components.data.dataset import PreparedSplit


class StageInputError(ValueError):
    """Inputs of a stage that cannot work; raised before any training starts."""


@dataclass(frozen=True)
class Round:
    """One training run of a stage that trains in rounds (LSE, LabOR, FDA's multi-band ensemble).

    Between rounds the method's `rounds` predicts, selects and writes labels; a round is then an
    ordinary training run of `method` (one of the stage method's `MethodSpec.steps`) on the engine,
    with its own checkpoints. `data` maps each role to {"domain": "source" | "target", "ids": [...]
    or None (all of train), "labels_dir": a directory of <id>.png labels replacing the manifest's,
    or None}. Paths are relative to the stage's checkpoint directory, which travels to other
    machines (S3) whole.
    """

    name: str                  # also the checkpoint sub-directory
    method: str                # the step it trains: lse | fda | labor-selector | labor-model
    iterations: int
    step_offset: int           # where its steps start in the stage's MLflow history
    data: dict[str, dict]
    init: str | None = None    # the model file it starts from (e.g. round-1/best.pt); None = stage `init`
    beta: float | None = None  # fda: this round's window


class RoundContext(Protocol):
    """What a round method needs from the pipeline that runs its stage (pipelines.rounds.RoundRunner)."""

    params: Params                   # the validated params
    cfg: AdaptationStageConfig       # the stage's settings
    stage: str                       # the stage's name (inter)
    stage_dir: Path                  # where every round keeps its checkpoints and labels
    prepared: Path                   # the prepared data (source/, target/) on this machine
    device: torch.device
    progress: bool                   # show progress bars

    @property
    def target_train(self) -> PreparedSplit: ...

    @property
    def image_size(self) -> tuple[int, int]: ...

    def path(self, relative: str) -> Path:
        """A project path (params' `paths.*`, `methods.labor.annotations`) on this machine."""

    def labelled_before(self, name: str) -> dict | None:
        """The saved round (`{"round": Round as dict, "report": ...}`) if its labels were written for these settings."""

    def save_round(self, spec: Round, report: dict, files: list[Path]) -> None:
        """Remember the round's labels as written (its report, its label files) before it trains."""

    def round_spec(self, name: str, method: str, iterations: int, data: dict, init: str | None,
                   beta: float | None = None) -> Round:
        """The round's spec, its steps continuing the stage's history."""

    def train(self, spec: Round, candidate: bool = True) -> dict:
        """Train the round (resuming from its checkpoint); its summary. `candidate`: its model may
        be selected as the stage's (False for models that are not segmentation models of the stage)."""

    def model(self, init: str | None) -> torch.nn.Module:
        """A round's starting network (None: the stage's init), on the device, in eval mode."""

    def predict(self, models: list[torch.nn.Module], desc: str) -> Iterator[tuple[list[str], list]]:
        """(sample ids, each model's output) for target train in batches, without gradients."""

    def write_labels(self, name: str, labels: Mapping[str, np.ndarray]) -> list[Path]:
        """Write the round's label maps under `<stage_dir>/<name>/labels/`; the files written."""

    def need_images(self, name: str, ids: list[str]) -> None:
        """Refuse a round with fewer labelled target images than a batch."""

    def log(self, metrics: dict[str, float]) -> None:
        """Log metrics at the stage's current step."""

    def log_artifact(self, path: Path, folder: str) -> None:
        """Keep a file with the stage's run."""


def split_iterations(total: int, rounds: int) -> list[int]:
    """`total` steps over `rounds` rounds, as evenly as possible, every round at least one step."""
    base, extra = divmod(max(total, rounds), rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def label_file(labels_dir: Path, sample_id: str) -> Path:
    """A round's label map of one image (sample ids may contain '/': city sub-directories, but
    never lead out of `labels_dir`)."""
    return confined(labels_dir, f"{sample_id}.png", "sample id")


def source_and_target(labels_dir: str | None = None, ids: list[str] | None = None,
                      target_role: str = "unlabelled") -> dict:
    """A round's data: all of source train with labels, and target train in `target_role`."""
    data = {"labelled": {"domain": "source", "ids": None, "labels_dir": None}}
    data[target_role] = {"domain": "target", "ids": ids, "labels_dir": labels_dir}
    return data


def probabilities(output, size: tuple[int, int]) -> torch.Tensor:
    """A model's main-head softmax at `size`."""
    return upsample(output.main.float(), size).softmax(1)
