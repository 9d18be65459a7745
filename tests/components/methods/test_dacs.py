"""DACS: ClassMix picks half of the classes and only whole classes, mixing composes image, label and
weight as specified, the confidence weight, weighted loss and EMA teacher compute the reference's numbers."""
import copy
import math

import pytest
import torch
from torch import nn

from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.methods.dacs import (
    BLUR_P,
    DACS,
    DEFAULT_CONFIDENCE_THRESHOLD,
    JITTER_P,
    blur_kernel_size,
    choose_half_classes,
    class_mask,
    classmix_mask,
    confidence_weight,
    ema_alpha,
    ema_update,
    gaussian_blur,
    hsv_to_rgb,
    jitter_colours,
    mix,
    mixed_pixel_weight,
    rgb_to_hsv,
    strong_augment,
    weighted_cross_entropy,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _labels(n=3, h=12, w=16, classes=(0, 2, 5, 7, 11, 18), seed=0, ignore_share=0.1):
    g = _gen(seed)
    pool = torch.tensor(classes)
    labels = pool[torch.randint(len(classes), (n, h, w), generator=g)]
    labels[torch.rand(n, h, w, generator=g) < ignore_share] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("present,expected", [((3,), 1), ((0, 4), 1), ((0, 4, 9), 2), ((1, 2, 3, 4), 2),
                                              ((1, 2, 3, 4, 5), 3), (tuple(range(19)), 10)])
def test_half_of_the_present_classes_rounded_up_never_ignore(present, expected):
    label = torch.tensor([*present, IGNORE_INDEX, IGNORE_INDEX]).repeat(4, 1)
    for seed in range(5):
        chosen = choose_half_classes(label, _gen(seed), exclude_ignore=True)
        assert chosen.numel() == expected
        assert set(chosen.tolist()) <= set(present)
        assert chosen.unique().numel() == expected       # without replacement


def test_ignore_is_drawn_as_a_class_by_default_as_in_the_reference():
    label = torch.tensor([[0, 4, IGNORE_INDEX]])
    drawn = [choose_half_classes(label, _gen(s)) for s in range(40)]   # the reference's default
    assert {c.numel() for c in drawn} == {2}              # n = 3 "classes" -> 2
    assert any(IGNORE_INDEX in c.tolist() for c in drawn)
    assert all(IGNORE_INDEX not in choose_half_classes(label, _gen(s), exclude_ignore=True).tolist()
               for s in range(40))


def test_an_all_ignore_label_pastes_nothing_without_ignore_and_everything_as_the_reference():
    labels = torch.full((2, 4, 5), IGNORE_INDEX)
    assert choose_half_classes(labels[0], _gen(), exclude_ignore=True).numel() == 0
    assert not classmix_mask(labels, _gen(), exclude_ignore=True).any()
    assert classmix_mask(labels, _gen()).all()            # n = 1 "class" (ignore): ceil(1 / 2) = 1


def test_classmix_mask_is_membership_in_the_chosen_classes():
    labels = _labels()
    mask = classmix_mask(labels, _gen(7), exclude_ignore=True)
    g = _gen(7)                                          # same draws, image by image
    for label, m in zip(labels, mask):
        chosen = choose_half_classes(label, g, exclude_ignore=True)
        assert torch.equal(m, torch.isin(label, chosen))
        assert torch.equal(m, class_mask(label, chosen))
        present = label[label != IGNORE_INDEX].unique()
        assert chosen.numel() == math.ceil(present.numel() / 2)
        # whole classes only: every class is all in or all out, ignore pixels never pasted
        for c in present:
            assert m[label == c].all() or not m[label == c].any()
        assert not m[label == IGNORE_INDEX].any()
    assert mask.dtype == torch.bool and mask.shape == labels.shape


def test_classmix_is_deterministic_per_generator_and_unbiased():
    labels = _labels(n=1, classes=(1, 3, 6, 9), ignore_share=0.0)
    assert torch.equal(classmix_mask(labels, _gen(3)), classmix_mask(labels, _gen(3)))
    counts = torch.zeros(4)
    g = _gen(11)
    draws = 400
    for _ in range(draws):
        chosen = choose_half_classes(labels[0], g)
        counts += torch.isin(torch.tensor([1, 3, 6, 9]), chosen).float()
    assert ((counts / draws - 0.5).abs() < 0.1).all()   # each class is pasted about half the time
    masks = {tuple(classmix_mask(labels, _gen(s)).flatten().tolist()) for s in range(20)}
    assert len(masks) > 3                                # C(4, 2) = 6 possible choices


def test_classmix_mask_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        classmix_mask(torch.zeros(4, 4, dtype=torch.long), _gen())


def test_mix_images_labels_and_weights():
    g = _gen(1)
    mask = torch.rand(2, 5, 6, generator=g) < 0.5
    src_img, trg_img = torch.rand(2, 3, 5, 6, generator=g), torch.rand(2, 3, 5, 6, generator=g)
    mixed = mix(mask, src_img, trg_img)
    m = mask[:, None].expand_as(src_img)
    assert torch.equal(mixed[m], src_img[m]) and torch.equal(mixed[~m], trg_img[~m])
    src_lbl = torch.randint(0, 19, (2, 5, 6), generator=g)
    pseudo = torch.randint(0, 19, (2, 5, 6), generator=g)
    lbl = mix(mask, src_lbl, pseudo)
    assert lbl.dtype == src_lbl.dtype
    assert torch.equal(lbl[mask], src_lbl[mask]) and torch.equal(lbl[~mask], pseudo[~mask])


def test_mix_errors():
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="differ"):
        mix(mask, torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="mask"):
        mix(mask, torch.zeros(3, 3, 4, 4), torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        mix(mask, torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 5, 4))


