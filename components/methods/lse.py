"""LSE: the defining mechanisms of "Learning from Scale-invariant Examples" (Subhani & Ali, ECCV 2020).

Self-training for domain adaptation, built on the observation that a segmenter labels a target
image more reliably at its original scale than a zoomed-in part of it: the zoomed patch (a crop
upsampled back to full size) gives high-entropy, often wrong predictions, so the prediction made
on the *full* image is a good pseudo-label for the *zoomed* patch. Training on such
"scale-invariant examples" teaches the network to label an object the same whatever its size.

One round (`rounds` at the end of this module runs them; these are its parts), as the authors'
code does it (github.com/MNaseerSubhani/LSE, `LSE.py` at 357d607be129a2e89fd44adf232f0ec351d1f32f,
`Base_Adaptation.class_wise_sort`, `Generate`, `train_adp` and the `__main__` loop):

1. Score every target image per class: the mean max-softmax of its pixels predicted as the class
   (`class_confidence_scores`). Per class c, of the n_c images where c is predicted, keep the
   `int(n_c * (p / 19))` most confident: the reference divides p by the number of classes, so
   that the union over the 19 classes is about a share p of the data set (`images_per_class`);
   the round's images are the union (`class_selection`, `select_confident_images`).
2. Class c's entropy threshold comes from its *boundary image*, the most confident image of c
   that was not kept: the mean, over that image's pixels predicted as c, of their entropy min-max
   normalised over those pixels (`boundary_entropy_threshold`). A pixel of a kept image is
   IGNORE when its entropy, min-max normalised per predicted class within its image, is >= its
   class's threshold (`select_pseudo_labels`).
3. Zoom: random crops of half the height and width (256x512 of 512x1024), upsampled 2x with the
   same crop of the full-image pseudo-label (`scale_invariant_crop`; 4 crops per image).
4. Loss: mean CE + beta x mean focal term on the zoomed examples (`lse_loss`; gamma 3, beta 0.1),
   with the source cross-entropy, one backward each.
5. p = 0.1, +0.05 a round, the last round at 0.4 (`share_schedule`: 7 rounds); every round
   starts from the previous round's model.

Where this module differs from that code, the docstring of the function says so.

Tensors are torch; pseudo-labels are integer maps with IGNORE_INDEX (255) for "no label".
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segshift.components.data.labels import IGNORE_INDEX, NUM_CLASSES
from segshift.components.losses import normalised_entropy, upsample
from segshift.components.methods.base import Backward, Batch, Method, MethodSpec
from segshift.components.methods.rounds import (Round, RoundContext, probabilities, source_and_target,
                                                split_iterations)
from segshift.components.models.classes import model_protocol, to_train_ids

REFERENCE_SHARE_START = 0.1
REFERENCE_SHARE_STEP = 0.05
REFERENCE_SHARE_MAX = 0.4
REFERENCE_GAMMA = 3.0
REFERENCE_BETA = 0.1
REFERENCE_SCALE = 2.0
REFERENCE_CROPS_PER_IMAGE = 4

_EPS = 1e-9


def _check_share(share: float, name: str = "share") -> float:
    share = float(share)
    if not (math.isfinite(share) and 0 < share <= 1):
        raise ValueError(f"{name} = {share!r} must be in (0, 1]")
    return share


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


# --- 1. confident images, per class ---------------------------------------------------------------

def class_confidence_scores(probs: torch.Tensor) -> torch.Tensor:
    """(N, C) per-image, per-class confidence: the mean max-softmax over the pixels predicted as
    that class; NaN where the image has no pixel of the class.

    `probs`: (N, C, H, W) softmax. Scoring per class rather than per image is what lets a round
    pick images that are confident *about a rare class*, not only images full of confident road.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (N, C, H, W), got {tuple(probs.shape)}")
    c = probs.shape[1]
    confidence, predicted = probs.detach().float().max(dim=1)
    one_hot = F.one_hot(predicted.flatten(1), c).float()            # (N, HW, C)
    counts = one_hot.sum(1)                                         # (N, C)
    sums = (one_hot * confidence.flatten(1).unsqueeze(-1)).sum(1)   # (N, C)
    scores = sums / counts.clamp_min(1)
    return torch.where(counts > 0, scores, torch.full_like(scores, float("nan")))


