"""LabOR's parts that run inside a training step or on one batch of predictions: the two-head
pixel selector and its MCD game (`PixelSelectorTraining`), model A's step on source + revealed
target pixels (`AnnotatedTargetTraining`), the inconsistency mask and the SPL / PPL selections.
The method as a whole is described in `segshift.components.methods.labor` (its __init__)."""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch import nn

from segshift.components.data.labels import NUM_CLASSES
from segshift.components.losses import segmentation_loss, upsample
from segshift.components.methods.advent import OutputSpaceAdaptation, output_levels
from segshift.components.methods.base import Backward, Batch, Method, OptimizerSpec
from segshift.components.models.base import SegOutput

#: The final classifier's attribute in the networks of components/models (DeepLabV2, BiSeNet).
HEAD_ATTRIBUTES = ("layer6", "head")
#: Auxiliary heads B does not need (DeepLabV2's layer3 head, BiSeNet's stride-16/32 heads).
AUX_ATTRIBUTES = ("layer5", "aux16", "aux32")

REFERENCE_SPL_SHARE = 0.022     # SPL: about 2.2 % of the target pixels labelled, all stages together
REFERENCE_PPL_POINTS = 40       # PPL: 40 labelled points per image, all stages together
REFERENCE_STAGES = 3


def points_per_stage(total: int, stages: int) -> list[int]:
    """PPL's clicks per image and stage: `total` points per image over all `stages`, as evenly as
    possible, earlier stages first (40 over 3 stages: 14, 13, 13). A stage may get 0 points when
    `total` < `stages`."""
    total, stages = _check_points(total), int(stages)
    if stages < 1:
        raise ValueError(f"stages = {stages!r} must be >= 1")
    base, extra = divmod(total, stages)
    return [base + (1 if k < extra else 0) for k in range(stages)]


def spl_stage_share(total_share: float, image_pixels: int, revealed: int, stages_left: int) -> float:
    """SPL's cap for one image in one stage, as a share of its pixels: what is left of the image's
    allowance floor(total_share x pixels) after the `revealed` pixels of earlier stages, spread
    evenly over the `stages_left` stages (this one included). 0 when nothing is left. A stage
    whose mask is smaller than its cap leaves the rest to the later stages, so the books over all
    stages reach `total_share` whenever the masks are large enough, never more."""
    share = check_label_budget(total_share)
    if image_pixels < 1 or stages_left < 1:
        raise ValueError(f"image_pixels = {image_pixels!r} and stages_left = {stages_left!r} must be >= 1")
    left = math.floor(share * image_pixels + 1e-9) - int(revealed)
    if left <= 0:
        return 0.0
    return min(1.0, (left // stages_left + (1 if left % stages_left else 0)) / image_pixels)


def check_label_budget(share: float) -> float:
    """The label budget as a share of the target pixels, validated: it must be in (0, 1]. A budget
    of 0 labels nothing (use the unsupervised stage instead) and one above 1 (100 %) is not a share
    at all: both are configuration errors."""
    try:
        value = float(share)
    except (TypeError, ValueError):
        raise ValueError(f"label budget share = {share!r} must be a number in (0, 1]") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"label budget share = {share!r} must be in (0, 1] "
                         f"(a share of the target pixels: 0.022 = 2.2 %)")
    return value


# --- pixel selector: one feature extractor, two classifiers --------------------------------------

class TwoHeadOutput(NamedTuple):
    """Logits of the two classifiers, at the network's output stride."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def main(self) -> torch.Tensor:
        """The mean of the two heads' logits: what validation scores the selector by."""
        return (self.a + self.b) / 2


def find_head_attribute(model: nn.Module) -> str:
    """The attribute that holds `model`'s final classifier (one of HEAD_ATTRIBUTES)."""
    for name in HEAD_ATTRIBUTES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has none of the classifier attributes {HEAD_ATTRIBUTES}; "
                     f"pass head=<attribute name>")


