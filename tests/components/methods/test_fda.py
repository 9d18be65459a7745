"""FDA: the spectrum swap is exact where it should be and absent elsewhere, the robust entropy and
the multi-band pseudo-labels compute the reference's numbers."""
import math

import numpy as np
import pytest
import torch

from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.methods.fda import (
    PAPER_BETAS,
    apply_class_thresholds,
    charbonnier_entropy,
    class_thresholds,
    ensemble_pseudo_labels,
    low_frequency_mask,
    low_frequency_swap,
    multi_band_ensemble,
    window_half_size,
)


def _images(n=2, c=3, h=32, w=48, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, h, w, generator=g, dtype=torch.float64) * 255).to(dtype)


def _unit(spec):
    return spec / spec.abs()


@pytest.mark.parametrize("h,w,beta", [(32, 48, 0.1), (33, 47, 0.2), (128, 256, 0.05)])
def test_swap_takes_target_low_amplitude_and_keeps_source_phase(h, w, beta):
    src, trg = _images(h=h, w=w, seed=1), _images(h=h, w=w, seed=2)
    out = low_frequency_swap(src, trg, beta)
    f_out, f_src, f_trg = (torch.fft.fft2(x) for x in (out, src, trg))
    mask = low_frequency_mask(h, w, beta)
    assert 0 < mask.sum() < h * w
    # the window has the target's amplitude, the rest keeps the source's
    torch.testing.assert_close(f_out.abs()[..., mask], f_trg.abs()[..., mask], rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(f_out[..., ~mask], f_src[..., ~mask], rtol=1e-9, atol=1e-6)
    # the phase is the source's everywhere (compare unit phasors: no 2*pi wrap-around issue)
    torch.testing.assert_close(_unit(f_out), _unit(f_src), rtol=0, atol=1e-8)
    # and the window really changed something
    assert (f_out.abs()[..., mask] - f_src.abs()[..., mask]).abs().max() > 1.0


def test_swap_in_float32_is_exact_to_float_precision():
    src, trg = _images(dtype=torch.float32, seed=3), _images(dtype=torch.float32, seed=4)
    out = low_frequency_swap(src, trg, 0.09)
    assert out.dtype == torch.float32 and out.shape == src.shape
    mask = low_frequency_mask(32, 48, 0.09)
    f_out, f_src, f_trg = (torch.fft.fft2(x.double() / 255) for x in (out, src, trg))
    torch.testing.assert_close(f_out.abs()[..., mask], f_trg.abs()[..., mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f_out[..., ~mask], f_src[..., ~mask], rtol=1e-4, atol=1e-4)


def test_each_channel_takes_the_target_mean():
    # the DC term is in every window: a positive image's mean (per image and channel) becomes the target's
    src, trg = _images(seed=5), _images(seed=6) * 0.3 + 150
    out = low_frequency_swap(src, trg, 0.05)
    torch.testing.assert_close(out.mean((2, 3)), trg.mean((2, 3)), rtol=0, atol=1e-9)
    assert (src.mean((2, 3)) - trg.mean((2, 3))).abs().min() > 20


@pytest.mark.parametrize("h,w", [(128, 256), (32, 48), (33, 47)])
def test_window_is_the_centred_square_of_half_size_b(h, w):
    for beta in (*PAPER_BETAS, 0.2, 0.49):
        b = window_half_size(h, w, beta)
        assert b == math.floor(min(h, w) * beta)
        mask = low_frequency_mask(h, w, beta)
        # centred (2b+1)^2 square after fftshift, i.e. |k_y| <= b and |k_x| <= b
        shifted = torch.fft.fftshift(mask).numpy()
        expected = np.zeros((h, w), bool)
        if b > 0:
            expected[h // 2 - b:h // 2 + b + 1, w // 2 - b:w // 2 + b + 1] = True
        assert (shifted == expected).all(), (h, w, beta)
        # closed under k -> -k, so the swapped spectrum stays Hermitian (the image stays real)
        neg = torch.roll(torch.flip(mask, (0, 1)), shifts=(1, 1), dims=(0, 1))
        assert torch.equal(mask, neg)


def test_paper_betas_on_the_builtin_image_size():
    assert [window_half_size(128, 256, b) for b in PAPER_BETAS] == [1, 6, 11]
    assert [int(low_frequency_mask(128, 256, b).sum()) for b in PAPER_BETAS] == [9, 169, 529]


def test_matches_the_shifted_numpy_formulation():
    # an independent formulation: fftshift, overwrite the centred amplitude square, unshift, ifft
    src, trg = _images(n=1, h=40, w=64, seed=7), _images(n=1, h=40, w=64, seed=8)
    beta, b = 0.1, 4
    fs, ft = np.fft.fft2(src.numpy(), axes=(-2, -1)), np.fft.fft2(trg.numpy(), axes=(-2, -1))
    amp = np.fft.fftshift(np.abs(fs), axes=(-2, -1))
    amp[..., 20 - b:20 + b + 1, 32 - b:32 + b + 1] = np.fft.fftshift(np.abs(ft), axes=(-2, -1))[
        ..., 20 - b:20 + b + 1, 32 - b:32 + b + 1]
    expected = np.real(np.fft.ifft2(np.fft.ifftshift(amp, axes=(-2, -1)) * np.exp(1j * np.angle(fs))))
    np.testing.assert_allclose(low_frequency_swap(src, trg, beta).numpy(), expected, atol=1e-9)


def test_tiny_beta_changes_nothing_and_a_larger_window_changes_more():
    src, trg = _images(seed=9), _images(seed=10)
    assert window_half_size(32, 48, 0.01) == 0
    assert torch.equal(low_frequency_swap(src, trg, 0.01), src)
    changes = [(low_frequency_swap(src, trg, b) - src).abs().mean().item() for b in (0.04, 0.1, 0.2, 0.4)]
    assert changes == sorted(changes) and changes[0] > 0


def test_same_image_is_a_fixed_point_and_target_batch_of_one_broadcasts():
    src, trg = _images(n=3, seed=11), _images(n=1, seed=12)
    torch.testing.assert_close(low_frequency_swap(src, src, 0.2), src, rtol=0, atol=1e-9)
    out = low_frequency_swap(src, trg, 0.2)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], low_frequency_swap(src[i:i + 1], trg, 0.2))


def test_half_precision_round_trips_its_dtype():
    src, trg = _images(dtype=torch.float16, seed=13), _images(dtype=torch.float16, seed=14)
    out = low_frequency_swap(src, trg, 0.1)
    assert out.dtype == torch.float16 and out.shape == src.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("beta", [0, 0.0, 0.5, 0.75, -0.01, 1, float("nan"), True, "0.1", None])
def test_bad_beta_is_rejected_with_its_value(beta):
    src = _images(n=1)
    with pytest.raises(ValueError, match="beta") as err:
        low_frequency_swap(src, src, beta)
    assert repr(beta) in str(err.value)


def test_np_float_beta_is_accepted():
    src, trg = _images(n=1, seed=1), _images(n=1, seed=2)
    torch.testing.assert_close(low_frequency_swap(src, trg, np.float32(0.1)), low_frequency_swap(src, trg, 0.1))


def test_shape_and_dtype_errors():
    src = _images(n=2)
    with pytest.raises(ValueError, match="must match"):
        low_frequency_swap(src, _images(n=2, h=16), 0.1)
    with pytest.raises(ValueError, match="must match"):
        low_frequency_swap(src, _images(n=3), 0.1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        low_frequency_swap(src[0], src[0], 0.1)
    with pytest.raises(TypeError, match="float"):
        low_frequency_swap(src.to(torch.uint8), src.to(torch.uint8), 0.1)


# ---- robust entropy -------------------------------------------------------------------------

def _probs(*rows):
    """(1, C, 1, len(rows)) from per-pixel probability vectors."""
    return torch.tensor(rows, dtype=torch.float64).T.reshape(1, len(rows[0]), 1, len(rows))


def test_charbonnier_entropy_hand_values():
    # C = 4: uniform -> normalised entropy 1; (1/2, 1/2, 0, 0) -> ln 2 / ln 4 = 1/2; one-hot -> 0
    probs = _probs([0.25] * 4, [0.5, 0.5, 0, 0], [1, 0, 0, 0])
    expected = ((1 + 1e-8) ** 2 + (0.25 + 1e-8) ** 2 + (1e-8) ** 2) / 3
    assert charbonnier_entropy(probs, eta=2.0).item() == pytest.approx(expected, rel=1e-9)
    expected_eta1 = ((1 + 1e-8) + (0.25 + 1e-8) + 1e-8) / 3
    assert charbonnier_entropy(probs, eta=1.0).item() == pytest.approx(expected_eta1, rel=1e-9)


def test_charbonnier_entropy_matches_the_logit_formulation_for_19_classes():
    logits = torch.randn(2, 19, 5, 7, generator=torch.Generator().manual_seed(0))
    ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1) / 2.9444   # the reference's ln 19
    expected = ((ent ** 2 + 1e-8) ** 1.5).mean()
    assert charbonnier_entropy(logits.softmax(1), eta=1.5).item() == pytest.approx(expected.item(), rel=1e-4)


def test_charbonnier_entropy_pushes_uncertain_pixels_harder_than_confident_ones():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.3, 0.0, 0.0]]).T.reshape(1, 3, 1, 2).requires_grad_(True)
    charbonnier_entropy(logits.softmax(1), eta=2.0).backward()
    grad = logits.grad.abs().sum(1).flatten()
    assert grad[1] > 5 * grad[0]   # the uncertain pixel gets by far the larger gradient


