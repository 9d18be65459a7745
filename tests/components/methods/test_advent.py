"""ADVENT / AdaptSegNet / MinEnt: what one step feeds the discriminators and who gets which gradient."""
import math

import pytest
import torch

from segshift.components.config import load_params
from segshift.components.methods.advent import OutputSpaceAdaptation, self_information
from segshift.components.models.factory import build_model
from tests.conftest import write_params


def _method(tmp_path, method: str, **stage) -> OutputSpaceAdaptation:
    params = load_params(write_params(tmp_path), {"model.width": 0.125, "inter.method": method,
                                                   **{f"inter.{k}": v for k, v in stage.items()}})
    torch.manual_seed(0)
    return OutputSpaceAdaptation(build_model(params.model), params.inter)


def _batch(n: int = 2):
    torch.manual_seed(1)
    images, labels = torch.randn(n, 3, 64, 128), torch.randint(0, 19, (n, 64, 128))
    return {"labelled": (images, labels), "unlabelled": (torch.randn(n, 3, 64, 128), torch.empty(0))}


def test_self_information_is_per_class_and_normalised():
    probs = torch.tensor([0.5, 0.25, 0.25]).view(1, 3, 1, 1)
    info = self_information(probs)
    assert info.shape == (1, 3, 1, 1)         # C channels, not summed
    expected = [-p * math.log(p) / math.log(3) for p in (0.5, 0.25, 0.25)]
    assert info.flatten().tolist() == pytest.approx(expected)
    assert info.sum().item() == pytest.approx(sum(expected))


@pytest.mark.parametrize("method,levels", [("advent", {"d_main", "d_aux"}), ("adaptsegnet", {"d_main", "d_aux"}),
                                           ("minent", set())])
def test_each_variant_has_its_discriminators(tmp_path, method, levels):
    m = _method(tmp_path, method)
    assert set(m.modules) - {"model"} == levels
    assert set(m.optimizers) == {"model"} | levels


def test_single_level_without_aux_weight(tmp_path):
    m = _method(tmp_path, "advent", adv_weight_aux=0.0)
    assert set(m.modules) == {"model", "d_main"}


def test_discriminator_input_is_entropy_map_or_softmax(tmp_path):
    logits = torch.randn(2, 19, 8, 16)
    probs = torch.nn.functional.interpolate(logits, size=(64, 128), mode="bilinear",
                                            align_corners=False).softmax(1)
    advent = _method(tmp_path, "advent").discriminator_input(logits, (64, 128))
    softmax = _method(tmp_path, "adaptsegnet").discriminator_input(logits, (64, 128))
    assert torch.allclose(softmax, probs, atol=1e-6)
    assert torch.allclose(advent, self_information(probs), atol=1e-6)


def _grads(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def test_adversarial_gradient_reaches_the_network_but_not_the_discriminator(tmp_path):
    """The network's adversarial loss must not train D; D's own step must."""
    m = _method(tmp_path, "advent", adv_weight_main=1.0, adv_weight_aux=0.0)
    disc = m.modules["d_main"]
    d_has_grad = []

    def backward(loss):
        loss.backward()
        d_has_grad.append(any(p.grad is not None for p in disc.parameters()))

    logs = m.training_step(_batch(), 0, backward)
    # backward order: segmentation, adversarial (network), D on labelled maps, D on unlabelled maps
    assert d_has_grad == [False, False, True, True]
    assert {"seg_main", "adv_main", "d_main", "loss"} <= set(logs)
    assert float(logs["loss"]) == pytest.approx(
        float(logs["seg_main"] + 0.1 * logs["seg_aux0"] + logs["adv_main"]), rel=1e-5)
    assert all(p.requires_grad for p in disc.parameters())   # unfrozen again after the step


def test_adversarial_loss_changes_the_network_gradient(tmp_path):
    def network_grad(weight: float) -> torch.Tensor:
        m = _method(tmp_path, "advent", adv_weight_main=weight, adv_weight_aux=0.0)
        m.training_step(_batch(), 0, lambda loss: loss.backward())
        return _grads(m.modules["model"])
    assert not torch.allclose(network_grad(0.0), network_grad(10.0))


def test_minent_minimises_target_entropy(tmp_path):
    m = _method(tmp_path, "minent", entropy_weight_main=1.0, entropy_weight_aux=0.0)
    logs = m.training_step(_batch(), 0, lambda loss: loss.backward())
    assert 0 < float(logs["entropy_main"]) <= 1
    assert "d_main" not in logs


def test_zero_weights_train_like_supervised(tmp_path):
    m = _method(tmp_path, "advent", adv_weight_main=0.0, adv_weight_aux=0.0)
    logs = m.training_step(_batch(), 0, lambda loss: loss.backward())
    assert set(m.modules) == {"model"}
    assert float(logs["loss"]) == pytest.approx(float(logs["seg_main"] + 0.1 * logs["seg_aux0"]), rel=1e-5)


def test_aux_level_needs_an_aux_head(tmp_path):
    from segshift.components.config import ConfigError
    with pytest.raises(ConfigError, match=r"inter.adv_weight_aux = 0.0002.*aux_head is false"):
        load_params(write_params(tmp_path), {"model.aux_head": False})
    params = load_params(write_params(tmp_path), {"model.aux_head": False, "inter.adv_weight_aux": 0.0,
                                                  "intra.adv_weight_aux": 0.0})
    assert params.inter.adv_weight_aux == 0.0