def _teacher_probs():
    # image 0: max probabilities 0.99, 0.968, 0.5, 0.97 -> 3 of 4 at or above 0.968 (>= as the reference)
    # image 1: 0.6, 0.6, 0.6, 0.99 -> 1 of 4
    top = torch.tensor([[0.99, 0.968, 0.5, 0.97], [0.6, 0.6, 0.6, 0.99]])
    return torch.stack([top, 1 - top], 1).reshape(2, 2, 2, 2)


def test_confidence_weight_per_image_and_pooled():
    probs = _teacher_probs()
    # the reference pools the batch: 4 of 8 pixels confident -> 0.5 for both mixed images
    torch.testing.assert_close(confidence_weight(probs), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(confidence_weight(probs, per_image=True), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(confidence_weight(probs, threshold=0.5), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(confidence_weight(probs, threshold=0.995), torch.tensor([0.0, 0.0]))
    assert DEFAULT_CONFIDENCE_THRESHOLD == 0.968
    with pytest.raises(ValueError, match="teacher"):
        confidence_weight(probs[0])


def test_mixed_pixel_weight_is_one_on_source_and_the_weight_on_target():
    mask = torch.tensor([[[True, False], [False, False]], [[False, True], [True, True]]])
    w = mixed_pixel_weight(mask, torch.tensor([0.75, 0.25]))
    assert w.tolist() == [[[1.0, 0.75], [0.75, 0.75]], [[0.25, 1.0], [1.0, 1.0]]]


def test_weighted_cross_entropy_counts_ignored_pixels_in_the_mean():
    logits = torch.zeros(1, 4, 2, 2, requires_grad=True)   # CE = ln 4 at every labelled pixel
    labels = torch.tensor([[[0, 1], [IGNORE_INDEX, 2]]])
    weight = torch.tensor([[[1.0, 0.5], [1.0, 1.0]]])
    loss = weighted_cross_entropy(logits, labels, weight)
    assert loss.item() == pytest.approx((1 + 0.5 + 0 + 1) * math.log(4) / 4, rel=1e-6)
    loss.backward()
    assert logits.grad[0, :, 1, 0].abs().sum() == 0          # the ignored pixel gets no gradient
    assert logits.grad[0, :, 0, 1].abs().sum() > 0


def test_weighted_cross_entropy_upsamples_logits_and_checks_weights():
    logits = torch.randn(2, 19, 4, 4)
    labels = torch.randint(0, 19, (2, 8, 8))
    ones = weighted_cross_entropy(logits, labels, torch.ones(2, 8, 8))
    up = nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    assert ones.item() == pytest.approx(nn.functional.cross_entropy(up, labels).item(), rel=1e-5)
    assert weighted_cross_entropy(logits, labels, torch.zeros(2, 8, 8)).item() == 0
    with pytest.raises(ValueError, match="pixel weight"):
        weighted_cross_entropy(logits, labels, torch.ones(2, 4, 4))


@pytest.mark.parametrize("step,expected", [(0, 0.0), (1, 0.5), (9, 0.9), (99, 0.99), (100, 0.99), (10**6, 0.99)])
def test_ema_alpha_uses_the_true_mean_first(step, expected):
    assert ema_alpha(step, 0.99) == pytest.approx(expected)


def test_ema_alpha_errors():
    with pytest.raises(ValueError, match="alpha"):
        ema_alpha(3, 1.5)
    with pytest.raises(ValueError, match="step"):
        ema_alpha(-1)


def _net():
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))


def _fill(module, value):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)
    return module