@pytest.mark.parametrize("eta", [0, -1.0])
def test_charbonnier_entropy_rejects_bad_eta(eta):
    with pytest.raises(ValueError, match="eta"):
        charbonnier_entropy(_probs([0.5, 0.5]), eta=eta)


# ---- multi-band ensemble and pseudo-labels --------------------------------------------------

def test_multi_band_ensemble_is_the_mean_of_probabilities():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 19, 4, 6, generator=g).softmax(1) for _ in PAPER_BETAS]
    mean = multi_band_ensemble(maps)
    torch.testing.assert_close(mean, (maps[0] + maps[1] + maps[2]) / 3)
    torch.testing.assert_close(mean.sum(1), torch.ones(2, 4, 6))
    weighted = multi_band_ensemble(maps, weights=[0.5, 0.25, 0.25])
    torch.testing.assert_close(weighted, 0.5 * maps[0] + 0.25 * maps[1] + 0.25 * maps[2])


def test_multi_band_ensemble_errors():
    with pytest.raises(ValueError, match="at least one"):
        multi_band_ensemble([])
    with pytest.raises(ValueError, match="differ in shape"):
        multi_band_ensemble([torch.zeros(1, 19, 4, 4), torch.zeros(1, 19, 4, 5)])
    with pytest.raises(ValueError, match="summing to 1"):
        multi_band_ensemble([torch.zeros(1, 19, 4, 4)] * 2, weights=[0.5, 0.6])