def images_per_class(present: int, share: float, num_classes: int) -> int:
    """How many of the `present` images where a class is predicted are kept for it: the
    reference's `int(len(f_name_arrays) * (p / 19))` (floor), with 19 = `num_classes`. A class
    predicted in fewer than num_classes / p images gets none (the reference drops it the same way).
    """
    return int(present * (share / num_classes))


class ClassSelection(NamedTuple):
    """The round's images (sorted indices) and, per class, its boundary image: the index of the
    most confident image of the class that was not kept (None: the class is predicted nowhere, or
    every image of it was kept)."""

    images: list[int]
    boundary: list[int | None]


def class_selection(scores: np.ndarray | torch.Tensor, share: float) -> ClassSelection:
    """Per class c, of the n_c images where c is predicted (non-NaN score), the
    `images_per_class(n_c, share, C)` with the highest score; the union over classes, and each
    class's boundary image (the next one in that order), from which its entropy threshold comes.

    Ties are broken by the lower index (the reference sorts (score, file name) pairs and reverses,
    so there the later file name comes first; equal float means are rare).
    """
    share = _check_share(share)
    scores = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {scores.shape}")
    num_classes = scores.shape[1]
    chosen: set[int] = set()
    boundary: list[int | None] = []
    for c in range(num_classes):
        present = np.flatnonzero(~np.isnan(scores[:, c]))
        keep = images_per_class(present.size, share, num_classes)
        order = present[np.argsort(-scores[present, c], kind="stable")]
        chosen.update(int(i) for i in order[:keep])
        boundary.append(int(order[keep]) if keep < order.size else None)
    return ClassSelection(sorted(chosen), boundary)


def select_confident_images(scores: np.ndarray | torch.Tensor, share: float) -> list[int]:
    """Indices (sorted) of the round's images: `class_selection(scores, share).images`."""
    return class_selection(scores, share).images


# --- 2. class-specific dynamic entropy thresholds ---------------------------------------------

