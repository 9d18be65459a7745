"""LSE mechanisms: per-class entropy thresholds, the p schedule, aligned scale-invariant crops, the loss."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.methods.lse import (
    CropBox,
    boundary_entropy_threshold,
    class_confidence_scores,
    class_entropy_thresholds,
    class_selection,
    images_per_class,
    lse_loss,
    normalise_entropy_per_class,
    scale_invariant_crop,
    schedule_rounds,
    select_confident_images,
    select_pseudo_labels,
    share_schedule,
)

# --- class-specific entropy thresholds ------------------------------------------------------------


def _hand_made():
    # class 0: ten pixels, entropies 0.1 .. 1.0; class 1: four pixels; two IGNORE pixels (not counted)
    predicted = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0],
                              [0, 0, 1, 1, 1, 1, 255, 255]])
    entropy = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 1.0, 0.4],
                            [0.8, 0.6, 0.5, 0.05, 0.3, 0.9, 0.0, 0.0]])
    return predicted, entropy


def test_threshold_is_the_mean_normalised_entropy_of_the_class_in_its_boundary_image():
    # the authors' rule (LSE.py, class_wise_sort): min-max normalise the entropy of each predicted
    # class's pixels in the boundary image, the threshold of class c is the mean over c's pixels
    predicted = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 0]])
    entropy = torch.tensor([[0.2, 0.4, 1.0, 0.3], [0.5, 0.9, 0.7, 0.6]])
    # class 0: 0.2 0.4 1.0 0.6 -> 0 .25 1 .5 -> 0.4375; class 1: 0.3 0.5 0.9 -> 0 1/3 1 -> 4/9
    assert boundary_entropy_threshold(entropy, predicted, 0) == pytest.approx(0.4375)
    assert boundary_entropy_threshold(entropy, predicted, 1) == pytest.approx(4 / 9)
    assert boundary_entropy_threshold(entropy, predicted, 2) == float("inf")   # one pixel: 0/0 keeps all
    assert boundary_entropy_threshold(entropy, predicted, 3) == 1.0            # reference's initial value
    # any increasing affine map of the entropy (log base, / log C) gives the same thresholds
    assert boundary_entropy_threshold(2.5 * entropy + 0.1, predicted, 1) == pytest.approx(4 / 9)
    t = class_entropy_thresholds({0: (entropy, predicted), 1: (entropy, predicted)}, num_classes=4)
    assert t.dtype == torch.float32 and t.tolist() == pytest.approx([0.4375, 4 / 9, 1.0, 1.0])
    with pytest.raises(ValueError, match="class 5"):
        class_entropy_thresholds({5: (entropy, predicted)}, num_classes=4)


def test_pixels_reaching_the_threshold_after_per_image_normalisation_are_ignored():
    x = IGNORE_INDEX
    predicted = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 255]])
    entropy = torch.tensor([[0.5, 0.6, 0.7, 0.9, 0.6, 0.7, 0.95, 0.0]])
    # normalised: class 0 -> 0 .25 .5 1, class 1 -> 0 1, class 2 (one pixel) -> 0
    t = torch.tensor([0.4375, 4 / 9, float("inf")])
    labels = select_pseudo_labels(predicted, entropy, t)
    assert torch.equal(labels, torch.tensor([[0, 0, x, x, 1, x, 2, x]]))
    assert labels.dtype == torch.long and torch.equal(predicted, torch.tensor([[0, 0, 0, 0, 1, 1, 2, 255]]))
    # ">=": a pixel exactly at the threshold is ignored (the reference's `SE >= th -> 0`)
    at = select_pseudo_labels(predicted, entropy, torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(at, torch.tensor([[0, 0, x, x, 1, x, 2, x]]))
    # a class whose entropies are all equal in the image is kept (NaN in the reference, kept there)
    flat = select_pseudo_labels(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), 0.8), torch.tensor([0.1]))
    assert (flat == 0).all()


def test_a_stack_is_normalised_image_by_image():
    predicted = torch.zeros(2, 1, 2, dtype=torch.long)
    entropy = torch.tensor([[[0.1, 0.2]], [[0.8, 0.9]]])
    labels = select_pseudo_labels(predicted, entropy, torch.tensor([0.5]))
    x = IGNORE_INDEX
    assert torch.equal(labels, torch.tensor([[[0, x]], [[0, x]]]))      # over the stack: [[0, 0]], [[x, x]]
    assert torch.equal(labels[1], select_pseudo_labels(predicted[1], entropy[1], torch.tensor([0.5])))


def test_per_class_normalisation_is_min_max():
    predicted, entropy = _hand_made()
    normalised = normalise_entropy_per_class(entropy, predicted, num_classes=3)
    assert normalised[predicted == 0].min().item() == 0 and normalised[predicted == 0].max().item() == 1
    assert normalised[0, 4].item() == pytest.approx((0.5 - 0.1) / 0.9)
    assert normalised[1, 3].item() == 0.0 and normalised[1, 5].item() == pytest.approx(1.0)
    assert torch.equal(normalised[predicted == 255], entropy[predicted == 255])
    constant = normalise_entropy_per_class(torch.full((2, 2), 0.7), torch.zeros(2, 2, dtype=torch.long), 1)
    assert torch.equal(constant, torch.zeros(2, 2))


def test_shape_mismatches_are_refused():
    predicted, entropy = _hand_made()
    with pytest.raises(ValueError, match="differ in shape"):
        boundary_entropy_threshold(entropy[:, :4], predicted, 0)
    with pytest.raises(ValueError, match="differ in shape"):
        select_pseudo_labels(predicted, entropy[:1], torch.zeros(19))
    with pytest.raises(ValueError, match="num_classes"):
        select_pseudo_labels(predicted, entropy, torch.zeros(2, 19))


# --- confident images per class -----------------------------------------------------------------


def test_class_confidence_is_the_mean_max_softmax_of_the_class_pixels():
    probs = torch.zeros(2, 3, 1, 3)
    probs[0, :, 0, 0] = torch.tensor([0.6, 0.3, 0.1])   # class 0, 0.6
    probs[0, :, 0, 1] = torch.tensor([0.8, 0.1, 0.1])   # class 0, 0.8
    probs[0, :, 0, 2] = torch.tensor([0.2, 0.7, 0.1])   # class 1, 0.7
    probs[1, :, :, :] = torch.tensor([0.1, 0.1, 0.8]).view(3, 1, 1)   # all class 2
    scores = class_confidence_scores(probs)
    assert scores.shape == (2, 3)
    assert scores[0, 0].item() == pytest.approx(0.7) and scores[0, 1].item() == pytest.approx(0.7)
    assert math.isnan(scores[0, 2].item()) and math.isnan(scores[1, 0].item())
    assert scores[1, 2].item() == pytest.approx(0.8)


def test_images_per_class_is_the_reference_floor_of_n_times_p_over_19():
    assert images_per_class(2975, 0.1, 19) == 15      # Cityscapes road, round 1
    assert images_per_class(2975, 0.4, 19) == 62
    assert images_per_class(400, 0.1, 19) == 2
    assert images_per_class(189, 0.1, 19) == 0        # rarer than 19 / p images: none (as the reference)


def test_confident_images_per_class_follow_the_reference_rule_with_boundaries():
    nan = float("nan")
    scores = np.full((400, 19), nan)
    scores[:, 0] = np.arange(400) / 1000               # in all 400: int(400 * 0.1 / 19) = 2 -> 399, 398
    scores[:200, 1] = 1 - np.arange(200) / 1000        # in 200: int(1.05) = 1 -> image 0
    scores[200:350, 2] = np.arange(200, 350) / 1000    # in 150: int(0.79) = 0 -> none
    selection = class_selection(scores, 0.1)
    assert selection.images == [0, 398, 399]
    # the boundary image (threshold source) is the most confident one not kept
    assert selection.boundary == [397, 1, 349] + [None] * 16
    assert select_confident_images(torch.tensor(scores), 0.1) == [0, 398, 399]
    ties = np.full((57, 19), nan)
    ties[:, 0] = 0.5
    assert class_selection(ties, 1.0) == ([0, 1, 2], [3] + [None] * 18)   # int(57 / 19) = 3, lower index first
    with pytest.raises(ValueError, match="share = 0"):
        select_confident_images(scores, 0)


def test_selection_and_thresholds_from_a_tiny_confidence_map():
    # 40 images of 1 x 4 pixels, 2 classes (p / 2): class 0 on pixels 0-2 of every image, class 1 on
    # pixel 3 of images 0-19; image i's class-0 confidences rise with i
    probs = torch.zeros(40, 2, 1, 4)
    for i in range(40):
        for j, conf in enumerate((0.60 + 0.005 * i, 0.70 + 0.005 * i, 0.55 + 0.002 * i)):
            probs[i, :, 0, j] = torch.tensor([conf, 1 - conf])
        if i < 20:
            probs[i, :, 0, 3] = torch.tensor([0.1 + 0.01 * i, 0.9 - 0.01 * i])
        else:
            probs[i, :, 0, 3] = torch.tensor([0.95, 0.05])
    selection = class_selection(class_confidence_scores(probs), 0.2)
    # class 0: int(40 * 0.1) = 4 -> images 36..39 (the mean is largest for i >= 20, pixel 3 at 0.95);
    # class 1: int(20 * 0.1) = 2 -> images 0, 1; boundaries 35 and 2
    assert selection.images == [0, 1, 36, 37, 38, 39]
    assert selection.boundary == [35, 2]
    predicted = probs.argmax(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    t = class_entropy_thresholds({c: (entropy[i], predicted[i]) for c, i in enumerate(selection.boundary)}, 2)
    # image 35, class 0: confidences .775 .875 .62 .95 -> binary entropies, min-max, mean
    h = lambda q: -(q * math.log(q) + (1 - q) * math.log(1 - q))
    e = [h(0.775), h(0.875), h(0.62), h(0.95)]
    assert t[0].item() == pytest.approx(np.mean([(v - min(e)) / (max(e) - min(e)) for v in e]), abs=1e-5)
    assert t[1].item() == float("inf")                  # class 1 has one pixel in image 2


# --- the growing share ----------------------------------------------------------------------------


def test_reference_schedule_grows_by_five_points_up_to_forty_percent_in_seven_rounds():
    values = [share_schedule(r) for r in range(9)]
    assert values == pytest.approx([0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.4, 0.4])
    assert share_schedule(6) == 0.4                   # exactly the maximum, not 0.40000000000000002
    assert schedule_rounds() == 7
    assert schedule_rounds(0.2, 0.1, 0.5) == 4
    assert schedule_rounds(0.3, 0.0, 0.3) == 1
    assert share_schedule(3, start=0.2, step=0.0, maximum=0.5) == 0.2


@pytest.mark.parametrize("kwargs,match", [
    ({"round": -1}, "round = -1"), ({"round": 1.5}, "round = 1.5"), ({"round": 0, "start": 0}, "start = 0"),
    ({"round": 0, "maximum": 1.2}, "maximum = 1.2"), ({"round": 0, "step": -0.05}, "step = -0.05"),
    ({"round": 0, "start": 0.5, "maximum": 0.4}, "maximum = 0.4"),
])
def test_bad_schedule_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        share_schedule(**kwargs)


# --- scale-invariant crops -------------------------------------------------------------------------


def _coordinate_image(height: int, width: int):
    """Image channels 0/1 hold each pixel's row/column; the label encodes the same coordinates."""
    rows = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width)
    cols = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width)
    image = torch.stack([rows, cols, torch.zeros(height, width)])
    label = (rows * width + cols).long()
    return image, label


