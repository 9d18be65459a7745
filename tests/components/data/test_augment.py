"""Source augmentation: geometry keeps image and label aligned, labels keep only valid values and are
never touched by photometric changes, everything is reproducible from the seed."""
import dataclasses

import cv2
import numpy as np
import pytest

from segshift.components.data.augment import (
    AugmentationSpec,
    augment,
    jitter_colours,
    random_blur,
    random_scale,
)
from segshift.components.data.labels import IGNORE_INDEX

# one random colour per class (random, so that no blend of two is exactly a third): the label can be
# read back from the image
PALETTE = np.random.default_rng(1234).integers(20, 256, (19, 3)).astype(np.uint8)
GEOMETRY = AugmentationSpec(scale=(0.6, 1.6), crop=(80, 100), flip=True, jitter_p=0.0, blur_p=0.0)


def _painted(seed=0, block=16, grid=(6, 8)):
    """A label of random class blocks with some ignore blocks, and the image painted from it."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 19, grid)
    blocks[rng.random(grid) < 0.1] = IGNORE_INDEX
    label = np.kron(blocks, np.ones((block, block), np.int64)).astype(np.uint8)
    image = np.zeros((*label.shape, 3), np.uint8)
    valid = label != IGNORE_INDEX
    image[valid] = PALETTE[label[valid]]
    return image, label


def _palette_agreement(image, label):
    """Among labelled pixels whose colour is exactly a palette colour: the share whose label is that
    colour's class, and the share of labelled pixels that are such exact pixels (the rest blend)."""
    valid = label != IGNORE_INDEX
    exact = (image[..., None, :] == PALETTE).all(-1)
    has = exact.any(-1) & valid
    agree = (exact.argmax(-1)[has] == label[has]).mean()
    return agree, has.sum() / max(valid.sum(), 1)


@pytest.mark.parametrize("seed", range(8))
def test_scale_crop_flip_keep_image_and_label_aligned(seed):
    image, label = _painted(seed)
    out_img, out_lbl = augment(image, label, GEOMETRY, np.random.default_rng(seed))
    assert out_img.shape == (80, 100, 3) and out_lbl.shape == (80, 100)
    agree, coverage = _palette_agreement(out_img, out_lbl)
    assert agree == 1.0           # no pixel shows one class's colour under another class's label
    assert coverage > 0.6         # and that covers most pixels (block borders blend)
    # the check has teeth: a label flipped on its own disagrees with its image
    assert _palette_agreement(out_img, out_lbl[:, ::-1].copy())[0] < 0.5 or \
        np.array_equal(out_lbl, out_lbl[:, ::-1])


def test_flip_and_scale_are_both_exercised():
    image, label = _painted(1)
    shapes, flipped = set(), set()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        scaled, _ = random_scale(image, label, GEOMETRY.scale, rng)
        shapes.add(scaled.shape[:2])
        flip_only = AugmentationSpec(scale=(1.0, 1.0), flip=True, jitter_p=0.0, blur_p=0.0)
        out = augment(image, label, flip_only, np.random.default_rng(seed))[1]
        flipped.add(np.array_equal(out, label[:, ::-1]))
    assert len(shapes) > 10 and flipped == {True, False}


def test_labels_keep_only_their_values_plus_ignore_padding():
    image, label = _painted(2)
    values = set(np.unique(label).tolist()) | {IGNORE_INDEX}
    for seed in range(10):
        _, out = augment(image, label, GEOMETRY, np.random.default_rng(seed))
        assert set(np.unique(out).tolist()) <= values


def test_shrinking_pads_label_with_ignore_and_image_with_zero():
    image, label = _painted(3)
    label[label == IGNORE_INDEX] = 0
    spec = AugmentationSpec(scale=(0.5, 0.5), flip=False, jitter_p=0.0, blur_p=0.0)
    out_img, out_lbl = augment(image, label, spec, np.random.default_rng(0))
    assert out_img.shape == image.shape and out_lbl.shape == label.shape   # crop None: input size
    pad = out_lbl == IGNORE_INDEX
    assert pad.mean() == pytest.approx(0.75)                               # (1 - 1/4) of the area
    assert (out_img[pad] == 0).all()
    # the labelled quarter is the half-size label (nearest neighbour of 16 px blocks: exact)
    assert np.array_equal(out_lbl[:48, :64], label[::2, ::2])


def test_same_seed_same_output_different_seed_different_output():
    image, label = _painted(4)
    spec = AugmentationSpec(crop=(64, 96))
    a = augment(image, label, spec, np.random.default_rng(42))
    b = augment(image, label, spec, np.random.default_rng(42))
    c = augment(image, label, spec, np.random.default_rng(43))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))


def test_photometric_changes_never_touch_labels():
    image, label = _painted(5)
    spec = AugmentationSpec(scale=(1.0, 1.0), flip=False, brightness=0.8, contrast=0.8, saturation=0.8,
                            hue=0.5, jitter_p=1.0, blur_p=1.0, blur_sigma=(2.0, 3.0))
    for seed in range(5):
        out_img, out_lbl = augment(image, label, spec, np.random.default_rng(seed))
        assert np.array_equal(out_lbl, label)
        assert np.abs(out_img.astype(int) - image).mean() > 5