def test_ema_update_math_on_a_tiny_module():
    student, teacher = _fill(_net(), 2.0), _fill(_net(), 10.0)
    assert ema_update(teacher, student, 0.99, step=1) == 0.5
    assert all(torch.allclose(p, torch.full_like(p, 6.0)) for p in teacher.parameters())
    assert ema_update(teacher, student, 0.99, step=500) == pytest.approx(0.99)
    assert all(torch.allclose(p, torch.full_like(p, 0.99 * 6 + 0.01 * 2)) for p in teacher.parameters())
    # the student is untouched and no graph links them
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in student.parameters())
    assert all(p.grad_fn is None for p in teacher.parameters())


def test_ema_update_at_step_zero_copies_the_student_exactly():
    student, teacher = _net(), _fill(_net(), float("nan"))
    ema_update(teacher, student, step=0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_ema_update_copies_buffers_only_when_asked():
    student = _net()
    student.train()
    student(torch.randn(8, 2))                               # moves running statistics
    teacher = _net()
    kept = copy.deepcopy(teacher)
    ema_update(teacher, student, step=5)                     # reference: buffers left alone
    for t, k in zip(teacher.buffers(), kept.buffers()):
        assert torch.equal(t, k)
    ema_update(teacher, student, step=5, copy_buffers=True)
    for t, s in zip(teacher.buffers(), student.buffers()):
        assert torch.equal(t, s)
    assert int(teacher[1].num_batches_tracked) == 1


def test_ema_update_rejects_different_architectures():
    with pytest.raises(ValueError, match="parameter"):
        ema_update(nn.Linear(2, 3), nn.Linear(3, 2), step=1)
    with pytest.raises(ValueError, match="parameters"):
        ema_update(nn.Linear(2, 3), _net(), step=1)


def test_one_dacs_batch_end_to_end():
    """Source labels pasted where the mask is, teacher argmax elsewhere, weight 1 on pasted pixels."""
    src_lbl = _labels(n=2, h=6, w=8, seed=3)
    teacher_probs = torch.randn(2, 19, 6, 8, generator=_gen(4)).mul(4).softmax(1)
    mask = classmix_mask(src_lbl, _gen(5))
    pseudo = teacher_probs.argmax(1)
    mixed_lbl = mix(mask, src_lbl, pseudo)
    weight = mixed_pixel_weight(mask, confidence_weight(teacher_probs))
    assert torch.equal(mixed_lbl[mask], src_lbl[mask]) and torch.equal(mixed_lbl[~mask], pseudo[~mask])
    share = (teacher_probs.max(1).values >= 0.968).float().mean().repeat(2)   # pooled, as the reference
    expected_w = torch.where(mask, torch.ones_like(weight), share[:, None, None].expand_as(weight))
    torch.testing.assert_close(weight, expected_w)
    loss = weighted_cross_entropy(torch.randn(2, 19, 6, 8), mixed_lbl, weight)
    assert torch.isfinite(loss) and loss > 0


# --- strong augmentation of the mixed images (the reference's strongTransform) ----------------------

MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


def _norm(rgb):
    return (rgb - MEAN) / STD


def _denorm(x):
    return x * STD + MEAN


def _jitter(images, b=1.0, c=1.0, s=1.0, h=0.0, order=(0, 1, 2, 3)):
    n = images.shape[0]
    full = lambda v: torch.full((n,), float(v))                       # noqa: E731
    return jitter_colours(images, full(b), full(c), full(s), full(h), torch.tensor([order] * n))


def test_hsv_round_trip_and_agreement_with_colorsys():
    import colorsys
    rgb = torch.rand(2, 3, 6, 7, generator=_gen(2))
    hsv = rgb_to_hsv(rgb)
    torch.testing.assert_close(hsv_to_rgb(hsv), rgb, atol=1e-5, rtol=0)
    for (i, y, x) in [(0, 0, 0), (1, 3, 4), (0, 5, 6)]:
        expected = colorsys.rgb_to_hsv(*rgb[i, :, y, x].tolist())
        torch.testing.assert_close(hsv[i, :, y, x], torch.tensor(expected), atol=1e-5, rtol=0)


def test_colour_jitter_is_kornias_of_the_reference_step_by_step():
    rgb = torch.rand(2, 3, 4, 5, generator=_gen(3)) * 0.8 + 0.1
    x = _norm(rgb)
    torch.testing.assert_close(_jitter(x), x, atol=1e-5, rtol=0)                 # neutral factors
    # brightness is additive (kornia adjust_brightness(x, b - 1)), clipped to [0, 1]
    torch.testing.assert_close(_denorm(_jitter(x, b=1.2)), (rgb + 0.2).clamp(0, 1), atol=1e-5, rtol=0)
    # contrast is multiplicative (kornia adjust_contrast), clipped
    torch.testing.assert_close(_denorm(_jitter(x, c=1.25)), (rgb * 1.25).clamp(0, 1), atol=1e-5, rtol=0)
    # saturation 0: grey at the HSV value (max channel)
    grey = _denorm(_jitter(x, s=0.0))
    torch.testing.assert_close(grey, rgb.max(1, keepdim=True).values.expand_as(rgb), atol=1e-5, rtol=0)
    # hue in turns: a third of a turn maps red to green
    red = _norm(torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2))
    torch.testing.assert_close(_denorm(_jitter(red, h=1 / 3)),
                               torch.tensor([0.0, 1.0, 0.0]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2),
                               atol=1e-5, rtol=0)
    # the order is applied as given: brightness then contrast differs from contrast then brightness
    a, b = _jitter(x, b=1.2, c=0.8, order=(0, 1, 2, 3)), _jitter(x, b=1.2, c=0.8, order=(1, 0, 2, 3))
    torch.testing.assert_close(_denorm(a), ((rgb + 0.2).clamp(0, 1) * 0.8), atol=1e-5, rtol=0)
    torch.testing.assert_close(_denorm(b), (rgb * 0.8 + 0.2).clamp(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side,size", [(512, 51), (513, 51), (720, 71), (1024, 103), (32, 3), (64, 7), (6, 1)])
def test_blur_kernel_size_is_the_references_odd_tenth(side, size):
    assert blur_kernel_size(side) == size and size % 2 == 1


def _energy_high(x):
    """Energy of horizontal and vertical pixel differences: high frequencies."""
    return (x.diff(dim=-1).pow(2).mean() + x.diff(dim=-2).pow(2).mean()).item()


def test_gaussian_blur_keeps_constants_and_removes_high_frequencies():
    const = torch.full((1, 3, 40, 50), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([1.0])), const)
    noise = torch.randn(2, 3, 40, 50, generator=_gen(4))
    blurred = gaussian_blur(noise, torch.tensor([0.5, 1.15]))
    assert blurred.shape == noise.shape
    assert _energy_high(blurred[1]) < 0.2 * _energy_high(noise[1])
    assert _energy_high(blurred[1]) < _energy_high(blurred[0]) < _energy_high(noise[0])   # per-image sigma
    torch.testing.assert_close(blurred.mean(), noise.mean(), atol=2e-2, rtol=0)


def test_strong_augment_probabilities_switches_and_determinism():
    images = _norm(torch.rand(2, 3, 20, 30, generator=_gen(5)))
    jittered = blurred = 0
    runs = 400
    for seed in range(runs):
        out, done = strong_augment(images, _gen(seed))
        again, done_again = strong_augment(images, _gen(seed))
        assert torch.equal(out, again) and done == done_again            # the generator decides all
        jittered += done["jitter"]
        blurred += done["blur"]
        off, done_off = strong_augment(images, _gen(seed), jitter=False, blur=False)
        assert torch.equal(off, images) and done_off == {"jitter": False, "blur": False}
        # switching the jitter off leaves the blur's draws alone
        assert strong_augment(images, _gen(seed), jitter=False)[1]["blur"] == done["blur"]
    assert abs(jittered / runs - JITTER_P) < 0.06 and abs(blurred / runs - BLUR_P) < 0.07


def _seed_doing(images, jitter: bool, blur: bool) -> int:
    return next(s for s in range(100) if strong_augment(images, _gen(s))[1] == {"jitter": jitter, "blur": blur})


def test_strong_augment_jitters_channel_statistics_and_blurs():
    g = _gen(6)
    rgb = (torch.rand(2, 3, 32, 48, generator=g) * 0.6 + 0.2)
    images = _norm(rgb)
    out, done = strong_augment(images, _gen(_seed_doing(images, True, False)))
    assert done == {"jitter": True, "blur": False}
    assert not torch.allclose(out.mean((2, 3)), images.mean((2, 3)), atol=1e-3)   # channel means moved
    out, done = strong_augment(images, _gen(_seed_doing(images, False, True)))
    assert done == {"jitter": False, "blur": True}
    assert _energy_high(out) < _energy_high(images)


# --- the DACS step ------------------------------------------------------------------------------------

def _dacs(tmp_path, seed=0, **overrides):
    from segshift.components.config import load_params
    from segshift.components.models.factory import build_model
    from tests.conftest import write_params
    sets = {"model.width": 0.125, "inter.method": "dacs", **{f"methods.dacs.{k}": v for k, v in overrides.items()}}
    params = load_params(write_params(tmp_path), sets)
    torch.manual_seed(0)
    return DACS(build_model(params.model), params.inter, params.methods.dacs, seed=seed), params


def _dacs_batch(n=2, size=(32, 64)):
    g = _gen(1)
    labels = torch.zeros(n, *size, dtype=torch.long)
    labels[:, size[0] // 2:] = 2
    labels[:, :, : size[1] // 4] = 11
    labels[:, :4, :4] = IGNORE_INDEX
    images = _norm(torch.rand(n, 3, *size, generator=g))
    targets = _norm(torch.rand(n, 3, *size, generator=g))
    return {"labelled": (images, labels), "unlabelled": (targets, torch.empty(0))}


def _run(method, batch, step):
    inputs = []
    model = method.modules["model"]
    handle = model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    try:
        logs = method.training_step(batch, step, lambda loss: loss.backward())
    finally:
        handle.remove()
    return logs, inputs


def _step_generator(seed, step, micro=0, rank=0):
    import numpy as np
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0]))


