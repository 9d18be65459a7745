"""Every method a stage's `method:` may name, found by name: one line per method.

A method's code (its step, and for round methods its rounds, selection, labelling and annotators)
lives in its own module or package; its `MethodSpec` (base.py) tells the pipeline how to build its
step and, for round methods, how to run its rounds. Adding a method: its file(s), its config block
(`methods.<name>` and the `AdaptationMethod` Literal in config.py) and one line here.
"""
from __future__ import annotations

from torch import nn

from segshift.components.methods import advent, dacs, fda, labor, lse, supervised
from segshift.components.methods.base import Method, MethodSpec
from segshift.components.methods.rounds import Round, StageInputError

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    supervised.METHOD,
    *advent.METHODS,      # advent, adaptsegnet, minent: one step, three variants
    dacs.METHOD,
    fda.METHOD,
    lse.METHOD,
    labor.METHOD,
)}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise StageInputError(f"unknown method '{name}'; expected one of {list(METHODS)}") from None


def stage_method(cfg) -> str:
    """The method a stage's settings name (`source` and `oracle` train supervised)."""
    return getattr(cfg, "method", "supervised")


def build_method(model: nn.Module, cfg, params, round: Round | None = None) -> Method:
    """The step of a stage (`cfg`: its settings) over `model`: the stage method's `build`, or in a
    stage that trains in rounds, the step the round names (`round.method`)."""
    spec = method_spec(stage_method(cfg))
    if round is not None:
        step = spec.steps.get(round.method)
        if step is None:
            raise StageInputError(f"round {round.name}: unknown round method '{round.method}'")
        return step(model, cfg, params, round)
    if spec.build is None:
        raise StageInputError(f"method '{spec.name}' trains in rounds only; its stage has no single-run step")
    return spec.build(model, cfg, params)


def trains_in_rounds(cfg, params) -> bool:
    """Whether a stage with these settings trains in rounds (LSE, LabOR, FDA's multi-band ensemble)."""
    return method_spec(stage_method(cfg)).trains_in_rounds(params)
