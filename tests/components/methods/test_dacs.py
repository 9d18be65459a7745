"""DACS: ClassMix picks half of the classes and only whole classes, mixing composes image, label and
weight as specified, the confidence weight, weighted loss and EMA teacher compute the reference's numbers."""
import copy
import math

import pytest
import torch
from torch import nn

from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.methods.dacs import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    choose_half_classes,
    class_mask,
    classmix_mask,
    confidence_weight,
    ema_alpha,
    ema_update,
    mix,
    mixed_pixel_weight,
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
        chosen = choose_half_classes(label, _gen(seed))
        assert chosen.numel() == expected
        assert set(chosen.tolist()) <= set(present)
        assert chosen.unique().numel() == expected       # without replacement


def test_ignore_can_be_drawn_only_as_in_the_reference():
    label = torch.tensor([[0, 4, IGNORE_INDEX]])
    drawn = [choose_half_classes(label, _gen(s), exclude_ignore=False) for s in range(40)]
    assert {c.numel() for c in drawn} == {2}              # n = 3 "classes" -> 2
    assert any(IGNORE_INDEX in c.tolist() for c in drawn)
    assert all(IGNORE_INDEX not in choose_half_classes(label, _gen(s)).tolist() for s in range(40))


def test_an_all_ignore_label_pastes_nothing():
    labels = torch.full((2, 4, 5), IGNORE_INDEX)
    assert choose_half_classes(labels[0], _gen()).numel() == 0
    assert not classmix_mask(labels, _gen()).any()


def test_classmix_mask_is_membership_in_the_chosen_classes():
    labels = _labels()
    mask = classmix_mask(labels, _gen(7))
    g = _gen(7)                                          # same draws, image by image
    for label, m in zip(labels, mask):
        chosen = choose_half_classes(label, g)
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
    torch.testing.assert_close(confidence_weight(probs), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(confidence_weight(probs, per_image=False), torch.tensor([0.5, 0.5]))
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
    ema_update(teacher, student, step=5, copy_buffers=False)
    for t, k in zip(teacher.buffers(), kept.buffers()):
        assert torch.equal(t, k)
    ema_update(teacher, student, step=5)
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
    share = (teacher_probs.max(1).values >= 0.968).float().flatten(1).mean(1)
    expected_w = torch.where(mask, torch.ones_like(weight), share[:, None, None].expand_as(weight))
    torch.testing.assert_close(weight, expected_w)
    loss = weighted_cross_entropy(torch.randn(2, 19, 6, 8), mixed_lbl, weight)
    assert torch.isfinite(loss) and loss > 0