class TwoHeadSegmenter(nn.Module):
    """LabOR's pixel selector B, built from a segmentation network (model A is not modified).

    A deep copy of the network has its final classifier (`head`, found automatically for DeepLabV2
    and BiSeNet) replaced by an identity, so its forward returns the features the classifier would
    see; `head_a` and `head_b` are two copies of that classifier applied to them. Auxiliary heads
    are dropped unless `keep_aux` (B only needs the main prediction).

    `head_b` gets Gaussian noise of `perturbation` x the mean |weight| of each parameter tensor
    (seeded by `seed`): identical heads would have an L1 discrepancy of exactly 0 and no gradient
    to start the maximisation from.
    """

    def __init__(self, model: nn.Module, head: str | None = None, perturbation: float = 0.01,
                 seed: int = 0, keep_aux: bool = False):
        super().__init__()
        if not (math.isfinite(perturbation) and perturbation >= 0):
            raise ValueError(f"perturbation = {perturbation!r} must be >= 0")
        features = copy.deepcopy(model)
        head = head or find_head_attribute(features)
        classifier = getattr(features, head, None)
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"{type(model).__name__}.{head} is not a module")
        self.head_name = head
        self.head_a = copy.deepcopy(classifier)
        self.head_b = copy.deepcopy(classifier)
        setattr(features, head, nn.Identity())
        if not keep_aux:
            for name in AUX_ATTRIBUTES:
                if isinstance(getattr(features, name, None), nn.Module):
                    setattr(features, name, None)
        self.features = features
        self.num_classes = getattr(model, "num_classes", None)
        self.class_protocol = getattr(model, "class_protocol", None)   # its heads' classes are A's
        if perturbation > 0:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param in self.head_b.parameters():
                    scale = param.detach().abs().mean()
                    noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                    param.add_(noise.to(param.device) * perturbation * scale)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """The features the two classifiers share."""
        out = self.features(x)
        return out.main if isinstance(out, SegOutput) else out

    def forward(self, x: torch.Tensor) -> TwoHeadOutput:
        feats = self.extract(x)
        return TwoHeadOutput(self.head_a(feats), self.head_b(feats))

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The two heads: trained to maximise the discrepancy (and fit the pseudo-labels)."""
        return [*self.head_a.parameters(), *self.head_b.parameters()]

    def feature_parameters(self) -> list[nn.Parameter]:
        """Everything before the heads: trained to minimise the discrepancy."""
        return list(self.features.parameters())


# --- disagreement ---------------------------------------------------------------------------------

def inconsistency_mask(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: where the two heads' argmax classes differ (probabilities work as well as
    logits: softmax keeps the argmax). Argmax ties go to the lower class id in both maps."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"the two heads' outputs differ in shape: {tuple(logits_a.shape)} vs "
                         f"{tuple(logits_b.shape)}")
    if logits_a.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) outputs, got {tuple(logits_a.shape)}")
    return logits_a.argmax(1) != logits_b.argmax(1)


def pixel_discrepancy(probs_a: torch.Tensor, probs_b: torch.Tensor) -> torch.Tensor:
    """(N, H, W): the mean over classes of |p_a - p_b|, in [0, 2/C]; ranks uncertain pixels."""
    if probs_a.shape != probs_b.shape or probs_a.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) probability maps of one shape, got "
                         f"{tuple(probs_a.shape)} and {tuple(probs_b.shape)}")
    return (probs_a - probs_b).abs().mean(1)


def head_discrepancy(probs_a: torch.Tensor, probs_b: torch.Tensor) -> torch.Tensor:
    """Scalar MCD discrepancy: the mean L1 distance of the two softmax maps (mean over classes,
    pixels and images). Always >= 0; the heads maximise it, the feature extractor minimises it
    (see the module docstring for the signs the training step uses)."""
    return pixel_discrepancy(probs_a, probs_b).mean()


# --- which pixels to ask for ----------------------------------------------------------------------

def _as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        if mask.size and not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1), got values beyond 0/1 of dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mask


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _per_image(fn, mask: np.ndarray, *arrays: np.ndarray, **kwargs) -> np.ndarray:
    """Apply a per-image selection to (H, W) inputs, or to each image of (N, H, W) inputs."""
    if mask.ndim == 2:
        return fn(mask, *arrays, **kwargs)
    if mask.ndim == 3:
        return np.stack([fn(mask[i], *(a[i] for a in arrays), **kwargs) for i in range(mask.shape[0])])
    raise ValueError(f"mask must be (H, W) or (N, H, W), got shape {mask.shape}")


def _check_scores(scores: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != mask.shape:
        raise ValueError(f"{name} {scores.shape} and mask {mask.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return scores


def _check_points(points_per_image: int) -> int:
    if isinstance(points_per_image, bool) or int(points_per_image) != points_per_image or points_per_image < 1:
        raise ValueError(f"points_per_image = {points_per_image!r} must be an integer >= 1")
    return int(points_per_image)


def segment_based_selection(mask: np.ndarray | torch.Tensor, budget_share: float,
                            discrepancy: np.ndarray | torch.Tensor) -> np.ndarray:
    """SPL: the pixels to label, bool of the mask's shape ((H, W) or (N, H, W), per image).

    Every pixel of the inconsistency mask is asked for, whole regions, as long as the mask fits the
    budget of floor(budget_share * H * W) pixels per image. A mask larger than that keeps its
    budget's worth of most uncertain pixels (highest `discrepancy`, e.g. `pixel_discrepancy`; ties
    in raster order), so a badly adapted model cannot blow the labelling budget. The paper has no
    cap: its masks came to about 2.2 % of the pixels.
    """
    share = check_label_budget(budget_share)
    mask = _as_mask(_as_numpy(mask))
    scores = _check_scores(_as_numpy(discrepancy), mask, "discrepancy")
    return _per_image(_spl_image, mask, scores, share=share)


def _spl_image(mask: np.ndarray, scores: np.ndarray, share: float) -> np.ndarray:
    budget = math.floor(share * mask.size + 1e-9)
    if int(mask.sum()) <= budget:
        return mask.copy()
    candidates = np.flatnonzero(mask)
    order = candidates[np.argsort(-scores.ravel()[candidates], kind="stable")]
    out = np.zeros(mask.size, bool)
    out[order[:budget]] = True
    return out.reshape(mask.shape)


def connected_regions(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of 8-connected regions, (H, W) int32 region ids, 0 = background) of a 2-D mask."""
    mask = _as_mask(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    count, regions = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return int(count) - 1, regions


def point_based_selection(mask: np.ndarray | torch.Tensor, discrepancy: np.ndarray | torch.Tensor,
                          points_per_image: int = REFERENCE_PPL_POINTS) -> np.ndarray:
    """Point labelling, spatial variant: one point per connected inconsistent region (8-connected),
    the region's pixel of highest `discrepancy` (ties: first in raster order); with more regions
    than `points_per_image`, the largest regions first (then the higher peak discrepancy). Returns
    a bool map with exactly min(regions, points_per_image) pixels set per image.

    One click per region spreads the points over the image and never spends two on one region; the
    paper's own PPL rule is `prototype_point_selection`.
    """
    points = _check_points(points_per_image)
    mask = _as_mask(_as_numpy(mask))
    scores = _check_scores(_as_numpy(discrepancy), mask, "discrepancy")
    return _per_image(_ppl_regions_image, mask, scores, points=points)


def _ppl_regions_image(mask: np.ndarray, scores: np.ndarray, points: int) -> np.ndarray:
    out = np.zeros(mask.size, bool)
    count, regions = connected_regions(mask)
    if count == 0:
        return out.reshape(mask.shape)
    region, score = regions.ravel(), scores.ravel()
    pixels = np.flatnonzero(region)
    # by region, then highest score, then raster order: the first pixel of each region is its peak
    order = pixels[np.lexsort((pixels, -score[pixels], region[pixels]))]
    first = np.r_[True, region[order][1:] != region[order][:-1]]
    peaks = order[first]                                   # one per region, region ids 1..count
    areas = np.bincount(region[pixels], minlength=count + 1)[region[peaks]]
    rank = np.lexsort((region[peaks], -score[peaks], -areas))
    out[peaks[rank[:points]]] = True
    return out.reshape(mask.shape)


def prototype_point_selection(mask: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor,
                              points_per_image: int = REFERENCE_PPL_POINTS) -> np.ndarray:
    """PPL as in the paper: for each class k, the uncertain pixels D_k (in the mask, predicted as k
    by argmax of `probs`) define a prototype mu_k, their mean probability vector; the pixels whose
    probability vectors are closest (L2) to their class's prototype are the most representative of
    what the model confuses, and are the ones asked for.

    `probs`: (C, H, W), or (N, C, H, W) with an (N, H, W) mask, e.g. the mean of the two heads'
    softmax maps. Points are dealt round-robin over the classes (largest D_k first): every class's
    nearest pixel, then every class's second nearest, ... until `points_per_image` (or the mask)
    is used up, so each confused class gets its share of the clicks. Returns a bool map with
    min(mask pixels, points_per_image) pixels set per image.
    """
    points = _check_points(points_per_image)
    mask = _as_mask(_as_numpy(mask))
    probs = np.asarray(_as_numpy(probs), dtype=np.float64)
    if probs.ndim != mask.ndim + 1 or probs.shape[:-3] + probs.shape[-2:] != mask.shape:
        raise ValueError(f"probs {probs.shape} does not match mask {mask.shape}: expected (C, H, W) with an "
                         f"(H, W) mask or (N, C, H, W) with an (N, H, W) mask")
    if mask.ndim == 2:
        return _ppl_prototype_image(mask, probs, points)
    return np.stack([_ppl_prototype_image(mask[i], probs[i], points) for i in range(mask.shape[0])])


def _ppl_prototype_image(mask: np.ndarray, probs: np.ndarray, points: int) -> np.ndarray:
    flat = probs.reshape(probs.shape[0], -1).T             # (HW, C)
    predicted = flat.argmax(1)
    uncertain = np.flatnonzero(mask.ravel())
    queues = []
    for k in np.unique(predicted[uncertain]):
        members = uncertain[predicted[uncertain] == k]
        prototype = flat[members].mean(0)
        distance = np.linalg.norm(flat[members] - prototype, axis=1)
        queues.append(members[np.argsort(distance, kind="stable")])
    queues.sort(key=len, reverse=True)
    out = np.zeros(mask.size, bool)
    taken, depth = 0, 0
    while taken < points and any(depth < len(q) for q in queues):
        for queue in queues:
            if depth < len(queue) and taken < points:
                out[queue[depth]] = True
                taken += 1
        depth += 1
    return out.reshape(mask.shape)


class PixelSelectorTraining(Method):
    """One step of LabOR's pixel-selector model B (roles: `pseudo` = target images with model A's
    pseudo-labels), the MCD game of Saito et al. 2018 in one engine step:

    1. Both heads learn the pseudo-labels (cross-entropy, features and heads).
    2. Heads only (features detached): `-discrepancy_weight` x the L1 discrepancy of their
       softmax maps, so the heads move apart where the features leave room for doubt.
    3. Features only (heads frozen): `+discrepancy_weight` x the discrepancy, so the backbone
       pulls the heads' predictions back together where it can.
    The engine then steps both optimisers once: the reference's three alternating optimiser
    steps collapsed into one step with gradients routed per part. What stays inconsistent after
    training is where the target is genuinely ambiguous: the pixels worth a human label.
    """

    roles = ("pseudo",)

    def __init__(self, selector: TwoHeadSegmenter, stage_cfg, labor_cfg):
        from segshift.components.engine.optim import build_optimizer
        super().__init__()
        self.cfg, self.labor = stage_cfg, labor_cfg
        self.modules["model"] = selector
        opt = stage_cfg.optimizer
        self.optimizers["features"] = OptimizerSpec(build_optimizer(selector.feature_parameters(), opt), opt)
        self.optimizers["heads"] = OptimizerSpec(build_optimizer(selector.classifier_parameters(), opt), opt)

    def training_step(self, batch: Batch, step: int, backward: Backward) -> dict[str, torch.Tensor]:
        from segshift.components.engine.loop import unwrap
        from segshift.components.losses import labelled_cross_entropy, upsample
        selector: TwoHeadSegmenter = unwrap(self.modules["model"])
        images, labels = batch["pseudo"]
        size = tuple(labels.shape[-2:])

        out = self.modules["model"](images)
        seg = (labelled_cross_entropy(upsample(out.a, size), labels)
               + labelled_cross_entropy(upsample(out.b, size), labels))
        backward(seg)

        features = selector.extract(images)
        weight = self.labor.discrepancy_weight
        heads_apart = head_discrepancy(upsample(selector.head_a(features.detach()), size).softmax(1),
                                       upsample(selector.head_b(features.detach()), size).softmax(1))
        backward(-weight * heads_apart)
        heads = selector.classifier_parameters()
        for p in heads:
            p.requires_grad_(False)
        try:
            features_together = head_discrepancy(upsample(selector.head_a(features), size).softmax(1),
                                                 upsample(selector.head_b(features), size).softmax(1))
            backward(weight * features_together)
        finally:
            for p in heads:
                p.requires_grad_(True)
        return {"loss": seg.detach(), "seg": seg.detach(), "discrepancy": heads_apart.detach()}


class AnnotatedTargetTraining(OutputSpaceAdaptation):
    """One step of LabOR's segmentation model A (roles: `labelled` = source with labels,
    `annotated` = target images with the pixels the annotator revealed, IGNORE_INDEX elsewhere).

    As in the paper (Sec. 3, Loss 1-3: model A is an AdaptSegNet-style UDA model that keeps its
    adversarial loss while it learns the revealed pixels):

    1. cross-entropy (main + `aux_weight` x aux) on the source batch (Loss 1);
    2. on the target batch, one forward pass for both target terms: cross-entropy on the revealed
       pixels only, averaged over those pixels (Loss 2: a few labelled pixels per image weigh as
       much as a whole source image), plus AdaptSegNet's output-space adversarial loss (Loss 3):
       per output level whose stage weight `adv_weight_<level>` is > 0, a discriminator on the
       softmax map, the network trained to make target maps look like source maps;
    3. the discriminators' own step (source maps 0, target maps 1, BCE / 2 each).

    `adversarial=False` (or both stage weights 0) is segshift's earlier model A: source and
    revealed-pixel cross-entropy only. A target batch whose pixels are all unrevealed contributes
    the adversarial term alone: LabOR's warm-up round is AdaptSegNet itself.
    """

    roles = ("labelled", "annotated")

    def __init__(self, model: nn.Module, stage_cfg, adversarial: bool = True,
                 num_classes: int | None = None):
        Method.__init__(self)
        self.cfg, self.adversarial = stage_cfg, bool(adversarial)
        self.add_segmenter(model, stage_cfg.optimizer)
        self._add_discriminators(num_classes or getattr(model, "num_classes", NUM_CLASSES))

    @property
    def level_weights(self) -> dict[str, float]:
        if not self.adversarial:
            return {"main": 0.0, "aux": 0.0}
        return {"main": self.cfg.adv_weight_main, "aux": self.cfg.adv_weight_aux}

    def discriminator_input(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return upsample(logits, size).float().softmax(1)         # AdaptSegNet: the softmax map

    def training_step(self, batch: Batch, step: int, backward: Backward) -> dict[str, torch.Tensor]:
        model = self.modules["model"]
        images, labels = batch["labelled"]
        target_images, target_labels = batch["annotated"]
        size = tuple(target_images.shape[-2:])

        source_out = model(images)
        logs = segmentation_loss(source_out, labels, self.cfg.aux_weight)
        backward(logs["loss"])

        target_out = model(target_images)
        target = segmentation_loss(target_out, target_labels, self.cfg.aux_weight)["loss"]
        target_levels = output_levels(target_out)
        weights = {level: w for level, w in self.level_weights.items() if w > 0 and level in target_levels}
        align = self._alignment_losses(target_levels, weights, size)
        adversarial = sum((weights[level] * loss for level, loss in align.items()), torch.zeros(()))
        backward(target + adversarial.to(target.device))
        logs["target"] = target
        logs["loss"] = logs["loss"] + target + adversarial.detach().to(target.device)
        logs.update({f"adv_{level}": loss for level, loss in align.items()})
        logs.update(self._discriminator_step(output_levels(source_out), target_levels, weights,
                                             tuple(images.shape[-2:]), size, backward))
        return {name: value.detach() for name, value in logs.items()}


def build_selector(model: nn.Module, cfg, params, round=None) -> PixelSelectorTraining:
    """Pixel selector B's step (round `<stage>-selector`): two heads over a copy of model A."""
    return PixelSelectorTraining(TwoHeadSegmenter(model, seed=params.engine.seed), cfg, params.methods.labor)


def build_model_a(model: nn.Module, cfg, params, round=None) -> AnnotatedTargetTraining:
    """Model A's step (rounds `adapt` and `stage-<k>`): source + the revealed target pixels."""
    return AnnotatedTargetTraining(model, cfg)
