"""Output-space adaptation for the `inter` and `intra` stages: ADVENT, AdaptSegNet and MinEnt.

Roles: `labelled` (inter: source train with its labels; intra: the easy target split with its
pseudo-labels) and `unlabelled` (inter: target train; intra: the hard target split).

One step, as in the reference code (Vu et al. 2019; Tsai et al. 2018):

1. Segmentation: cross-entropy on the labelled batch, main head + `aux_weight` x auxiliary head.
2. Alignment of the unlabelled batch, per output level (main; aux when the model has one and its
   weight is > 0), with the logits upsampled to the input size first:
   - `advent`: the level's *weighted self-information map* -p·log p / log C (C channels, not summed)
     goes to that level's discriminator; the network is trained to make it look like a labelled-
     domain map: BCE against the labelled-domain label, x `adv_weight_<level>`;
   - `adaptsegnet`: the same with the softmax map p;
   - `minent`: no discriminator; x `entropy_weight_<level>` the mean normalised entropy.
3. Discriminators (fresh for each stage): labelled-domain maps (detached) labelled 0, unlabelled
   maps labelled 1, BCE / 2 each.

During step 2 the discriminators are frozen and called unwrapped: they must not collect gradients
from the network's adversarial loss, and a DDP wrapper would wait for gradients that never come.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from segshift.components.config import AdaptationStageConfig
from segshift.components.data.labels import NUM_CLASSES
from segshift.components.engine.loop import unwrap
from segshift.components.engine.optim import build_optimizer
from segshift.components.losses import normalised_entropy, segmentation_loss, upsample
from segshift.components.methods.base import Backward, Batch, Method, MethodSpec, OptimizerSpec
from segshift.components.models.base import SegOutput
from segshift.components.models.discriminator import FCDiscriminator

LABELLED_DOMAIN, UNLABELLED_DOMAIN = 0.0, 1.0


def self_information(probs: torch.Tensor) -> torch.Tensor:
    """ADVENT's discriminator input: -p·log p / log C per class channel, in [0, 1/e·log C]."""
    return -probs * torch.log(probs.clamp_min(1e-30)) / math.log(probs.shape[1])


def output_levels(out: SegOutput) -> dict[str, torch.Tensor]:
    """The logits a multi-level method adapts: `main` and, if the network has one, `aux`."""
    levels = {"main": out.main}
    if out.aux:
        levels["aux"] = out.aux[0]
    return levels


def domain_loss(logits: torch.Tensor, domain: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), domain))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


class OutputSpaceAdaptation(Method):
    roles = ("labelled", "unlabelled")

    def __init__(self, model: nn.Module, cfg: AdaptationStageConfig, num_classes: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.add_segmenter(model, cfg.optimizer)
        if cfg.method != "minent":   # discriminators see the head's C channels (16 for synthia16)
            self._add_discriminators(num_classes or getattr(model, "num_classes", NUM_CLASSES))

    def _add_discriminators(self, num_classes: int) -> None:
        """One output-space discriminator, with its optimiser, per level whose weight is > 0."""
        d_cfg = self.cfg.discriminator
        for level, weight in self.level_weights.items():
            if weight > 0:
                disc = FCDiscriminator(num_classes, d_cfg.ndf)
                self.modules[f"d_{level}"] = disc
                self.optimizers[f"d_{level}"] = OptimizerSpec(build_optimizer(disc, d_cfg.optimizer),
                                                              d_cfg.optimizer)

    @property
    def level_weights(self) -> dict[str, float]:
        if self.cfg.method == "minent":
            return {"main": self.cfg.entropy_weight_main, "aux": self.cfg.entropy_weight_aux}
        return {"main": self.cfg.adv_weight_main, "aux": self.cfg.adv_weight_aux}

    def discriminator_input(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        probs = upsample(logits, size).float().softmax(1)
        return self_information(probs) if self.cfg.method == "advent" else probs

    def training_step(self, batch: Batch, step: int, backward: Backward) -> dict[str, torch.Tensor]:
        model = self.modules["model"]
        images, labels = batch["labelled"]
        target_images, _ = batch["unlabelled"]
        size = tuple(target_images.shape[-2:])

        labelled_out = model(images)
        logs = segmentation_loss(labelled_out, labels, self.cfg.aux_weight)
        backward(logs["loss"])

        weights = {level: w for level, w in self.level_weights.items() if w > 0}
        # Without an alignment loss the target pass only updates BatchNorm statistics; no graph is
        # built, so DDP does not wait for a backward that never comes.
        with torch.set_grad_enabled(bool(weights)):
            target_levels = output_levels(model(target_images))
        weights = {level: w for level, w in weights.items() if level in target_levels}
        align = self._alignment_losses(target_levels, weights, size)
        if align:
            total = sum(weights[level] * loss for level, loss in align.items())
            backward(total)
            logs["loss"] = logs["loss"] + total.detach()
            logs.update({f"{self._align_name}_{level}": loss for level, loss in align.items()})
        if self.cfg.method != "minent":
            logs.update(self._discriminator_step(output_levels(labelled_out), target_levels, weights,
                                                 tuple(images.shape[-2:]), size, backward))
        return {name: value.detach() for name, value in logs.items()}

    @property
    def _align_name(self) -> str:
        return "entropy" if self.cfg.method == "minent" else "adv"

    def _alignment_losses(self, target_levels: dict[str, torch.Tensor], weights: dict[str, float],
                          size: tuple[int, int]) -> dict[str, torch.Tensor]:
        losses = {}
        for level in weights:
            if self.cfg.method == "minent":
                probs = upsample(target_levels[level], size).float().softmax(1)
                losses[level] = normalised_entropy(probs).mean()
            else:
                with frozen(unwrap(self.modules[f"d_{level}"])) as disc:
                    verdict = disc(self.discriminator_input(target_levels[level], size))
                losses[level] = domain_loss(verdict, LABELLED_DOMAIN)
        return losses

    def _discriminator_step(self, labelled_levels: dict[str, torch.Tensor],
                            target_levels: dict[str, torch.Tensor], weights: dict[str, float],
                            labelled_size: tuple[int, int], target_size: tuple[int, int],
                            backward: Backward) -> dict[str, torch.Tensor]:
        logs = {}
        for level in weights:
            disc = self.modules[f"d_{level}"]
            real = self.discriminator_input(labelled_levels[level].detach(), labelled_size)
            loss_real = domain_loss(disc(real), LABELLED_DOMAIN) / 2
            backward(loss_real)
            fake = self.discriminator_input(target_levels[level].detach(), target_size)
            loss_fake = domain_loss(disc(fake), UNLABELLED_DOMAIN) / 2
            backward(loss_fake)
            logs[f"d_{level}"] = loss_real.detach() + loss_fake.detach()
        return logs


def build(model: nn.Module, cfg: AdaptationStageConfig, params, round=None) -> OutputSpaceAdaptation:
    """ADVENT, AdaptSegNet and MinEnt share one step; the stage's `method` names the variant."""
    return OutputSpaceAdaptation(model, cfg)


METHODS = tuple(MethodSpec(name, build) for name in ("advent", "adaptsegnet", "minent"))
