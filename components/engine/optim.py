"""Optimisers with the reference's parameter groups, and the poly learning-rate schedule."""
from __future__ import annotations

from torch import nn
from torch.optim import SGD, Adam, Optimizer

from segshift.components.config import OptimizerConfig


def segmentation_param_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict]:
    """Backbone at `lr`, heads at `head_lr_mult` x `lr` (DeepLab/ADVENT train heads at 10x)."""
    heads = list(model.head_parameters()) if hasattr(model, "head_parameters") else []
    head_ids = {id(p) for p in heads}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    groups = [{"params": [p for p in backbone if p.requires_grad], "lr": lr, "lr_mult": 1.0},
              {"params": [p for p in heads if p.requires_grad], "lr": lr * head_lr_mult,
               "lr_mult": head_lr_mult}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: list[dict] | nn.Module, cfg: OptimizerConfig) -> Optimizer:
    if isinstance(params, nn.Module):
        params = [{"params": [p for p in params.parameters() if p.requires_grad], "lr": cfg.lr,
                   "lr_mult": 1.0}]
    if cfg.name == "sgd":
        return SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    return base_lr * (1.0 - min(step, total_steps) / total_steps) ** power


def set_poly_lr(optimizer: Optimizer, base_lr: float, step: int, total_steps: int, power: float) -> float:
    """Apply the poly schedule to every group, keeping each group's multiplier; return the base LR."""
    lr = poly_lr(base_lr, step, total_steps, power)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr
