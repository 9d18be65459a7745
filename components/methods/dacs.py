"""DACS, Domain Adaptation via Cross-domain mixed Sampling (Tranheden et al., WACV 2021): the mechanisms.

Why it works: self-training on target pseudo-labels alone drifts, because the network's target
errors are systematic (rare classes get absorbed by frequent neighbours: "class conflation").
DACS pastes half of the classes of a *source* image, with their true labels, onto a target image
whose remaining pixels carry the pseudo-labels of an EMA teacher. Every mixed image thus holds
correct labels for some objects in a target context, which keeps rare classes alive, and the
ClassMix cut follows object boundaries, so the pasted objects stay plausible. The teacher is an
exponential moving average of the student: slower, less noisy pseudo-labels. The mixed loss is
weighted by the share of confident teacher pixels, so early, uncertain rounds count less.

Reference code followed (vikolss/DACS on GitHub, `trainUDA.py` with `configs/configUDA.json`):

- ClassMix: per image, `torch.unique` of its source labels, then ceil(n / 2) = (n + n % 2) / 2 of
  the n classes drawn without replacement; mask = pixels of the drawn classes
  (`utils/transformmasks.generate_class_mask`). The reference has the line that drops the ignore
  label commented out, so ignore can be "drawn" and pasted; here it is excluded by default (it
  is not a class) and `exclude_ignore=False` gives the reference behaviour.
- Mixing (`utils/transformsgpu.oneMix`): mask * source + (1 - mask) * target, for images, labels
  (source ground truth / teacher argmax) and the pixel weights (1 / the confidence weight).
- Weight (`pixel_weight: "threshold_uniform"`): number of teacher max-probabilities >= 0.968
  divided by the number of pixels. The reference pools the whole batch (of 2); `per_image=True`
  (the default, as the project brief asks) gives each mixed image the share of its own target.
- Loss (`utils/loss.CrossEntropyLoss2dPixelWiseWeighted`): per-pixel cross-entropy (0 at ignore)
  times the pixel weight, averaged over *all* pixels, ignored ones included.
- Teacher (`update_ema_variables`, alpha_teacher = 0.99, called after the optimiser step with the
  0-based iteration): alpha = min(1 - 1 / (iteration + 1), alpha), param = alpha * teacher +
  (1 - alpha) * student; the reference leaves buffers alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.methods.base import Backward, Batch, Method, check_same_size

#: the reference's teacher momentum and confidence threshold
DEFAULT_EMA_ALPHA = 0.99
DEFAULT_CONFIDENCE_THRESHOLD = 0.968


def choose_half_classes(label: torch.Tensor, generator: torch.Generator | None = None,
                        exclude_ignore: bool = True) -> torch.Tensor:
    """The classes ClassMix pastes from one (H, W) source label map: ceil(n / 2) of its n present
    classes, drawn uniformly without replacement (sorted; on the label's device). Empty when the
    map has no class. Randomness comes only from `generator` (a CPU torch.Generator)."""
    classes = torch.unique(label)
    if exclude_ignore:
        classes = classes[classes != IGNORE_INDEX]
    n = classes.numel()
    chosen = torch.randperm(n, generator=generator)[: (n + n % 2) // 2]
    return classes[chosen.to(classes.device)].sort().values


def class_mask(label: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Bool mask of the pixels of `label` whose value is one of `classes`."""
    return torch.isin(label, classes.to(label.device))


def classmix_mask(source_labels: torch.Tensor, generator: torch.Generator | None = None,
                  exclude_ignore: bool = True) -> torch.Tensor:
    """(N, H, W) bool ClassMix masks: True on the pixels of half of the classes of each source
    label map (an independent draw per image); those pixels are pasted from the source."""
    if source_labels.ndim != 3:
        raise ValueError(f"ClassMix expects (N, H, W) source labels, got {tuple(source_labels.shape)}")
    return torch.stack([class_mask(label, choose_half_classes(label, generator, exclude_ignore))
                        for label in source_labels])


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`source` where `mask`, `target` elsewhere. mask: (N, H, W) bool; source and target: the same
    (N, ..., H, W) shape, e.g. images (N, C, H, W), labels or pixel weights (N, H, W)."""
    if source.shape != target.shape:
        raise ValueError(f"mix: source {tuple(source.shape)} and target {tuple(target.shape)} differ")
    if mask.ndim != 3 or source.ndim < 3 or mask.shape[0] != source.shape[0] or mask.shape[1:] != source.shape[-2:]:
        raise ValueError(f"mix: mask {tuple(mask.shape)} must be (N, H, W) of data {tuple(source.shape)}")
    m = mask.bool().reshape(mask.shape[0], *([1] * (source.ndim - 3)), *mask.shape[1:])
    return torch.where(m, source, target)


def confidence_weight(teacher_probs: torch.Tensor, threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
                      per_image: bool = True) -> torch.Tensor:
    """(N,) weight of each mixed image's pseudo-labelled part: the share of the teacher's target
    pixels whose max probability is >= `threshold` (per image, or pooled over the batch and
    repeated N times with `per_image=False`, as the reference). teacher_probs: (N, C, H, W)."""
    if teacher_probs.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) teacher probabilities, got {tuple(teacher_probs.shape)}")
    confident = (teacher_probs.max(1).values >= threshold).float()
    if per_image:
        return confident.flatten(1).mean(1)
    return confident.mean().expand(teacher_probs.shape[0]).clone()


def mixed_pixel_weight(mask: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """(N, H, W) loss weights of a mixed batch: 1 on the pasted source pixels (true labels),
    `target_weight` (N,) from `confidence_weight` on the pseudo-labelled target pixels."""
    target = target_weight.to(torch.float32).reshape(-1, 1, 1).expand(mask.shape).contiguous()
    return mix(mask, torch.ones_like(target), target)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, pixel_weight: torch.Tensor) -> torch.Tensor:
    """DACS's mixed loss: mean over all N*H*W pixels of cross-entropy x pixel weight, ignore pixels
    contributing 0 but still counted in the mean (so a batch's many ignored pixels shrink it, as
    in the reference). Logits are upsampled bilinearly to the label size first."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if pixel_weight.shape != labels.shape:
        raise ValueError(f"pixel weight {tuple(pixel_weight.shape)} must match labels {tuple(labels.shape)}")
    per_pixel = F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
    return (per_pixel * pixel_weight.float()).mean()


def ema_alpha(step: int, alpha: float = DEFAULT_EMA_ALPHA) -> float:
    """min(1 - 1 / (step + 1), alpha): the true mean of the weights seen so far until the EMA
    with `alpha` weighs the past more (step 0: the teacher becomes the student)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"EMA alpha = {alpha} must be in [0, 1]")
    if step < 0:
        raise ValueError(f"EMA step = {step} must be >= 0")
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float = DEFAULT_EMA_ALPHA, *, step: int,
               copy_buffers: bool = True) -> float:
    """Moves the teacher towards the student after a student step: every parameter becomes
    a * teacher + (1 - a) * student with a = `ema_alpha(step, alpha)`; returns a.

    `copy_buffers` copies the student's buffers (BatchNorm running statistics, counters) into the
    teacher, so a teacher evaluated in eval mode normalises with current statistics; the
    reference leaves the teacher's buffers alone. Both modules must have the same architecture
    (pass the unwrapped student, not a DDP wrapper)."""
    a = ema_alpha(step, alpha)
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}")
    for t, s in zip(t_params, s_params):
        if t.shape != s.shape:
            raise ValueError(f"teacher parameter {tuple(t.shape)} does not match student {tuple(s.shape)}")
        if a == 0.0:
            t.copy_(s)                               # the first step: the teacher *is* the student
        else:
            t.lerp_(s.detach().to(t.dtype), 1.0 - a)     # a * t + (1 - a) * s
    if copy_buffers:
        t_bufs, s_bufs = list(teacher.buffers()), list(student.buffers())
        if len(t_bufs) != len(s_bufs):
            raise ValueError(f"teacher has {len(t_bufs)} buffers, student {len(s_bufs)}")
        for t, s in zip(t_bufs, s_bufs):
            t.copy_(s)
    return a


class DACS(Method):
    """One DACS step (roles: `labelled` = source with labels, `unlabelled` = target).

    1. Source: cross-entropy on the labelled batch (main + `aux_weight` x aux), as `Supervised`.
    2. Teacher (EMA of the student, no gradients, eval mode) on the target batch: pseudo-labels =
       its argmax, weight of each image = its share of pixels at or above `confidence_threshold`.
    3. ClassMix: half the classes of each source image pasted onto a target image; the student
       learns the mixed image against the mixed labels, weighted per pixel (1 on pasted source
       pixels, the image's confidence weight elsewhere): `mixed_weight` x that loss.
    The teacher follows the student at the start of each step, i.e. after the engine's previous
    optimiser step (`ema_alpha(step - 1)`), which is the reference's update shifted by one call.
    ClassMix randomness comes from (`seed`, step): a resumed run mixes as an uninterrupted one.
    """

    roles = ("labelled", "unlabelled")

    def __init__(self, model: nn.Module, stage_cfg, dacs_cfg, seed: int):
        import copy
        super().__init__()
        self.cfg, self.dacs, self.seed = stage_cfg, dacs_cfg, seed
        self.add_segmenter(model, stage_cfg.optimizer)
        teacher = copy.deepcopy(model)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.modules["teacher"] = teacher

    def training_step(self, batch: Batch, step: int, backward: Backward) -> dict[str, torch.Tensor]:
        from segshift.components.engine.loop import unwrap
        from segshift.components.losses import segmentation_loss
        model, teacher = self.modules["model"], unwrap(self.modules["teacher"])
        if step > 0:
            ema_update(teacher, unwrap(model), self.dacs.ema_alpha, step=step - 1)
        images, labels = batch["labelled"]
        target_images, _ = batch["unlabelled"]
        check_same_size(images, target_images, "DACS mixes")
        logs = segmentation_loss(model(images), labels, self.cfg.aux_weight)
        backward(logs["loss"])      # one backward per forward pass, as DDP expects

        teacher.eval()
        with torch.no_grad():
            probs = F.interpolate(teacher(target_images).main.float(), size=target_images.shape[-2:],
                                  mode="bilinear", align_corners=False).softmax(1)
        weight = confidence_weight(probs, self.dacs.confidence_threshold)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        mask = classmix_mask(labels.cpu(), generator).to(labels.device)
        mixed_images = mix(mask, images, target_images)
        mixed_labels = mix(mask, labels, probs.argmax(1))
        mixed = weighted_cross_entropy(model(mixed_images).main, mixed_labels,
                                       mixed_pixel_weight(mask, weight))
        backward(self.dacs.mixed_weight * mixed)
        logs.update({"mixed": mixed, "confident_share": weight.mean(),
                     "pasted_share": mask.float().mean()})
        logs["loss"] = logs["loss"] + self.dacs.mixed_weight * mixed
        return {name: value.detach() for name, value in logs.items()}