@pytest.mark.parametrize("height,width,scale", [(32, 64, 2.0), (33, 47, 2.0), (30, 45, 1.5), (24, 40, 3.0)])
def test_zoomed_crop_and_its_label_stay_pixel_aligned(height, width, scale):
    image, label = _coordinate_image(height, width)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        ex = scale_invariant_crop(image, label, scale, generator=gen)
        top, left, h, w = ex.box
        assert (h, w) == (int(height / scale), int(width / scale))
        assert ex.image.shape == (3, height, width) and ex.label.shape == (height, width)
        label_rows, label_cols = ex.label // width, ex.label % width
        # the label comes from inside the crop box ...
        assert label_rows.min() >= top and label_rows.max() <= top + h - 1
        assert label_cols.min() >= left and label_cols.max() <= left + w - 1
        # ... and from the source pixel nearest to where the image pixel was sampled
        assert (ex.image[0] - label_rows).abs().max().item() <= 0.5 + 1e-4
        assert (ex.image[1] - label_cols).abs().max().item() <= 0.5 + 1e-4


def test_label_derived_from_the_zoomed_image_equals_the_zoomed_label():
    # piecewise-constant image (4x4 blocks), label = block value: for an integer zoom the label of
    # each zoomed pixel must be the block its image value came from, including ignore blocks
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 20, (8, 12), generator=gen)
    blocks[blocks == 19] = IGNORE_INDEX
    label = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)            # (32, 48)
    image = label.float().unsqueeze(0).repeat(3, 1, 1)
    box = CropBox(6, 10, 16, 24)
    ex = scale_invariant_crop(image, label, 2, box=box)
    crop = label[6:22, 10:34]
    assert torch.equal(ex.label, crop.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert ex.label.dtype == label.dtype
    # where the zoomed image is locally constant (inside a block) it equals its label
    channel = ex.image[:1, None]
    inside = (F.max_pool2d(channel, 3, 1, 1) == -F.max_pool2d(-channel, 3, 1, 1))[0, 0]
    assert inside.sum() > 0.25 * inside.numel()
    assert torch.equal(ex.image[0][inside].long(), ex.label[inside])


def test_crops_are_reproducible_and_cover_the_image():
    image, label = _coordinate_image(20, 30)
    a = [scale_invariant_crop(image, label, 2, torch.Generator().manual_seed(5)).box for _ in range(2)]
    assert a[0] == a[1]
    gen = torch.Generator().manual_seed(7)
    boxes = [scale_invariant_crop(image, label, 2, gen).box for _ in range(300)]
    tops, lefts = {b.top for b in boxes}, {b.left for b in boxes}
    assert tops == set(range(11)) and lefts == set(range(16))    # every valid position, no other


def test_scale_one_is_the_identity_and_uint8_labels_keep_their_dtype():
    image, _ = _coordinate_image(9, 13)
    label = torch.randint(0, 19, (9, 13), dtype=torch.uint8)
    ex = scale_invariant_crop(image, label, 1)
    assert ex.box == (0, 0, 9, 13)
    assert torch.allclose(ex.image, image) and torch.equal(ex.label, label)


@pytest.mark.parametrize("scale", [0.5, 0, -2, float("inf"), float("nan")])
def test_bad_scale_is_refused_naming_the_value(scale):
    image, label = _coordinate_image(8, 8)
    with pytest.raises(ValueError, match="scale = "):
        scale_invariant_crop(image, label, scale)


def test_bad_inputs_and_boxes_are_refused():
    image, label = _coordinate_image(16, 16)
    with pytest.raises(ValueError, match="does not match"):
        scale_invariant_crop(image, label[:8], 2)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        scale_invariant_crop(image[None], label, 2)
    with pytest.raises(ValueError, match="not the crop size"):
        scale_invariant_crop(image, label, 2, box=(0, 0, 4, 4))
    with pytest.raises(ValueError, match="outside"):
        scale_invariant_crop(image, label, 2, box=(9, 0, 8, 8))


# --- the loss -------------------------------------------------------------------------------------


def test_loss_is_cross_entropy_plus_beta_focal_term_by_hand():
    # three pixels (rows: their logits over 3 classes); the third is ignored
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]]).T.reshape(1, 3, 1, 3)
    labels = torch.tensor([[[0, 0, IGNORE_INDEX]]])
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    p1 = 1 / (1 + math.e + 1)
    ce = [-math.log(p0), -math.log(p1)]
    gamma, beta = 3.0, 0.1
    expected = sum(c + beta * (1 - math.exp(-c)) ** gamma * c for c in ce) / 2
    assert lse_loss(logits, labels, gamma, beta).item() == pytest.approx(expected, rel=1e-5)