def test_identity_spec_returns_equal_copies_and_inputs_are_not_modified():
    image, label = _painted(6)
    keep_img, keep_lbl = image.copy(), label.copy()
    out_img, out_lbl = augment(image, label, AugmentationSpec.identity(), np.random.default_rng(0))
    assert np.array_equal(out_img, image) and np.array_equal(out_lbl, label)
    assert out_img is not image and not np.shares_memory(out_img, image)
    out_img, out_lbl = augment(image, label, AugmentationSpec(crop=(50, 60)), np.random.default_rng(1))
    assert np.array_equal(image, keep_img) and np.array_equal(label, keep_lbl)
    assert out_img.flags.c_contiguous and out_lbl.flags.c_contiguous
    assert out_img.dtype == np.uint8 and out_lbl.dtype == np.uint8


def test_unlabelled_images_are_augmented_alone():
    image, _ = _painted(7)
    out_img, out_lbl = augment(image, None, AugmentationSpec(crop=(40, 40)), np.random.default_rng(0))
    assert out_lbl is None and out_img.shape == (40, 40, 3)


# ---- colour jitter and blur, deterministic ----------------------------------------------------

def _solid(rgb, shape=(4, 5)):
    return np.broadcast_to(np.array(rgb, np.uint8), (*shape, 3)).copy()


def test_jitter_colours_hand_values():
    img = _solid((200, 100, 50))
    assert np.array_equal(jitter_colours(img), img)
    assert np.array_equal(jitter_colours(img, brightness=0.5), _solid((100, 50, 25)))
    assert np.array_equal(jitter_colours(img, brightness=2.0), _solid((255, 200, 100)))      # clipped
    grey = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert np.abs(jitter_colours(img, saturation=0.0).astype(int) - grey).max() <= 1           # grey
    assert np.abs(jitter_colours(img, contrast=0.0).astype(int) - grey).max() <= 1             # mean grey
    # a third of a turn of the colour circle: red -> green -> blue
    assert np.array_equal(jitter_colours(_solid((255, 0, 0)), hue_shift=1 / 3), _solid((0, 255, 0)))
    assert np.array_equal(jitter_colours(_solid((255, 0, 0)), hue_shift=-1 / 3), _solid((0, 0, 255)))
    assert np.array_equal(jitter_colours(_solid((255, 0, 0)), hue_shift=1.0), _solid((255, 0, 0)))


def test_contrast_keeps_the_mean_and_scales_deviations():
    img = np.zeros((2, 2, 3), np.uint8)
    img[0] = 40
    img[1] = 200                                  # grey image: mean 120, deviations +-80
    out = jitter_colours(img, contrast=0.5)
    assert out[0, 0, 0] == 80 and out[1, 0, 0] == 160


def test_blur_is_opencv_gaussian_with_the_drawn_sigma():
    image, _ = _painted(8)
    spec = AugmentationSpec(blur_p=1.0, blur_sigma=(1.5, 1.5))
    out = random_blur(image, spec, np.random.default_rng(0))
    expected = cv2.GaussianBlur(image, (0, 0), sigmaX=1.5, sigmaY=1.5, borderType=cv2.BORDER_REFLECT_101)
    assert np.array_equal(out, expected) and not np.array_equal(out, image)
    flat = _solid((10, 20, 30), (16, 16))
    assert np.array_equal(random_blur(flat, spec, np.random.default_rng(0)), flat)
    assert random_blur(image, dataclasses.replace(spec, blur_p=0.0), np.random.default_rng(0)) is image


def test_probabilities_gate_jitter_and_blur():
    image, label = _painted(9)
    half = AugmentationSpec(scale=(1.0, 1.0), flip=False, brightness=0.5, jitter_p=0.5, blur_p=0.0)
    changed = [not np.array_equal(augment(image, label, half, np.random.default_rng(s))[0], image)
               for s in range(40)]
    assert 8 < sum(changed) < 32
    never = AugmentationSpec(scale=(1.0, 1.0), flip=False, jitter_p=0.0, blur_p=0.0)
    assert all(np.array_equal(augment(image, label, never, np.random.default_rng(s))[0], image) for s in range(5))


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"scale": (0.0, 1.0)}, "scale"), ({"scale": (1.5, 1.0)}, "scale"), ({"scale": (1.0,)}, "scale"),
    ({"crop": (0, 10)}, "crop"), ({"crop": (10, 10, 3)}, "crop"), ({"crop": (10.5, 10)}, "crop"),
    ({"brightness": -0.1}, "brightness"), ({"hue": 0.6}, "hue"), ({"jitter_p": 1.5}, "jitter_p"),
    ({"blur_p": -0.1}, "blur_p"), ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"), ({"saturation": "0.2"}, "saturation"),
])
def test_spec_rejects_bad_values_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentationSpec(**kwargs)


def test_spec_accepts_yaml_lists_and_is_frozen():
    spec = AugmentationSpec(scale=[0.5, 2.0], crop=[64, 128], blur_sigma=[0.1, 1.0])
    assert spec.scale == (0.5, 2.0) and spec.crop == (64, 128) and spec.blur_sigma == (0.1, 1.0)
    hash(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.flip = False
    with pytest.raises(TypeError, match="flip"):
        AugmentationSpec(flip="yes")


def test_augment_rejects_bad_inputs():
    image, label = _painted(10)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="uint8 RGB"):
        augment(image.astype(np.float32), label, GEOMETRY, rng)
    with pytest.raises(ValueError, match="uint8 RGB"):
        augment(image[..., 0], label, GEOMETRY, rng)
    with pytest.raises(ValueError, match="label"):
        augment(image, label[:-1], GEOMETRY, rng)
    with pytest.raises(ValueError, match="label"):
        augment(image, label.astype(np.int64), GEOMETRY, rng)
