"""The contract between a method (what one step does) and the engine (how steps are run)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from segshift.components.config import OptimizerConfig

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
