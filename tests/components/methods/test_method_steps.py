"""DACS and FDA as training methods: what one step trains on, what it logs, and bad input."""
import pytest
import torch

from segshift.components.config import ConfigError, load_params
from segshift.components.methods.dacs import DACS
from segshift.components.methods.fda import FDA, from_pixels, low_frequency_mask, to_pixels
from segshift.components.models.factory import build_model
from tests.conftest import write_params


def _params(tmp_path, **overrides):
    return load_params(write_params(tmp_path), {"model.width": 0.125, **overrides})


def _batch(n: int = 2, size=(32, 64), target_size=None):
    torch.manual_seed(1)
    labels = torch.zeros(n, *size, dtype=torch.long)
    labels[:, : size[0] // 2] = 0
    labels[:, size[0] // 2:] = 2
    labels[:, :, : size[1] // 4] = 11
    labels[0, 0, 0] = 255
    return {"labelled": (torch.randn(n, 3, *size), labels),
            "unlabelled": (torch.randn(n, 3, *(target_size or size)), torch.empty(0))}


def _step(method, batch, step):
    calls = []

    def backward(loss):
        calls.append(loss.detach())
        loss.backward()
    logs = method.training_step(batch, step, backward)
    return logs, calls


def test_dacs_step_trains_on_source_and_mixed_images_and_the_teacher_follows(tmp_path):
    params = _params(tmp_path, **{"inter.method": "dacs"})
    torch.manual_seed(0)
    method = DACS(build_model(params.model), params.inter, params.methods.dacs, seed=0)
    student, teacher = method.modules["model"], method.modules["teacher"]
    assert not any(p.requires_grad for p in teacher.parameters())
    logs, calls = _step(method, _batch(), step=0)
    assert len(calls) == 2 and {"loss", "seg_main", "mixed", "confident_share", "pasted_share"} <= set(logs)
    assert 0 <= logs["confident_share"] <= 1 and 0 < logs["pasted_share"] < 1
    assert logs["loss"] == pytest.approx((logs["seg_main"] + params.inter.aux_weight * logs["seg_aux0"]
                                          + logs["mixed"]).item(), rel=1e-5)
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    with torch.no_grad():                      # an optimiser step moves the student away
        for p in student.parameters():
            p.add_(0.01)
    _step(method, _batch(), step=1)            # alpha(0) = 0: the teacher becomes the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)
    before = [t.clone() for t in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    _step(method, _batch(), step=2)            # alpha(1) = 0.5
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.5 * b + 0.5 * s, atol=1e-6)


def test_dacs_mixing_is_reproducible_per_step(tmp_path):
    params = _params(tmp_path, **{"inter.method": "dacs"})
    shares = []
    for _ in range(2):
        torch.manual_seed(0)
        method = DACS(build_model(params.model), params.inter, params.methods.dacs, seed=3)
        shares.append(_step(method, _batch(), step=5)[0]["pasted_share"].item())
    assert shares[0] == shares[1]


@pytest.mark.parametrize("cls,method", [(DACS, "dacs"), (FDA, "fda")])
def test_domains_of_different_sizes_are_refused_with_a_hint(tmp_path, cls, method):
    params = _params(tmp_path, **{"inter.method": method})
    cfg = getattr(params.methods, method)
    m = cls(build_model(params.model), params.inter, cfg, seed=0) if cls is DACS else cls(build_model(params.model), params.inter, cfg)
    with pytest.raises(ValueError, match=r"different sizes; set the stage's crop"):
        _step(m, _batch(target_size=(32, 48)), step=0)


def test_fda_trains_on_source_images_carrying_the_target_low_frequency_amplitude(tmp_path):
    params = _params(tmp_path, **{"inter.method": "fda", "methods.fda.beta": 0.1,
                                  "methods.fda.entropy_start": 1})
    torch.manual_seed(0)
    method = FDA(build_model(params.model), params.inter, params.methods.fda)
    seen = []
    method.modules["model"].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    batch = _batch()
    logs, calls = _step(method, batch, step=0)
    assert len(calls) == 1 and "entropy" not in logs          # before entropy_start
    stylised = to_pixels(seen[0].double())
    source, target = to_pixels(batch["labelled"][0].double()), to_pixels(batch["unlabelled"][0].double())
    window = low_frequency_mask(32, 64, 0.1)
    spectrum, src, trg = (torch.fft.fft2(x) for x in (stylised, source, target))
    assert torch.allclose(spectrum.abs()[..., window], trg.abs()[..., window], rtol=1e-3, atol=1e-2)
    assert torch.allclose(spectrum[..., ~window], src[..., ~window], rtol=1e-3, atol=1e-2)
    logs, calls = _step(method, batch, step=1)
    assert len(calls) == 2 and 0 < logs["entropy"] <= 1
    assert logs["loss"] == pytest.approx((logs["seg_main"] + params.inter.aux_weight * logs["seg_aux0"]
                                          + 0.005 * logs["entropy"]).item(), rel=1e-5)


def test_pixel_scale_round_trip():
    x = torch.randn(2, 3, 4, 5)
    assert torch.allclose(from_pixels(to_pixels(x)), x, atol=1e-5)


# beta outside (0, 0.5); a label budget of zero or above 100 %
@pytest.mark.parametrize("key,value", [("methods.fda.beta", v) for v in (0.0, 0.5, 0.7, -0.1)]
                         + [("methods.labor.label_budget", v) for v in (0, 1.5, -0.1)])
def test_method_settings_outside_their_range_are_config_errors(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        _params(tmp_path, **{key: value})


def test_lse_step_trains_on_aligned_scale_invariant_crops(tmp_path):
    from segshift.components.methods.lse import LSE
    params = _params(tmp_path)
    torch.manual_seed(0)
    method = LSE(build_model(params.model), params.source, params.methods.lse, seed=0)
    batch = _batch()
    images, pseudo = batch["labelled"]
    crops, labels = method.scale_invariant_batch(images, pseudo, step=3)
    assert crops.shape == (2 * 4, 3, 32, 64) and labels.shape == (8, 32, 64)
    again = method.scale_invariant_batch(images, pseudo, step=3)
    assert torch.equal(again[0], crops) and torch.equal(again[1], labels)
    # a 2x zoom of a half-size crop: every label of a crop comes from one 16x32 window of the full map
    assert set(labels[0].unique().tolist()) <= set(pseudo[0].unique().tolist())
    logs, calls = _step(method, {"labelled": batch["labelled"], "pseudo": batch["labelled"]}, step=0)
    assert len(calls) == 2 and logs["target"] > 0
    assert logs["loss"] == pytest.approx((logs["seg_main"] + params.source.aux_weight * logs["seg_aux0"]
                                          + logs["target"]).item(), rel=1e-5)


def test_pixel_selector_step_routes_the_discrepancy_game(tmp_path):
    from segshift.components.methods.labor import PixelSelectorTraining, TwoHeadSegmenter
    params = _params(tmp_path)
    torch.manual_seed(0)
    selector = TwoHeadSegmenter(build_model(params.model))
    method = PixelSelectorTraining(selector, params.source, params.methods.labor)
    batch = {"pseudo": _batch()["labelled"]}
    # the heads' gradient is CE - w * d, the features' CE + w * d: compare against each part alone
    images, labels = batch["pseudo"]
    logs, calls = _step(method, batch, step=0)
    assert len(calls) == 3 and logs["discrepancy"] > 0
    got = {n: p.grad.clone() for n, p in selector.named_parameters()}
    for p in selector.parameters():
        p.grad = None
    from segshift.components.losses import labelled_cross_entropy, upsample
    from segshift.components.methods.labor import head_discrepancy
    out = selector(images)
    seg = sum(labelled_cross_entropy(upsample(x, (32, 64)), labels) for x in (out.a, out.b))
    d = head_discrepancy(upsample(out.a, (32, 64)).softmax(1), upsample(out.b, (32, 64)).softmax(1))
    heads = {n for n, _ in selector.named_parameters() if n.startswith(("head_a", "head_b"))}
    seg_grads = torch.autograd.grad(seg, list(selector.parameters()), retain_graph=True, allow_unused=True)
    d_grads = torch.autograd.grad(d, list(selector.parameters()), allow_unused=True)
    w = params.methods.labor.discrepancy_weight
    for (name, _), g_seg, g_d in zip(selector.named_parameters(), seg_grads, d_grads):
        sign = -1.0 if name in heads else 1.0
        expected = (g_seg if g_seg is not None else 0) + sign * w * (g_d if g_d is not None else 0)
        assert torch.allclose(got[name], torch.as_tensor(expected), atol=1e-5), name


def test_fda_self_training_round_adds_the_pseudo_label_loss_at_its_own_beta(tmp_path):
    params = _params(tmp_path, **{"inter.method": "fda", "methods.fda.entropy_weight": 0.0})
    torch.manual_seed(0)
    method = FDA(build_model(params.model), params.inter, params.methods.fda, beta=0.09, self_training=True)
    assert method.beta == 0.09 and method.roles == ("labelled", "unlabelled", "pseudo")
    batch = {**_batch(), "pseudo": _batch()["labelled"]}
    logs, calls = _step(method, batch, step=0)
    assert len(calls) == 2 and logs["pseudo"] > 0
    assert logs["loss"] == pytest.approx((logs["seg_main"] + params.inter.aux_weight * logs["seg_aux0"]
                                          + logs["pseudo"]).item(), rel=1e-5)
    with pytest.raises(ValueError, match="beta = 0.6"):
        FDA(build_model(params.model), params.inter, params.methods.fda, beta=0.6)


def test_labor_model_step_learns_only_from_the_revealed_target_pixels(tmp_path):
    from segshift.components.methods.labor import AnnotatedTargetTraining
    params = _params(tmp_path)
    torch.manual_seed(0)
    method = AnnotatedTargetTraining(build_model(params.model), params.inter)
    source = _batch()["labelled"]
    images = torch.randn(2, 3, 32, 64)
    sparse = torch.full((2, 32, 64), 255, dtype=torch.long)
    sparse[:, 3, 5] = 13
    logs, _ = _step(method, {"labelled": source, "annotated": (images, sparse)}, step=0)
    from segshift.components.losses import labelled_cross_entropy, segmentation_loss, upsample
    with torch.no_grad():
        out = method.segmenter(images)
        expected = segmentation_loss(out, sparse, params.inter.aux_weight)["loss"]
        # only the revealed pixel (3, 5) of each image counts
        at_pixel = labelled_cross_entropy(upsample(out.main, (32, 64))[:, :, 3:4, 5:6], sparse[:, 3:4, 5:6])
    assert logs["target"] == pytest.approx(expected.item(), rel=1e-4)
    assert segmentation_loss(out, sparse, 0.0)["loss"].item() == pytest.approx(at_pixel.item(), rel=1e-4)
    adversarial = params.inter.adv_weight_main * logs["adv_main"] + params.inter.adv_weight_aux * logs["adv_aux"]
    assert logs["loss"] == pytest.approx((logs["seg_main"] + params.inter.aux_weight * logs["seg_aux0"]
                                          + logs["target"] + adversarial).item(), rel=1e-5)
    assert all(p.grad is not None for p in method.segmenter.parameters() if p.requires_grad)


@pytest.mark.parametrize("overrides,message", [
    ({"intra.method": "lse"}, "intra.method: 'lse' adapts source -> target in rounds"),
    ({"intra.method": "labor"}, "intra.method: 'labor'"),
    ({"intra.method": "fda", "methods.fda.ensemble_betas": [0.01, 0.05]}, "ensemble runs in inter only"),
    ({"methods.fda.ensemble_betas": [0.01, 0.5]}, "ensemble_betas: 0.5 is outside"),
    ({"inter.method": "adaptsegnet", "model.aux_head": False}, "adv_weight_aux = 0.0002 adapts a second output level"),
])
def test_method_and_model_combinations_that_cannot_work_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _params(tmp_path, **overrides)
