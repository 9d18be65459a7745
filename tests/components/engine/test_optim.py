"""The reference's parameter groups (backbone at lr, heads at head_lr_mult x lr) and the poly schedule."""
import pytest
import torch
from torch import nn
from torch.optim import SGD, Adam

from segshift.components.config import OptimizerConfig
from segshift.components.engine.optim import (build_optimizer, poly_lr, segmentation_param_groups,
                                              set_poly_lr)


def config(**overrides) -> OptimizerConfig:
    return OptimizerConfig(**{"name": "sgd", "lr": 2.5e-4, "momentum": 0.9, "betas": (0.9, 0.99),
                              "weight_decay": 5e-4, "head_lr_mult": 10, "poly_power": 0.9, **overrides})


class TwoPart(nn.Module):
    """A backbone and a head, as the segmentation networks expose them (`head_parameters`)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def head_parameters(self):
        return list(self.head.parameters())


def ids(params) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("step, expected", [
    (0, 0.01),                                  # the base LR
    (50, 0.01 * 0.5 ** 0.9),                    # half way: 0.01 * 0.5^0.9 = 0.0053589...
    (99, 0.01 * 0.01 ** 0.9),                   # the last step the loop runs: 1.5849e-4
    (100, 0.0),                                 # the end of the schedule
    (150, 0.0),                                 # past the end: clamped, never negative or complex
])
def test_poly_lr_by_hand(step, expected):
    assert poly_lr(0.01, step, 100, 0.9) == pytest.approx(expected, rel=1e-12, abs=0)


def test_poly_lr_hand_values_and_power_zero_is_constant():
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.0053589, rel=1e-4)
    assert poly_lr(2.5e-4, 1, 4, 1.0) == pytest.approx(1.875e-4)          # linear: 2.5e-4 * 3/4
    assert poly_lr(2.5e-4, 2, 4, 2.0) == pytest.approx(6.25e-5)           # 2.5e-4 * (1/2)^2
    assert [poly_lr(0.1, s, 10, 0.0) for s in (0, 5, 9)] == [0.1, 0.1, 0.1]
    rates = [poly_lr(0.01, s, 100, 0.9) for s in range(101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))                   # strictly decreasing


def test_heads_get_head_lr_mult_times_the_lr_and_the_groups_split_every_parameter():
    model = TwoPart()
    groups = segmentation_param_groups(model, 2.5e-4, 10)
    assert [(g["lr"], g["lr_mult"]) for g in groups] == [(2.5e-4, 1.0), (pytest.approx(2.5e-3), 10)]
    assert ids(groups[0]["params"]) == ids(model.backbone.parameters())
    assert ids(groups[1]["params"]) == ids(model.head.parameters())


def test_frozen_parameters_are_left_out_and_an_empty_group_is_dropped():
    model = TwoPart()
    model.backbone.weight.requires_grad_(False)
    groups = segmentation_param_groups(model, 1e-3, 10)
    assert ids(groups[0]["params"]) == {id(model.backbone.bias)}
    for p in model.head.parameters():
        p.requires_grad_(False)
    assert [g["lr_mult"] for g in segmentation_param_groups(model, 1e-3, 10)] == [1.0]
    # a network without heads: one group, everything at lr
    plain = nn.Linear(3, 2)
    (only,) = segmentation_param_groups(plain, 1e-3, 10)
    assert only["lr"] == 1e-3 and ids(only["params"]) == ids(plain.parameters())


def test_build_optimizer_is_sgd_or_adam_with_the_configured_hyperparameters():
    model = TwoPart()
    sgd = build_optimizer(segmentation_param_groups(model, 2.5e-4, 10), config())
    assert isinstance(sgd, SGD)
    assert [g["lr"] for g in sgd.param_groups] == [2.5e-4, pytest.approx(2.5e-3)]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in sgd.param_groups)
    adam = build_optimizer(model, config(name="adam", lr=0.002, weight_decay=0.0))
    assert isinstance(adam, Adam)
    (group,) = adam.param_groups                  # a bare module: one group at lr, multiplier 1
    assert group["lr"] == 0.002 and group["betas"] == (0.9, 0.99) and group["lr_mult"] == 1.0
    assert len(group["params"]) == 4


def test_set_poly_lr_keeps_each_groups_multiplier():
    model = TwoPart()
    cfg = config()
    optimizer = build_optimizer(segmentation_param_groups(model, cfg.lr, cfg.head_lr_mult), cfg)
    base = set_poly_lr(optimizer, cfg.lr, 50, 100, cfg.poly_power)
    assert base == pytest.approx(2.5e-4 * 0.5 ** 0.9)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(base), pytest.approx(10 * base)]
    assert set_poly_lr(optimizer, cfg.lr, 100, 100, cfg.poly_power) == 0.0
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]
    # a step at the scheduled LR moves the head 10x as far as the backbone for the same gradient
    sgd = build_optimizer(segmentation_param_groups(model, cfg.lr, cfg.head_lr_mult),
                          config(momentum=0.0, weight_decay=0.0))
    set_poly_lr(sgd, cfg.lr, 50, 100, cfg.poly_power)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    sgd.step()
    moved = {name: before[name] - p.detach() for name, p in model.named_parameters()}
    assert torch.allclose(moved["backbone.weight"], torch.full((4, 3), base), rtol=1e-3)
    assert torch.allclose(moved["head.bias"], torch.full((2,), 10 * base), rtol=1e-3)
    plain = SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0}], lr=1.0)
    assert set_poly_lr(plain, 0.5, 0, 4, 1.0) == 0.5 and plain.param_groups[0]["lr"] == 0.5   # no lr_mult: 1


def test_the_schedule_over_a_four_step_stage():
    """What the training loop sets before step s of n: poly_lr(lr, s, n, power) times the multiplier."""
    model = TwoPart()
    cfg = config(name="adam", lr=0.002, head_lr_mult=1, poly_power=0.9)
    optimizer = build_optimizer(segmentation_param_groups(model, cfg.lr, cfg.head_lr_mult), cfg)
    seen = []
    for step in range(4):
        set_poly_lr(optimizer, cfg.lr, step, 4, cfg.poly_power)
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.002, 0.002 * 0.75 ** 0.9, 0.002 * 0.5 ** 0.9, 0.002 * 0.25 ** 0.9])
    assert seen == pytest.approx([0.002, 0.0015437, 0.0010718, 0.00057435], rel=1e-4)
