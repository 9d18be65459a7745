"""The method/engine contract (`Method`, `OptimizerSpec`, `check_same_size`) and `MethodSpec`."""
import dataclasses

import pytest
import torch
from torch import nn
from torch.optim import SGD

from segshift.components.config import OptimizerConfig
from segshift.components.methods.base import Method, MethodSpec, OptimizerSpec, check_same_size

SGD_CONFIG = OptimizerConfig(name="sgd", lr=2.5e-4, momentum=0.9, betas=(0.9, 0.99), weight_decay=5e-4,
                             head_lr_mult=10, poly_power=0.9)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 1)
        self.classifier = nn.Conv2d(4, 19, 1)

    def forward(self, x):
        return self.classifier(self.body(x))

    def head_parameters(self):
        return list(self.classifier.parameters())


class Plain(Method):
    def training_step(self, batch, step, backward):
        images, labels = batch["labelled"]
        loss = nn.functional.cross_entropy(self.modules["model"](images), labels)
        backward(loss)
        return {"loss": loss.detach()}


class Wrapped(nn.Module):
    """What DDP does to a module: the network is `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_a_method_without_a_training_step_cannot_be_built():
    class NoStep(Method):
        pass
    with pytest.raises(TypeError, match="training_step"):
        NoStep()


def test_each_method_owns_its_modules_and_optimizers_and_defaults_to_labelled_data():
    a, b = Plain(), Plain()
    assert a.roles == ("labelled",) and a.modules == {} and a.optimizers == {}
    a.add_segmenter(Net(), SGD_CONFIG)
    assert b.modules == {} and b.optimizers == {}           # no state shared between instances


def test_add_segmenter_registers_the_model_and_its_optimizer_with_heads_at_the_multiplier():
    method, net = Plain(), Net()
    method.add_segmenter(net, SGD_CONFIG)
    assert method.modules == {"model": net} and method.segmenter is net
    spec = method.optimizers["model"]
    assert isinstance(spec, OptimizerSpec) and spec.config is SGD_CONFIG
    assert isinstance(spec.optimizer, SGD)
    groups = spec.optimizer.param_groups
    assert [g["lr"] for g in groups] == [2.5e-4, pytest.approx(2.5e-3)]
    assert [g["lr_mult"] for g in groups] == [1.0, 10]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in net.classifier.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in net.body.parameters()}


def test_the_segmenter_is_the_network_inside_a_wrapper():
    method, net = Plain(), Net()
    method.add_segmenter(net, SGD_CONFIG)
    method.modules["model"] = Wrapped(net)          # as the engine wraps it for DDP
    assert method.segmenter is net


def test_a_training_step_calls_backward_and_returns_a_detached_loss():
    torch.manual_seed(0)
    method = Plain()
    method.add_segmenter(Net(), SGD_CONFIG)
    calls = []
    batch = {"labelled": (torch.randn(2, 3, 4, 4), torch.randint(0, 19, (2, 4, 4)))}
    logs = method.training_step(batch, 0, lambda loss: (calls.append(loss), loss.backward()))
    assert len(calls) == 1 and not logs["loss"].requires_grad
    assert logs["loss"].item() == pytest.approx(calls[0].item())
    assert all(p.grad is not None for p in method.segmenter.parameters())


def test_check_same_size_names_both_sizes_and_the_fix():
    check_same_size(torch.zeros(2, 3, 32, 64), torch.zeros(1, 3, 32, 64), "DACS")      # same: fine
    with pytest.raises(ValueError) as caught:
        check_same_size(torch.zeros(2, 3, 32, 64), torch.zeros(2, 3, 48, 64), "DACS")
    message = str(caught.value)
    assert message.startswith("DACS source (32, 64) and target (48, 64) images of different sizes")
    assert "crop" in message


def build(model, cfg, params, round=None):
    return Plain()


def step_a(model, cfg, params, round=None):
    return Plain()


def test_a_method_that_trains_in_one_run():
    spec = MethodSpec(name="one", build=build)
    assert not spec.trains_in_rounds(params=None)
    assert spec.step_builder(None) is build and spec.step_builder("a") is None
    assert spec.bench_cases == (("one", None, "inter"),)      # the default bench case: its inter step


def test_a_method_that_trains_in_rounds():
    rounds = lambda context: {}                                  # noqa: E731
    spec = MethodSpec(name="rounded", build=None, steps={"a": step_a}, rounds=rounds,
                      bench=(("rounded-a", "a", "inter"), ("rounded-src", "a", "source")))
    assert spec.trains_in_rounds(params=None)                    # rounds and no in_rounds: always
    assert spec.step_builder("a") is step_a and spec.step_builder(None) is None
    assert spec.step_builder("b") is None
    assert spec.bench_cases == (("rounded-a", "a", "inter"), ("rounded-src", "a", "source"))


def test_in_rounds_decides_per_params_only_when_there_are_rounds():
    seen = []
    decide = lambda params: (seen.append(params), params["bands"] > 0)[1]     # noqa: E731
    spec = MethodSpec(name="fda-like", build=build, rounds=lambda c: {}, in_rounds=decide)
    assert spec.trains_in_rounds({"bands": 2}) and not spec.trains_in_rounds({"bands": 0})
    assert seen == [{"bands": 2}, {"bands": 0}]
    no_rounds = MethodSpec(name="x", build=build, in_rounds=lambda params: True)
    assert not no_rounds.trains_in_rounds({"bands": 2})          # in_rounds alone never makes rounds


def test_a_method_spec_is_immutable_and_its_steps_are_not_shared():
    spec = MethodSpec(name="one", build=build)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"
    assert spec.steps == {} and spec.steps is not MethodSpec(name="two", build=build).steps