def normalise_entropy_per_class(entropy: torch.Tensor, predicted: torch.Tensor,
                                num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Min-max normalise the entropy of the pixels of each predicted class to [0, 1] (a class whose
    pixels all have the same entropy gets 0); pixels of no class (IGNORE) are left unchanged.

    The reference's `ent_normalization`, applied to one image at a time (as there): the thresholds
    are carried from a class's boundary image to the kept images, and this makes the entropies of
    different images comparable. The reference divides 0 by 0 (NaN) where we give 0; see
    `select_pseudo_labels` for why the kept pixels are the same.
    """
    _check_same_shape(entropy, predicted, "entropy and predicted")
    out = entropy.clone().float()
    for c in range(num_classes):
        sel = predicted == c
        if not bool(sel.any()):
            continue
        values = out[sel]
        low, high = values.min(), values.max()
        span = high - low
        out[sel] = (values - low) / span if float(span) > 0 else torch.zeros_like(values)
    return out


REFERENCE_INITIAL_THRESHOLD = 1.0   # `entropy_th_class = np.ones((1, 19))` before any round


def boundary_entropy_threshold(entropy: torch.Tensor, predicted: torch.Tensor, cls: int) -> float:
    """Class `cls`'s entropy threshold from its boundary image (`entropy`, `predicted`: that one
    image's per-pixel entropy and predicted classes): the mean of the entropies of the pixels
    predicted as `cls`, min-max normalised over those pixels (`ent_normalization` then
    `mean_class_se` in the reference). Any entropy that is an increasing affine map of the
    reference's (such as `losses.normalised_entropy`, divided by log C) gives the same value.

    Where those entropies are all equal (a single pixel, say) the reference divides 0 by 0: its
    threshold is NaN, which then keeps every pixel of the class (`SE >= NaN` is false); this
    returns +inf, which keeps them the same way. With no pixel of `cls` it returns the reference's
    initial threshold, 1.0.
    """
    _check_same_shape(entropy, predicted, "entropy and predicted")
    values = entropy.detach().double()[predicted == cls]
    if values.numel() == 0:
        return REFERENCE_INITIAL_THRESHOLD
    low, high = values.min(), values.max()
    if not float(high - low) > 0:
        return float("inf")
    return float(((values - low) / (high - low)).mean())


def class_entropy_thresholds(boundary_images: dict[int, tuple[torch.Tensor, torch.Tensor]],
                             num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(num_classes,) float32 thresholds: for each class given in `boundary_images`
    (class -> (entropy, predicted) of its boundary image), `boundary_entropy_threshold`; the
    others keep the reference's initial 1.0 (a class predicted nowhere has no pixel to filter)."""
    thresholds = torch.full((num_classes,), REFERENCE_INITIAL_THRESHOLD, dtype=torch.float32)
    for c, (entropy, predicted) in boundary_images.items():
        if not 0 <= int(c) < num_classes:
            raise ValueError(f"class {c!r} is outside 0..{num_classes - 1}")
        thresholds[int(c)] = boundary_entropy_threshold(entropy, predicted, int(c))
    return thresholds


def select_pseudo_labels(predicted: torch.Tensor, entropy: torch.Tensor,
                         thresholds: torch.Tensor) -> torch.Tensor:
    """A copy of `predicted` (long; one image (H, W) or a stack (N, H, W)) with IGNORE_INDEX where
    the pixel's entropy, min-max normalised per predicted class within its own image
    (`normalise_entropy_per_class`), is >= its predicted class's threshold, the reference's rule
    (`if SE >= entropy_th_class[argmax]: map_ = 0`). A class whose entropies are all equal in an
    image normalises to 0 here (NaN in the reference, kept there): both keep it, since every
    threshold is > 0. Pixels already IGNORE (any id >= len(thresholds)) stay IGNORE."""
    _check_same_shape(entropy, predicted, "entropy and predicted")
    if thresholds.dim() != 1:
        raise ValueError(f"thresholds must be (num_classes,), got {tuple(thresholds.shape)}")
    if predicted.dim() not in (2, 3):
        raise ValueError(f"predicted must be (H, W) or (N, H, W), got {tuple(predicted.shape)}")
    labels = predicted.long().clone()
    stack = labels if labels.dim() == 3 else labels[None]
    entropies = entropy if entropy.dim() == 3 else entropy[None]
    num_classes = thresholds.numel()
    limits = thresholds.to(entropy.device, torch.float32)
    for image, values in zip(stack, entropies):
        normalised = normalise_entropy_per_class(values.float(), image, num_classes)
        valid = (image >= 0) & (image < num_classes)
        limit = limits[image.clamp(0, num_classes - 1)]
        image[~valid | (normalised >= limit)] = IGNORE_INDEX
    return labels


# --- 3. growing share over rounds -----------------------------------------------------------------

def share_schedule(round: int, start: float = REFERENCE_SHARE_START, step: float = REFERENCE_SHARE_STEP,
                   maximum: float = REFERENCE_SHARE_MAX) -> float:
    """The per-class share p of round `round` (0-based): min(start + round * step, maximum).

    Early rounds trust only the most confident images and pixels; as the model adapts, its
    pseudo-labels improve and more of them are taken (0.1, 0.15, ..., 0.4 in the reference).
    """
    if isinstance(round, bool) or int(round) != round or round < 0:
        raise ValueError(f"round = {round!r} must be an integer >= 0")
    start = _check_share(start, "start")
    maximum = _check_share(maximum, "maximum")
    if not (math.isfinite(step) and step >= 0):
        raise ValueError(f"step = {step!r} must be >= 0")
    if maximum < start:
        raise ValueError(f"maximum = {maximum!r} must be >= start = {start!r}")
    value = start + int(round) * step
    return maximum if value >= maximum - _EPS else value


def schedule_rounds(start: float = REFERENCE_SHARE_START, step: float = REFERENCE_SHARE_STEP,
                    maximum: float = REFERENCE_SHARE_MAX) -> int:
    """How many rounds the schedule has before p would pass `maximum` (7 for the reference:
    0.1, 0.15, ..., 0.4); 1 when step is 0."""
    share_schedule(0, start, step, maximum)  # validates
    if step == 0:
        return 1
    return math.floor((maximum - start) / step + _EPS) + 1


# --- 4. scale-invariant examples ---------------------------------------------------------------

class CropBox(NamedTuple):
    top: int
    left: int
    height: int
    width: int


class ScaleInvariantExample(NamedTuple):
    """A zoomed-in crop of a target image, the full-image pseudo-label zoomed the same way, and the
    crop box in the original image's pixels."""

    image: torch.Tensor     # (C, H, W), the original size
    label: torch.Tensor     # (H, W), same dtype as the pseudo-label given
    box: CropBox


def crop_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The (height, width) of a crop of 1/`scale` of a `height` x `width` image."""
    return max(1, int(height / scale + _EPS)), max(1, int(width / scale + _EPS))


def scale_invariant_crop(image: torch.Tensor, pseudo_label: torch.Tensor, scale: float = REFERENCE_SCALE,
                         generator: torch.Generator | None = None,
                         box: CropBox | tuple[int, int, int, int] | None = None) -> ScaleInvariantExample:
    """A random crop of 1/scale the height and width of `image` (C, H, W), upsampled back to
    (H, W), with the same crop of `pseudo_label` (H, W), the label predicted on the *full* image.

    The image is upsampled bilinearly and the label with "nearest-exact", both with half-pixel
    centres (align_corners=False), so every output label is the one of the source pixel nearest to
    where the output image pixel was sampled: crop and label stay pixel-aligned for any scale, not
    only integer ones. The reference code instead upsamples the softmax map bilinearly and takes its
    argmax (with align_corners=True); nearest on the hard label gives the same alignment and keeps
    IGNORE pixels IGNORE instead of blending them into their neighbours. (The reference also
    upsamples its 0/1 keep-mask bilinearly and ignores only where the result is exactly 0, so a
    zoomed pixel next to any kept source pixel is kept, labelled by the argmax of the upsampled
    softmax; with hard labels saved per round there is no softmax to take it from, so IGNORE
    source pixels stay IGNORE here: a one-source-pixel thinner labelled region at the borders.)

    `generator` makes the box reproducible; `box` (top, left, height, width) fixes it instead
    (its height/width must then be the crop size for this scale). A floating-point image keeps its
    dtype, an integer one comes back as float32; the label keeps its dtype.
    """
    scale = float(scale)
    if not (math.isfinite(scale) and scale >= 1):
        raise ValueError(f"scale = {scale!r} must be >= 1")
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if tuple(pseudo_label.shape) != (height, width):
        raise ValueError(f"pseudo_label {tuple(pseudo_label.shape)} does not match image size "
                         f"{(height, width)}")
    crop_h, crop_w = crop_size(height, width, scale)
    if box is None:
        top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
        box = CropBox(top, left, crop_h, crop_w)
    else:
        box = CropBox(*(int(v) for v in box))
        if (box.height, box.width) != (crop_h, crop_w):
            raise ValueError(f"box size {(box.height, box.width)} is not the crop size {(crop_h, crop_w)} "
                             f"of a {(height, width)} image at scale {scale}")
        if not (0 <= box.top <= height - crop_h and 0 <= box.left <= width - crop_w):
            raise ValueError(f"box {tuple(box)} is outside the {(height, width)} image")
    rows = slice(box.top, box.top + box.height)
    cols = slice(box.left, box.left + box.width)
    crop = image[:, rows, cols].unsqueeze(0)
    dtype = image.dtype if image.is_floating_point() else torch.float32
    zoomed = F.interpolate(crop.to(dtype), size=(height, width), mode="bilinear", align_corners=False)
    label_crop = pseudo_label[rows, cols][None, None].to(torch.float32)   # exact for ids < 2**24
    zoomed_label = F.interpolate(label_crop, size=(height, width), mode="nearest-exact")
    return ScaleInvariantExample(zoomed[0], zoomed_label[0, 0].round().to(pseudo_label.dtype), box)


# --- 5. the target loss ------------------------------------------------------------------------

def lse_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = REFERENCE_GAMMA,
             beta: float = REFERENCE_BETA) -> torch.Tensor:
    """Target loss of LSE: mean over labelled pixels of  CE + beta * (1 - p_t)^gamma * CE,
    where CE = -log p_t is the pixel's cross-entropy against its pseudo-label and p_t the softmax
    probability of that label (p_t = exp(-CE), as the reference code computes it).

    The focal term (Lin et al. 2017) adds weight to the pixels the network still gets wrong or is
    unsure of, which are mostly those of rare classes: against class imbalance in the pseudo-labels
    without a class-frequency table. beta scales it on top of the plain cross-entropy (the reference
    keeps both: mean CE + beta * mean focal, gamma = 3, beta = 0.1, both means over the pixels that
    are not IGNORE, its per-pixel CE being unreduced over those; `LSE.py`, `model/fcn8s.py`). Logits at a lower resolution
    are upsampled bilinearly to the label size. With no labelled pixel the loss is 0 (with a
    graph), as in `losses.labelled_cross_entropy`.
    """
    gamma, beta = float(gamma), float(beta)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma = {gamma!r} must be >= 0")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta = {beta!r} must be >= 0")
    if logits.dim() != 4 or labels.dim() != 3:
        raise ValueError(f"expected logits (N, C, H, W) and labels (N, H, W), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = upsample(logits, tuple(labels.shape[-2:]))
    ce = F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
    focal = (1 - torch.exp(-ce)).clamp_min(0) ** gamma * ce
    labelled = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return (ce.sum() + beta * focal.sum()) / labelled


class LSE(Method):
    """One LSE step (roles: `labelled` = source with labels, `pseudo` = the round's selected
    target images with the pseudo-labels predicted on each *full* image).

    1. Source: cross-entropy (main + `aux_weight` x aux), kept as in the paper.
    2. Scale-invariant examples: `crops_per_image` random crops of 1/`scale` of each selected image,
       upsampled back to full size together with the same crop of its full-image pseudo-label
       (`scale_invariant_crop`, reproducible from (`seed`, step)); the network must label the
       enlarged object as it labelled the small one.
    3. Target loss: `lse_loss` (cross-entropy + beta x the focal term with gamma) on those examples.
    Which images are selected and which pixels keep their pseudo-label (per-class shares and
    entropy thresholds, p growing per round) is decided between rounds, not in a step.
    """

    roles = ("labelled", "pseudo")

    def __init__(self, model: nn.Module, stage_cfg, lse_cfg, seed: int):
        super().__init__()
        self.cfg, self.lse, self.seed = stage_cfg, lse_cfg, seed
        self.add_segmenter(model, stage_cfg.optimizer)

    def scale_invariant_batch(self, images: torch.Tensor, labels: torch.Tensor,
                              step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        copies = self.lse.crops_per_image
        examples = [scale_invariant_crop(image, label, self.lse.scale, generator)
                    for image, label in zip(images, labels) for _ in range(copies)]
        return (torch.stack([e.image for e in examples]).to(images.dtype),
                torch.stack([e.label for e in examples]).long())

    def training_step(self, batch: Batch, step: int, backward: Backward) -> dict[str, torch.Tensor]:
        from segshift.components.losses import segmentation_loss
        model = self.modules["model"]
        images, labels = batch["labelled"]
        logs = segmentation_loss(model(images), labels, self.cfg.aux_weight)
        backward(logs["loss"])
        crops, crop_labels = self.scale_invariant_batch(*batch["pseudo"], step)
        target = lse_loss(model(crops).main, crop_labels, self.lse.gamma, self.lse.beta)
        backward(self.lse.target_weight * target)
        logs["target"] = target
        logs["loss"] = logs["loss"] + self.lse.target_weight * target
        return {name: value.detach() for name, value in logs.items()}


# -- the rounds -------------------------------------------------------------------------------------

def pseudo_labels(context: RoundContext, init: str | None, share: float, desc: str) -> tuple[dict, dict]:
    """The round's confident images (per class, the reference's int(n_c * p / 19) most confident)
    and their labels: pixels whose per-class normalised entropy reaches their class's threshold,
    taken from that class's boundary image (the first one not kept), become IGNORE. Classes are the
    head's (n_c counted over 16 for model.classes: synthia16); the labels are written as train ids."""
    model, size = context.model(init), context.image_size
    protocol = model_protocol(model)
    ids, scores, predicted, entropy = [], [], [], []
    for batch_ids, (out,) in context.predict([model], desc):
        probs = probabilities(out, size)
        ids += batch_ids
        scores.append(class_confidence_scores(probs).cpu())
        predicted.append(probs.argmax(1).to(torch.uint8).cpu())
        entropy.append(normalised_entropy(probs).to(torch.float16).cpu())
    selection = class_selection(torch.cat(scores), share)
    chosen = selection.images
    predicted, entropy = torch.cat(predicted), torch.cat(entropy)
    boundary = {c: (entropy[i].float(), predicted[i].long())
                for c, i in enumerate(selection.boundary) if i is not None}
    thresholds = class_entropy_thresholds(boundary, len(selection.boundary))
    labels = {ids[i]: to_train_ids(select_pseudo_labels(predicted[i].long(), entropy[i].float(), thresholds).numpy(),
                                   protocol)
              for i in chosen}
    labelled = float(np.mean([(label != IGNORE_INDEX).mean() for label in labels.values()])) if labels else 0.0
    report = {"share": share, "images": len(chosen), "labelled_pixels": labelled,
              # null: the class keeps every pixel (its boundary image's entropies were all equal)
              "entropy_thresholds": [round(float(t), 6) if np.isfinite(float(t)) else None for t in thresholds]}
    return labels, report


