"""Supervised training on labelled images: the `source` (source labels) and `oracle` (target labels) stages.

One step: forward the labelled batch, cross-entropy on the main head plus `aux_weight` x the
auxiliary heads (logits upsampled to label size), backward. That is all.
"""
from __future__ import annotations

import torch
from torch import nn

from segshift.components.config import SupervisedStageConfig
from segshift.components.losses import segmentation_loss
from segshift.components.methods.base import Backward, Batch, Method, MethodSpec


class Supervised(Method):
    roles = ("labelled",)

    def __init__(self, model: nn.Module, cfg: SupervisedStageConfig):
        super().__init__()
        self.cfg = cfg
        self.add_segmenter(model, cfg.optimizer)

    def training_step(self, batch: Batch, step: int, backward: Backward) -> dict[str, torch.Tensor]:
        images, labels = batch["labelled"]
        losses = segmentation_loss(self.modules["model"](images), labels, self.cfg.aux_weight)
        backward(losses["loss"])
        return {name: value.detach() for name, value in losses.items()}


def build(model: nn.Module, cfg, params, round=None) -> Supervised:
    return Supervised(model, cfg)


METHOD = MethodSpec("supervised", build, bench=(("supervised", None, "source"),))