def _plain_mix(batch, seed, step):
    images, labels = batch["labelled"]
    g = _step_generator(seed, step)
    mask = classmix_mask(labels, g)
    return mix(mask, images, batch["unlabelled"][0]), g


def test_the_student_learns_the_jittered_and_blurred_mix(tmp_path):
    batch = _dacs_batch()
    step = next(s for s in range(200) if strong_augment(
        _plain_mix(batch, 0, s)[0], _plain_mix(batch, 0, s)[1])[1] == {"jitter": True, "blur": True})
    method, _ = _dacs(tmp_path)
    _, inputs = _run(method, batch, step)
    assert len(inputs) == 2 and torch.equal(inputs[0], batch["labelled"][0])
    plain, g = _plain_mix(batch, 0, step)
    expected, _ = strong_augment(plain, g)
    torch.testing.assert_close(inputs[1], expected)
    assert not torch.allclose(inputs[1], plain, atol=1e-3)
    assert _energy_high(inputs[1]) < 0.5 * _energy_high(plain)              # blurred
    assert not torch.allclose(inputs[1].mean((2, 3)), plain.mean((2, 3)), atol=1e-2)   # jittered


def test_with_the_strong_augmentation_off_the_student_learns_the_plain_mix(tmp_path):
    batch = _dacs_batch()
    method, _ = _dacs(tmp_path, color_jitter=False, blur=False)
    for step in (0, 1, 2):
        _, inputs = _run(method, batch, step)
        assert torch.equal(inputs[1], _plain_mix(batch, 0, step)[0])


