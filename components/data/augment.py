"""Source-training augmentation: random scale, crop, flip, colour jitter and Gaussian blur.

Why: a network trained on one synthetic domain over-fits its rendering (fixed palette, sharp edges,
one camera height and field of view). Geometric changes (scale, crop, flip) vary the object sizes
and positions it sees; photometric ones (colour jitter, blur) vary exactly the "style" that differs
between domains, so the features have to rely on shape. The course brief (MISSION.md §2.3) asks
for these five to narrow the source-only drop on the target.

Geometry moves image and label together (labels resized with nearest neighbour, so they keep only
values they had, plus IGNORE_INDEX where padding is needed); photometric changes touch the image
only. All randomness comes from one numpy Generator, drawn in a fixed order, so a sample is
reproducible from its seed in any worker (as `dataset.PreparedSplit` seeds it). Images are HWC
uint8 RGB, labels HW uint8 train ids.

Defaults follow DACS's strong augmentation for the photometric part (colour jitter of strength
0.25 with probability 0.8; blur with probability 0.5 and sigma uniform in [0.15, 1.15]), with a
milder hue shift (DACS uses 0.25, a quarter turn of the colour circle, which relabels colours).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import cv2
import numpy as np

from segshift.components.data.dataset import random_crop_flip

_NEAREST = getattr(cv2, "INTER_NEAREST_EXACT", cv2.INTER_NEAREST)


@dataclass(frozen=True)
class AugmentationSpec:
    """What `augment` does; every field maps one to one onto a config entry.

    scale: the resize factor is drawn uniformly from [low, high] ((1, 1): no resize).
    crop: [height, width] of the output, cropped at a random position and padded (image 0,
        label IGNORE_INDEX) where the scaled image is smaller; None: the input's own size, so
        the output always has the input's shape and batches stay collatable.
    flip: horizontal flip with probability 0.5.
    brightness, contrast, saturation: factors drawn from [max(0, 1 - x), 1 + x] (0: off), as
        torchvision's ColorJitter; hue: a shift drawn from [-hue, hue] turns of the colour
        circle (at most 0.5). Applied together, in that order, with probability `jitter_p`.
    blur_p, blur_sigma: Gaussian blur with probability `blur_p`, sigma drawn from blur_sigma.
    """

    scale: tuple[float, float] = (0.75, 1.25)
    crop: tuple[int, int] | None = None
    flip: bool = True
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.05
    jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)

    def __post_init__(self) -> None:
        # configs arrive as YAML lists: store tuples so the spec stays hashable and immutable
        for name in ("scale", "crop", "blur_sigma"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        _check_range("scale", self.scale, positive=True)
        _check_range("blur_sigma", self.blur_sigma, positive=True)
        if self.crop is not None and (len(self.crop) != 2 or not all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in self.crop)):
            raise ValueError(f"augmentation crop = {self.crop!r} must be [height, width] positive integers or null")
        for name in ("brightness", "contrast", "saturation"):
            _check_number(name, getattr(self, name), 0.0, float("inf"))
        _check_number("hue", self.hue, 0.0, 0.5)
        _check_number("jitter_p", self.jitter_p, 0.0, 1.0)
        _check_number("blur_p", self.blur_p, 0.0, 1.0)
        if not isinstance(self.flip, bool):
            raise TypeError(f"augmentation flip = {self.flip!r} must be true or false")

    @classmethod
    def from_config(cls, cfg, crop: tuple[int, int] | None, flip: bool) -> AugmentationSpec:
        """The spec of a stage's `augment` block (an AugmentConfig) with the stage's crop and flip."""
        return cls(scale=tuple(cfg.scale), crop=tuple(crop) if crop else None, flip=flip,
                   brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation,
                   hue=cfg.hue, jitter_p=cfg.jitter_p, blur_p=cfg.blur_p, blur_sigma=tuple(cfg.blur_sigma))

    @classmethod
    def identity(cls) -> AugmentationSpec:
        """A spec that returns its input unchanged."""
        return cls(scale=(1.0, 1.0), crop=None, flip=False, brightness=0.0, contrast=0.0,
                   saturation=0.0, hue=0.0, jitter_p=0.0, blur_p=0.0)


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        raise ValueError(f"augmentation {name} = {value!r} must be a number in [{low}, {high}]")


def _check_range(name: str, value: object, positive: bool) -> None:
    ok = (isinstance(value, tuple) and len(value) == 2
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value))
    if not ok or value[0] > value[1] or (positive and value[0] <= 0):
        raise ValueError(f"augmentation {name} = {value!r} must be [low, high] with 0 < low <= high")


def _check_inputs(image: np.ndarray, label: np.ndarray | None) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"augment expects an HWC uint8 RGB image, got {image.dtype} {image.shape}")
    if label is not None and (label.dtype != np.uint8 or label.shape != image.shape[:2]):
        raise ValueError(f"augment expects an HW uint8 label of the image's size {image.shape[:2]}, "
                         f"got {label.dtype} {label.shape}")


def random_scale(image: np.ndarray, label: np.ndarray | None, scale: tuple[float, float],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize by a factor drawn from `scale`: bilinear for the image, nearest for the label (both
    pixel-centre aligned: INTER_NEAREST_EXACT, so the label does not drift half a pixel)."""
    factor = float(rng.uniform(scale[0], scale[1]))
    h, w = image.shape[:2]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    if size == (h, w):
        return image, label
    dsize = (size[1], size[0])                               # OpenCV takes (width, height)
    image = cv2.resize(image, dsize, interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, dsize, interpolation=_NEAREST)
    return image, label