def test_class_thresholds_rank_cap_and_absent_classes():
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 3, 3])
    conf = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3, 0.99, 0.95, 0.97, 0.6, 0.8])
    t = class_thresholds(labels, conf, num_classes=4)
    # class 0: sorted (.1 .2 .3 .4 .5), index round(0.66 * 5) = 3 -> 0.4; class 1: 0.97 capped at 0.9;
    # class 2: absent -> 0; class 3: (.6 .8), index round(1.32) = 1 -> 0.8
    torch.testing.assert_close(t, torch.tensor([0.4, 0.9, 0.0, 0.8]))
    # the median version (BDL): index round(2.5) = 2 (half to even) -> 0.3; round(1.0) = 1 -> 0.8
    t50 = class_thresholds(labels, conf, num_classes=4, quantile=0.5)
    torch.testing.assert_close(t50, torch.tensor([0.3, 0.9, 0.0, 0.8]))
    out = apply_class_thresholds(labels, conf, t)
    assert out.tolist() == [0, 255, 0, 255, 255, 1, 1, 1, 255, 3]


def test_apply_class_thresholds_ignores_unknown_labels():
    labels = torch.tensor([[0, 5, IGNORE_INDEX]])
    out = apply_class_thresholds(labels, torch.ones(1, 3), torch.tensor([0.5, 0.5]))
    assert out.tolist() == [[0, IGNORE_INDEX, IGNORE_INDEX]]