def _bn_layers(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _teacher_calls(method, batch, step):
    """For each teacher BatchNorm call during the step: (training flag, running mean at the call,
    output equals batch-statistics normalisation of the input)."""
    teacher = method.modules["teacher"]
    seen = []

    def hook(m, args, out):
        x = args[0]
        batch_norm = nn.functional.batch_norm(x, None, None, m.weight, m.bias, training=True, eps=m.eps)
        seen.append((m.training, torch.allclose(out, batch_norm, atol=1e-4)))

    handles = [m.register_forward_hook(hook) for m in _bn_layers(teacher)]
    buffers = {}
    handles.append(teacher.register_forward_pre_hook(
        lambda m, args: buffers.update({k: v.clone() for k, v in m.named_buffers()})))
    try:
        method.training_step(batch, step, lambda loss: loss.backward())
    finally:
        for h in handles:
            h.remove()
    return seen, buffers


def test_the_teacher_pseudo_labels_in_train_mode_with_batch_statistics(tmp_path):
    method, params = _dacs(tmp_path)
    assert params.methods.dacs.teacher_mode == "train"
    batch = _dacs_batch()
    seen, _ = _teacher_calls(method, batch, 0)
    assert seen and all(training for training, _ in seen)
    assert all(batch_stats for _, batch_stats in seen)       # normalised with the target batch's statistics


def test_teacher_buffers_are_its_own_by_default_and_the_students_in_eval_mode(tmp_path):
    batch = _dacs_batch()
    for mode in ("train", "eval"):
        (tmp_path / mode).mkdir()
        method, _ = _dacs(tmp_path / mode, teacher_mode=mode)
        student, teacher = method.modules["model"], method.modules["teacher"]
        method.training_step(batch, 0, lambda loss: loss.backward())
        with torch.no_grad():                                  # the student's statistics move apart
            student.train()
            student(batch["unlabelled"][0] * 3 + 1)
        teacher_before = {k: v.clone() for k, v in teacher.named_buffers()}
        student_now = {k: v.clone() for k, v in student.named_buffers()}
        seen, at_call = _teacher_calls(method, batch, 1)
        keys = [k for k in at_call if k.endswith("running_mean")]
        assert keys
        if mode == "train":
            assert all(training and stats for training, stats in seen)
            assert all(torch.equal(at_call[k], teacher_before[k]) for k in keys)   # not averaged, not copied
            assert not all(torch.equal(at_call[k], student_now[k]) for k in keys)
        else:
            assert not any(training for training, _ in seen)
            assert all(torch.equal(at_call[k], student_now[k]) for k in keys)


def test_the_teacher_follows_once_per_optimiser_step_under_accumulation(tmp_path):
    method, _ = _dacs(tmp_path)
    student, teacher = method.modules["model"], method.modules["teacher"]
    batch = _dacs_batch()
    method.training_step(batch, 0, lambda loss: loss.backward())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    method.training_step(batch, 1, lambda loss: loss.backward())     # alpha(0) = 0: a copy
    before = [t.clone() for t in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    for _ in range(3):                                                # three micro-batches of step 2
        method.training_step(batch, 2, lambda loss: loss.backward())
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.5 * b + 0.5 * s, atol=1e-6)       # alpha(1) = 0.5, applied once


def test_micro_batches_of_a_step_draw_different_mixes(tmp_path):
    method, _ = _dacs(tmp_path)
    batch = _dacs_batch()
    _, first = _run(method, batch, 4)
    _, second = _run(method, batch, 4)
    assert not torch.equal(first[1], second[1])


def test_config_defaults_are_the_references(tmp_path):
    from segshift.components.config import DacsConfig
    _, params = _dacs(tmp_path)
    cfg = params.methods.dacs
    assert (cfg.ema_alpha, cfg.confidence_threshold, cfg.mixed_weight) == (0.99, 0.968, 1.0)
    assert (cfg.teacher_mode, cfg.confidence_per_image, cfg.classmix_ignore, cfg.color_jitter, cfg.blur) \
        == ("train", False, True, True, True)
    bare = DacsConfig(ema_alpha=0.99, confidence_threshold=0.968, mixed_weight=1.0)
    assert bare == cfg
    with pytest.raises(Exception, match="teacher_mode"):
        DacsConfig(ema_alpha=0.99, confidence_threshold=0.968, mixed_weight=1.0, teacher_mode="student")