def test_without_the_focal_term_it_is_the_plain_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 8, 8, generator=gen)
    labels = torch.randint(0, 19, (2, 8, 8), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    plain = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    assert lse_loss(logits, labels, gamma=3, beta=0).item() == pytest.approx(plain.item(), rel=1e-6)
    assert lse_loss(logits, labels, gamma=0, beta=0.5).item() == pytest.approx(1.5 * plain.item(), rel=1e-6)
    focal = lse_loss(logits, labels, 3, 0.1)
    assert plain.item() < focal.item() < 1.1 * plain.item()


def test_focal_term_weights_wrong_pixels_more_than_right_ones():
    labels = torch.zeros(1, 1, 2, dtype=torch.long)
    right = torch.tensor([4.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 2).contiguous()
    wrong = torch.tensor([0.0, 4.0]).view(1, 2, 1, 1).expand(1, 2, 1, 2).contiguous()
    extra = {name: lse_loss(x, labels, 3, 1) - lse_loss(x, labels, 3, 0) for name, x in
             [("right", right), ("wrong", wrong)]}
    ce_right, ce_wrong = math.log(1 + math.exp(-4)), math.log(1 + math.exp(4))
    # (float32: the tiny term of a right pixel is a difference of two nearly equal losses)
    assert extra["right"].item() == pytest.approx(ce_right * (1 - math.exp(-ce_right)) ** 3, rel=2e-2)
    assert extra["wrong"].item() == pytest.approx(ce_wrong * (1 - math.exp(-ce_wrong)) ** 3, rel=1e-4)
    assert extra["wrong"] / ce_wrong > 100 * extra["right"] / ce_right


def test_low_resolution_logits_are_upsampled_and_all_ignored_gives_zero_with_a_graph():
    logits = torch.randn(1, 19, 4, 4, requires_grad=True)
    labels = torch.randint(0, 19, (1, 16, 16))
    expected = lse_loss(F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False), labels)
    assert lse_loss(logits, labels).item() == pytest.approx(expected.item())
    empty = lse_loss(logits, torch.full((1, 16, 16), IGNORE_INDEX))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert logits.grad is not None and not logits.grad.isnan().any()


@pytest.mark.parametrize("kwargs,match", [({"gamma": -1}, "gamma = -1"), ({"beta": -0.1}, "beta = -0.1"),
                                          ({"gamma": float("nan")}, "gamma = nan")])
def test_bad_loss_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lse_loss(torch.zeros(1, 19, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), **kwargs)


def test_the_reference_crop_is_half_the_size_zoomed_2x():
    image = torch.arange(8 * 16, dtype=torch.float32).view(1, 8, 16)
    label = torch.arange(8 * 16).view(8, 16) % 19
    example = scale_invariant_crop(image, label, generator=torch.Generator().manual_seed(0))
    assert (example.box.height, example.box.width) == (4, 8)          # 256x512 of 512x1024
    assert example.image.shape == image.shape and example.label.shape == label.shape
    crop = label[example.box.top:example.box.top + 4, example.box.left:example.box.left + 8]
    assert torch.equal(example.label, crop.repeat_interleave(2, 0).repeat_interleave(2, 1))   # each 2x2


def test_lse_config_refuses_any_zoom_but_the_reference_2x():
    from pydantic import ValidationError
    from segshift.components.config import LseConfig
    good = dict(share_start=0.1, share_step=0.05, share_max=0.4, scale=2.0, crops_per_image=4, gamma=3.0,
                beta=0.1, target_weight=1.0)
    assert LseConfig(**good).scale == 2.0
    for scale in (1.0, 1.5, 3.0):
        with pytest.raises(ValidationError, match=r"methods\.lse\.scale = .*takes only 2\.0.*class_balanced_share"):
            LseConfig(**{**good, "scale": scale})