def test_ensemble_pseudo_labels_threshold_the_averaged_map():
    # two pixels per class among 3 classes, confidences known after averaging two identical maps
    p = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.2, 0.2], [0.1, 0.8, 0.1],
                      [0.3, 0.4, 0.3], [0.0, 0.0, 1.0], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 2, 3)
    labels, thresholds = ensemble_pseudo_labels([p, p])
    # per class the higher of its two confidences (index round(1.32) = 1), capped at 0.9
    torch.testing.assert_close(thresholds, torch.tensor([0.9, 0.8, 0.9]))
    assert labels.tolist() == [[[0, 255, 1], [255, 2, 255]]]
    assert labels.dtype == torch.int64


def test_class_thresholds_errors():
    with pytest.raises(ValueError, match="quantile"):
        class_thresholds(torch.zeros(3, dtype=torch.long), torch.zeros(3), 19, quantile=1.5)
    with pytest.raises(ValueError, match="differ"):
        class_thresholds(torch.zeros(3, dtype=torch.long), torch.zeros(4), 19)


# -- the training step against YanchaoYang/FDA's model/deeplab.py, train.py and SStrain.py -----------

def _fda_method(tmp_path, self_training=False, **overrides):
    from segshift.components.config import load_params
    from segshift.components.methods.fda import FDA
    from segshift.components.models.factory import build_model
    from tests.conftest import write_params
    params = load_params(write_params(tmp_path), {"model.width": 0.125, "inter.method": "fda", **overrides})
    torch.manual_seed(0)
    return FDA(build_model(params.model), params.inter, params.methods.fda, self_training=self_training)


def _fda_batch(self_training=False):
    torch.manual_seed(1)
    labels = torch.randint(0, 19, (2, 32, 64))
    batch = {"labelled": (torch.randn(2, 3, 32, 64), labels),
             "unlabelled": (torch.randn(2, 3, 32, 64), torch.empty(0))}
    if self_training:
        batch["pseudo"] = (torch.randn(2, 3, 32, 64), torch.randint(0, 19, (2, 32, 64)))
    return batch


def _run_step(method, batch, step):
    """One step; returns its logs, the number of backward calls and every forward's (input, main)."""
    seen, calls = [], []
    method.modules["model"].register_forward_hook(
        lambda module, args, out: seen.append((args[0].detach(), out.main.detach())))

    def backward(loss):
        calls.append(loss)
        loss.backward()
    return method.training_step(batch, step, backward), len(calls), seen


def test_entropy_is_taken_at_the_network_output_resolution_as_the_reference_model(tmp_path):
    # model/deeplab.py: softmax of layer5's logits at their own (1/8) size, no upsampling first
    method = _fda_method(tmp_path, **{"methods.fda.entropy_start": 0})
    batch = _fda_batch()
    logs, _, seen = _run_step(method, batch, step=0)
    target_input, target_main = seen[-1]
    assert torch.equal(target_input, batch["unlabelled"][0])
    assert target_main.shape[-2:] != target_input.shape[-2:]          # a low-resolution output
    expected = charbonnier_entropy(target_main.float().softmax(1), 2.0)
    torch.testing.assert_close(logs["entropy"], expected, rtol=1e-6, atol=0)
    upsampled = torch.nn.functional.interpolate(target_main, size=(32, 64), mode="bilinear", align_corners=False)
    assert not torch.isclose(charbonnier_entropy(upsampled.softmax(1), 2.0), expected, rtol=1e-4, atol=0)


