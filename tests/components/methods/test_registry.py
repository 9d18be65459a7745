"""One registry for every method: the names the config accepts, each building its step(s)."""
import typing

import pytest
import torch

from segshift.components.config import AdaptationStageConfig, load_params
from segshift.components.methods import registry
from segshift.components.methods.base import Method
from segshift.components.methods.rounds import Round, StageInputError, source_and_target
from segshift.components.models.factory import build_model
from tests.conftest import write_params


@pytest.fixture
def params(tmp_path):
    return load_params(write_params(tmp_path), {"model.width": 0.125, "model.pretrained": None})


def test_the_registry_lists_exactly_the_methods_the_config_accepts():
    accepted = set(typing.get_args(AdaptationStageConfig.model_fields["method"].annotation)) | {"supervised"}
    assert set(registry.method_names()) == accepted
    assert len(registry.method_names()) == len(accepted)
    for name, spec in registry.METHODS.items():
        assert spec.name == name


@pytest.mark.parametrize("name", registry.method_names())
def test_every_method_builds_its_steps_on_a_tiny_model(params, name):
    spec = registry.method_spec(name)
    cfg = params.source if name == "supervised" else params.inter.model_copy(update={"method": name})
    built = []
    if spec.build is not None:
        torch.manual_seed(0)
        built.append(registry.build_method(build_model(params.model), cfg, params))
    for step in spec.steps:
        data = {**source_and_target(), "pseudo": {"domain": "target", "ids": None, "labels_dir": "r/labels"}}
        round_ = Round(name="r", method=step, iterations=1, step_offset=0, data=data,
                       beta=params.methods.fda.beta)
        torch.manual_seed(0)
        built.append(registry.build_method(build_model(params.model), cfg, params, round_))
    assert built, f"{name} builds no step"
    for method in built:
        assert isinstance(method, Method) and method.roles and "model" in method.modules
    assert (spec.rounds is not None) == bool(spec.steps)     # round methods train their steps in rounds
    for case, step, stage in spec.bench_cases:
        assert spec.step_builder(step) is not None and stage in ("source", "inter")


def test_round_steps_and_stages_in_rounds_come_from_the_method(params):
    inter = params.inter.model_copy(update={"method": "lse"})
    round_ = Round(name="r", method="labor-model", iterations=1, step_offset=0, data=source_and_target())
    with pytest.raises(StageInputError, match="unknown round method 'labor-model'"):
        registry.build_method(build_model(params.model), inter, params, round_)
    with pytest.raises(StageInputError, match="trains in rounds only"):
        registry.build_method(build_model(params.model), inter, params)
    with pytest.raises(StageInputError, match="unknown method"):
        registry.method_spec("nope")
    assert registry.trains_in_rounds(inter, params)
    assert registry.trains_in_rounds(inter.model_copy(update={"method": "labor"}), params)
    assert not registry.trains_in_rounds(inter.model_copy(update={"method": "advent"}), params)
    assert not registry.trains_in_rounds(params.source, params)
    fda = inter.model_copy(update={"method": "fda"})
    with_bands = params.model_copy(update={"methods": params.methods.model_copy(
        update={"fda": params.methods.fda.model_copy(update={"ensemble_betas": [0.01, 0.05]})})})
    without = params.model_copy(update={"methods": params.methods.model_copy(
        update={"fda": params.methods.fda.model_copy(update={"ensemble_betas": []})})})
    assert registry.trains_in_rounds(fda, with_bands) and not registry.trains_in_rounds(fda, without)