def rounds(context: RoundContext) -> dict:
    """Per round r the share p_r (0.1, 0.15, ... 0.4): per class the int(n_c * p_r / 19) most
    confident images (the reference's rule), their pixels under their class's entropy threshold
    (from the class's first image not kept) as pseudo-labels; each round starts from the previous
    round's selected model. Returns what the rounds labelled, for the stage's metrics."""
    lse = context.params.methods.lse
    count = schedule_rounds(lse.share_start, lse.share_step, lse.share_max)
    init, reports = None, []
    for r, iterations in enumerate(split_iterations(context.cfg.iterations, count)):
        name = f"round-{r + 1}"
        saved = context.labelled_before(name)
        if saved is None:
            share = share_schedule(r, lse.share_start, lse.share_step, lse.share_max)
            labels, report = pseudo_labels(context, init, share, f"lse {name}: pseudo-labels")
            context.need_images(name, list(labels))
            spec = context.round_spec(name, "lse", iterations,
                                      source_and_target(f"{name}/labels", sorted(labels), "pseudo"), init)
            context.save_round(spec, report, context.write_labels(name, labels))
        else:
            spec, report = Round(**saved["round"]), saved["report"]
        context.log({"lse_share": report["share"], "lse_images": report["images"],
                     "lse_labelled_pixels": report["labelled_pixels"]})
        reports.append({"round": name, **report})
        context.train(spec)
        init = f"{name}/best.pt"
    return {"rounds": reports}


def build_step(model: nn.Module, cfg, params, round: Round | None = None) -> LSE:
    return LSE(model, cfg, params.methods.lse, seed=params.engine.seed)


METHOD = MethodSpec("lse", None, steps={"lse": build_step}, rounds=rounds, bench=(("lse", "lse", "source"),))