def test_self_training_step_takes_the_entropy_of_the_pseudo_predictions_from_the_first_step(tmp_path):
    # SStrain.py: loss_seg_src + (loss_seg_psu + entW * loss_ent_psu), no switch2entropy, and no
    # entropy (nor forward) of the plain target batch, which only lends its style to the source
    method = _fda_method(tmp_path, self_training=True, **{"methods.fda.entropy_start": 10_000})
    batch = _fda_batch(self_training=True)
    logs, calls, seen = _run_step(method, batch, step=0)
    assert len(seen) == 2 and calls == 2                               # stylised source, pseudo
    pseudo_input, pseudo_main = seen[1]
    assert torch.equal(pseudo_input, batch["pseudo"][0])
    expected = charbonnier_entropy(pseudo_main.float().softmax(1), 2.0)
    torch.testing.assert_close(logs["entropy"], expected, rtol=1e-6, atol=0)
    seg = logs["seg_main"] + method.cfg.aux_weight * logs["seg_aux0"]
    assert logs["loss"] == pytest.approx((seg + logs["pseudo"] + 0.005 * expected).item(), rel=1e-5)


def test_class_thresholds_follow_the_reference_index_not_a_kept_share():
    # getSudoLabel_multi.py: x = sort(probs of class c); thres = x[round(len(x) * 0.66)]
    conf = torch.arange(1, 11, dtype=torch.float32) / 20                # 0.05 .. 0.50, n = 10
    t = class_thresholds(torch.zeros(10, dtype=torch.long), conf, num_classes=2)
    # index round(6.6) = 7 -> 0.40: 3 pixels kept (a "keep the top 34 %" rule keeps ceil(3.4) = 4)
    torch.testing.assert_close(t, torch.tensor([0.40, 0.0]))
    assert int((apply_class_thresholds(torch.zeros(10, dtype=torch.long), conf, t) == 0).sum()) == 3
    # n = 1: the reference's x[round(0.66)] = x[1] is out of range; we take the only value
    torch.testing.assert_close(class_thresholds(torch.tensor([1]), torch.tensor([0.7]), 2), torch.tensor([0.0, 0.7]))


def test_the_ensemble_is_scored_against_native_resolution_labels_as_single_models_are():
    """The reference scores the MBT ensemble at 2048x1024: a split with native-resolution labels
    scores the ensemble (and each band model) there, as `evaluate` scores one model."""
    from segshift.components.evaluation import evaluate
    from segshift.components.methods.fda import evaluate_ensemble
    from tests.components.test_evaluation import POLE, ROAD, FixedLogits, FullLabelled, _pole_label

    full = _pole_label()                                   # 4x8, a 1-pixel pole the 4x2 label loses
    road, pole = torch.zeros(1, 19, 1, 2), torch.zeros(1, 19, 1, 2)
    road[:, ROAD] = 1.0
    pole[:, POLE] = 3.0                                    # a second model that says pole everywhere
    models = [FixedLogits(road), FixedLogits(pole)]
    dataset = FullLabelled(torch.zeros(1, 3, 4, 2), [full], prepared_size=(2, 4))
    ensemble, bands = evaluate_ensemble(models, dataset, batch_size=1, device=torch.device("cpu"))
    assert int(ensemble.confusion.sum()) == full.size               # 32 pixels: the native label's
    assert int(ensemble.confusion[POLE].sum()) == 4                 # the pole is scored
    for model, band in zip(models, bands):
        assert torch.equal(band.confusion, evaluate(model, dataset, 1, torch.device("cpu")).confusion)
    # mean of softmax(road) and softmax(pole): pole's 3.0 outweighs road's 1.0 -> pole everywhere
    assert int(ensemble.confusion[:, POLE].sum()) == full.size
