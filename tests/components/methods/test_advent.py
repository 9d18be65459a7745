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


# -- against the reference code (valeoai/ADVENT 7d6f78d; wasidennis/AdaptSegNet 351fef3) ----------

def _advent_prob_2_entropy(prob: torch.Tensor) -> torch.Tensor:
    """advent/utils/func.py `prob_2_entropy`, as written there."""
    c = prob.shape[1]
    return -torch.mul(prob, torch.log2(prob + 1e-30)) / math.log2(c)


def test_self_information_is_advents_prob_2_entropy():
    torch.manual_seed(3)
    probs = torch.randn(2, 19, 5, 7).mul(4).softmax(1)
    probs[0, :, 0, 0] = 0.0
    probs[0, 4, 0, 0] = 1.0                       # a certain pixel: 0·log 0 = 0, not NaN
    assert torch.allclose(self_information(probs), _advent_prob_2_entropy(probs), atol=1e-7)


def test_one_step_matches_the_reference_losses_and_domain_labels(tmp_path):
    """train_advent / AdaptSegNet: the network's adversarial loss is BCE(D(target map), source=0);
    D's loss is BCE(D(source map), 0) / 2 + BCE(D(target map), 1) / 2, the maps from upsampled
    softmax (advent: -p log2 p / log2 C; adaptsegnet: p)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for method, to_map in (("advent", _advent_prob_2_entropy), ("adaptsegnet", lambda p: p)):
        m = _method(tmp_path, method)
        batch = _batch()
        logs = m.training_step(batch, 0, lambda loss: loss.backward())
        model = m.modules["model"]
        (images, _), (target, _) = batch["labelled"], batch["unlabelled"]
        with torch.no_grad():                     # train mode: batch statistics, same outputs
            src, trg = model(images), model(target)
            for level, src_logits, trg_logits in (("main", src.main, trg.main), ("aux", src.aux[0], trg.aux[0])):
                disc = m.modules[f"d_{level}"]    # no optimiser step was taken: D is unchanged
                up = lambda x: torch.nn.functional.interpolate(x, size=(64, 128), mode="bilinear",
                                                               align_corners=False).softmax(1)
                d_src, d_trg = disc(to_map(up(src_logits))), disc(to_map(up(trg_logits)))
                assert float(logs[f"adv_{level}"]) == pytest.approx(
                    float(bce(d_trg, torch.zeros_like(d_trg))), rel=1e-4)
                assert float(logs[f"d_{level}"]) == pytest.approx(
                    float(bce(d_src, torch.zeros_like(d_src)) / 2 + bce(d_trg, torch.ones_like(d_trg)) / 2),
                    rel=1e-4)


def test_minent_loss_is_advents_entropy_loss(tmp_path):
    """advent/utils/loss.py `entropy_loss`: sum(-p log2 p) / (N·H·W·log2 C) of the upsampled softmax."""
    m = _method(tmp_path, "minent")
    batch = _batch()
    logs = m.training_step(batch, 0, lambda loss: loss.backward())
    with torch.no_grad():
        out = m.modules["model"](batch["unlabelled"][0])
    for level, logits in (("main", out.main), ("aux", out.aux[0])):
        p = torch.nn.functional.interpolate(logits, size=(64, 128), mode="bilinear",
                                            align_corners=False).softmax(1)
        n, c, h, w = p.shape
        reference = -torch.sum(p * torch.log2(p + 1e-30)) / (n * h * w * math.log2(c))
        assert float(logs[f"entropy_{level}"]) == pytest.approx(float(reference), rel=1e-4)


def test_discriminator_is_the_reference_fc_discriminator():
    """get_fc_discriminator / AdaptSegNet FCDiscriminator: five 4x4 stride-2 convs, 19 -> 64 -> 128
    -> 256 -> 512 -> 1, LeakyReLU(0.2) between, raw logits on a 1/32 grid."""
    from segshift.components.models.discriminator import FCDiscriminator
    disc = FCDiscriminator(19, 64)
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items() if k.endswith("weight")}
    assert shapes == {"conv1.weight": (64, 19, 4, 4), "conv2.weight": (128, 64, 4, 4),
                      "conv3.weight": (256, 128, 4, 4), "conv4.weight": (512, 256, 4, 4),
                      "classifier.weight": (1, 512, 4, 4)}
    assert disc.leaky_relu.negative_slope == 0.2
    assert disc(torch.rand(1, 19, 64, 128)).shape == (1, 1, 2, 4)


def test_params_yaml_keeps_the_reference_loss_weights_and_discriminator_optimiser():
    """advent/domain_adaptation/config.py: LAMBDA_SEG_AUX 0.1, LAMBDA_ADV 0.001 / 0.0002, LAMBDA_ENT
    0.001 / 0.0002, LEARNING_RATE_D 1e-4 with Adam betas (0.9, 0.99), POWER 0.9 (IntraDA's intra
    stage runs the same train_advent). Network width, rates and the network's optimiser are scaled
    for the built-in data and are not checked here (presets/*.yaml carry the real recipe)."""
    import yaml
    from tests.conftest import REPO
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for stage in ("inter", "intra"):
        s = raw[stage]
        assert (s["aux_weight"], s["adv_weight_main"], s["adv_weight_aux"]) == (0.1, 0.001, 0.0002)
        assert (s["entropy_weight_main"], s["entropy_weight_aux"]) == (0.001, 0.0002)
        d = s["discriminator"]["optimizer"]
        assert (d["name"], d["lr"], list(d["betas"]), d["weight_decay"], d["poly_power"]) == \
            ("adam", 0.0001, [0.9, 0.99], 0.0, 0.9)
