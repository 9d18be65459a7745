"""The contract between a method (what one step does) and the engine (how steps are run), and
what the pipeline needs of a method (`MethodSpec`, listed in registry.py)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim import Optimizer

from segshift.components.config import OptimizerConfig

if TYPE_CHECKING:
    from segshift.components.config import Params
    from segshift.components.methods.rounds import RoundContext

Batch = dict[str, tuple[torch.Tensor, torch.Tensor]]   # role -> (images, labels or empty)
Backward = Callable[[torch.Tensor], None]


@dataclass
class OptimizerSpec:
    """An optimiser and the schedule the engine applies to it."""

    optimizer: Optimizer
    config: OptimizerConfig


class Method(ABC):
    """Owns the networks and optimisers of one training stage and defines a training step.

    `modules` are checkpointed and (for DDP) wrapped by the engine; a step reads its networks
    from `self.modules` so that it uses the wrapped versions. `backward(loss)` is supplied by the
    engine (AMP scaling, gradient accumulation); the engine zeroes and steps every optimiser.
    """

    #: data roles a step needs, e.g. ("labelled",) or ("labelled", "unlabelled")
    roles: tuple[str, ...] = ("labelled",)

    def __init__(self) -> None:
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, OptimizerSpec] = {}

    def add_segmenter(self, model: nn.Module, optimizer: OptimizerConfig) -> None:
        """Register the segmentation network and its optimiser (heads at `head_lr_mult` x lr)."""
        from segshift.components.engine.optim import build_optimizer, segmentation_param_groups
        self.modules["model"] = model
        groups = segmentation_param_groups(model, optimizer.lr, optimizer.head_lr_mult)
        self.optimizers["model"] = OptimizerSpec(build_optimizer(groups, optimizer), optimizer)

    @property
    def segmenter(self) -> nn.Module:
        """The segmentation network that is validated, selected and exported."""
        model = self.modules["model"]
        return model.module if hasattr(model, "module") else model

    @abstractmethod
    def training_step(self, batch: Batch, step: int, backward: Backward) -> dict[str, torch.Tensor]:
        """Compute the losses of one (micro-)batch, call `backward` on what is optimised, and
        return the detached scalars to log (a 'loss' entry is expected)."""


def check_same_size(images: torch.Tensor, target_images: torch.Tensor, what: str) -> None:
    """Methods that combine a source and a target image pixel by pixel need one size for both."""
    if images.shape[-2:] != target_images.shape[-2:]:
        raise ValueError(f"{what} source {tuple(images.shape[-2:])} and target "
                         f"{tuple(target_images.shape[-2:])} images of different sizes; set the "
                         "stage's crop so both domains are cut to one size")


#: builds a step over `model` from the stage's settings, the params and (in a stage that trains in
#: rounds) the round: `build(model, stage_config, params, round=None) -> Method`
Builder = Callable[..., Method]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the pipeline needs of one method a stage's `method:` may name (its entry in
    components/methods/registry.py); the method's code lives in its own module.

    `build`: the step of a stage that trains in one run (None: the method trains in rounds only).
    `steps`: a round's step by `Round.method` (round methods). `rounds(context)`: trains the
    stage's rounds through a `RoundContext` and returns what labelling cost (the stage's extra
    metrics); `in_rounds(params)` says whether a stage of this method trains in rounds (default:
    whenever it has `rounds`). `bench`: the throughput cases of `segshift bench`, as
    (case name, step name or None for `build`, the stage whose settings it is built with).
    """

    name: str
    build: Builder | None
    steps: Mapping[str, Builder] = field(default_factory=dict)
    rounds: Callable[[RoundContext], dict] | None = None
    in_rounds: Callable[[Params], bool] | None = None
    bench: tuple[tuple[str, str | None, str], ...] | None = None

    def trains_in_rounds(self, params: Params) -> bool:
        return self.rounds is not None and (self.in_rounds is None or self.in_rounds(params))

    def step_builder(self, step: str | None) -> Builder | None:
        """`build` (step None) or the round step named `step`."""
        return self.build if step is None else self.steps.get(step)

    @property
    def bench_cases(self) -> tuple[tuple[str, str | None, str], ...]:
        return self.bench if self.bench is not None else ((self.name, None, "inter"),)