def jitter_colours(image: np.ndarray, brightness: float = 1.0, contrast: float = 1.0,
                   saturation: float = 1.0, hue_shift: float = 0.0) -> np.ndarray:
    """Deterministic colour jitter of an HWC uint8 RGB image, in torchvision's sense: brightness
    scales the values, contrast blends with the mean grey level, saturation blends with the grey
    image (factor 1: unchanged, 0: grey), `hue_shift` rotates the hue by that many turns. Clipped
    to [0, 1] after each step; computed in float32, rounded once at the end."""
    if brightness == 1.0 and contrast == 1.0 and saturation == 1.0 and hue_shift == 0.0:
        return image.copy()
    x = image.astype(np.float32) / 255.0
    if brightness != 1.0:
        x = np.clip(x * brightness, 0.0, 1.0)
    if contrast != 1.0:
        mean = float(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean())
        x = np.clip(contrast * x + (1.0 - contrast) * mean, 0.0, 1.0)
    if saturation != 1.0:
        grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
        x = np.clip(saturation * x + (1.0 - saturation) * grey, 0.0, 1.0)
    if hue_shift != 0.0:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)              # float input: H in degrees [0, 360)
        hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * hue_shift, 360.0)
        x = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0.0, 1.0)
    return np.rint(x * 255.0).astype(np.uint8)


def random_colour_jitter(image: np.ndarray, spec: AugmentationSpec, rng: np.random.Generator) -> np.ndarray:
    """`jitter_colours` with factors drawn from the spec, applied with probability `jitter_p`.
    The five draws happen whatever the outcome, so later draws do not depend on it."""
    apply = rng.random() < spec.jitter_p
    factors = [float(rng.uniform(max(0.0, 1.0 - x), 1.0 + x))
               for x in (spec.brightness, spec.contrast, spec.saturation)]
    hue_shift = float(rng.uniform(-spec.hue, spec.hue))
    return jitter_colours(image, *factors, hue_shift) if apply else image


def random_blur(image: np.ndarray, spec: AugmentationSpec, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur with probability `blur_p`, sigma drawn from `blur_sigma` (kernel size from
    sigma, as OpenCV chooses it; reflected borders). Two draws whatever the outcome."""
    apply = rng.random() < spec.blur_p
    sigma = float(rng.uniform(*spec.blur_sigma))
    if not apply:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def augment(image: np.ndarray, label: np.ndarray | None, spec: AugmentationSpec,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale, crop (to `spec.crop` or the input size), flip, colour jitter, blur, in that order.

    image: HWC uint8 RGB; label: HW uint8 of the same size, or None for an unlabelled image.
    Returns new contiguous arrays (the inputs are not modified): the image uint8, the label
    uint8 holding only its input values and IGNORE_INDEX (padding)."""
    _check_inputs(image, label)
    out_size = tuple(spec.crop) if spec.crop is not None else image.shape[:2]
    image, label = random_scale(image, label, spec.scale, rng)
    image, label = random_crop_flip(image, label, out_size, spec.flip, rng)
    image = random_blur(random_colour_jitter(np.ascontiguousarray(image), spec, rng), spec, rng)
    image = np.array(image, dtype=np.uint8, copy=True, order="C")
    if label is not None:
        label = np.array(label, dtype=np.uint8, copy=True, order="C")
    return image, label
