"""DACS, Domain Adaptation via Cross-domain mixed Sampling (Tranheden et al., WACV 2021): the mechanisms.

Why it works: self-training on target pseudo-labels alone drifts, because the network's target
errors are systematic (rare classes get absorbed by frequent neighbours: "class conflation").
DACS pastes half of the classes of a *source* image, with their true labels, onto a target image
whose remaining pixels carry the pseudo-labels of an EMA teacher. Every mixed image thus holds
correct labels for some objects in a target context, which keeps rare classes alive, and the
ClassMix cut follows object boundaries, so the pasted objects stay plausible. The teacher is an
exponential moving average of the student: slower, less noisy pseudo-labels. The mixed loss is
weighted by the share of confident teacher pixels, so early, uncertain rounds count less.

Reference code followed: vikolss/DACS on GitHub at commit fc44a7468803fb64deb04d23db8b7b94a5ea04d4
(`trainUDA.py`, `utils/transformsgpu.py`, `utils/transformmasks.py`, `utils/loss.py`), with
`configs/configUDA.json` (commit e6cb52210377ec1f3809eea05a861586c2a55759). The defaults below are
the reference's; each option that departs from it is named in `DacsConfig`.

- ClassMix: per image, `torch.unique` of its source labels, then ceil(n / 2) = (n + n % 2) / 2 of
  the n values drawn without replacement; mask = pixels of the drawn values
  (`transformmasks.generate_class_mask`). The line dropping the ignore label is commented out in
  the reference, so ignore counts as a "class" and can be pasted (`classmix_ignore=True`, the
  default); `classmix_ignore=False` excludes it.
- Mixing (`transformsgpu.oneMix`): mask * source + (1 - mask) * target, for images, labels
  (source ground truth / teacher argmax) and the pixel weights (1 / the confidence weight).
- Strong augmentation of the mixed image (`strongTransform`: oneMix, colorJitter, gaussian_blur,
  flip): with probability 0.8 (`random.uniform(0, 1) > 0.2`, one draw per iteration shared by the
  batch) kornia's ColorJitter(0.25, 0.25, 0.25, 0.25) of that era, per image: brightness
  x + (b - 1), contrast x * c, saturation S * s in HSV, hue + h turns, b, c, s ~ U[0.75, 1.25],
  h ~ U[-0.25, 0.25], in a random order, each clipped to [0, 1], on the image in [0, 1]; then with
  probability 0.5 (`> 0.5`, shared) a Gaussian blur, sigma ~ U[0.15, 1.15] per image, kernel
  about 10 % of the image side (odd), reflected borders. Labels and weights are only mixed (the
  reference's flip is off: `"flip": false`).
- Weight (`pixel_weight: "threshold_uniform"`): number of teacher max-probabilities >= 0.968
  divided by the number of pixels, pooled over the whole batch (`confidence_per_image=False`, the
  default; True gives each mixed image the share of its own target).
- Loss (`utils/loss.CrossEntropyLoss2dPixelWiseWeighted`): per-pixel cross-entropy (0 at ignore)
  times the pixel weight, averaged over *all* pixels, ignored ones included.
- Teacher (`create_ema_model`, then `ema_model.train()`, never switched to eval): pseudo-labels
  come from the teacher in *train* mode, so its BatchNorm layers normalise with the statistics
  of the target batch itself (`teacher_mode="train"`, the default). EMA (`update_ema_variables`,
  alpha_teacher = 0.99, after the optimiser step with the 0-based iteration): alpha =
  min(1 - 1 / (iteration + 1), alpha), param = alpha * teacher + (1 - alpha) * student, on
  parameters only; buffers are neither averaged nor copied. `teacher_mode="eval"` instead runs
  the teacher in eval mode with the student's buffers copied at every update.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segshift.components.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.methods.base import Backward, Batch, Method, MethodSpec, check_same_size

#: the reference's teacher momentum and confidence threshold
DEFAULT_EMA_ALPHA = 0.99
DEFAULT_CONFIDENCE_THRESHOLD = 0.968
#: the reference's strong augmentation (`strongTransform`, `transformsgpu.colorJitter` /
#: `gaussian_blur`): jitter when U(0, 1) > 0.2, of strength 0.25 for all four factors (hue in
#: turns of the colour circle); blur when U(0, 1) > 0.5 with sigma ~ U[0.15, 1.15]
JITTER_P = 0.8
JITTER_STRENGTH = 0.25
BLUR_P = 0.5
BLUR_SIGMA = (0.15, 1.15)


def choose_half_classes(label: torch.Tensor, generator: torch.Generator | None = None,
                        exclude_ignore: bool = False) -> torch.Tensor:
    """The classes ClassMix pastes from one (H, W) source label map: ceil(n / 2) of its n present
    values, drawn uniformly without replacement (sorted; on the label's device). As the reference,
    the ignore label counts as one of the n and can be drawn unless `exclude_ignore`. Empty when
    the map has no class. Randomness comes only from `generator` (a CPU torch.Generator)."""
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
                  exclude_ignore: bool = False) -> torch.Tensor:
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
                      per_image: bool = False) -> torch.Tensor:
    """(N,) weight of each mixed image's pseudo-labelled part: the share of the teacher's target
    pixels whose max probability is >= `threshold`, pooled over the batch and repeated N times (as
    the reference), or each image's own share with `per_image=True`. teacher_probs: (N, C, H, W)."""
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


# --- strong augmentation of the mixed batch (the reference's `strongTransform`) ---------------------

def rgb_to_hsv(rgb: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HSV with hue in turns [0, 1), saturation and value in [0, 1]."""
    r, g, b = rgb.unbind(1)
    value, argmax = rgb.max(1)
    delta = value - rgb.min(1).values
    saturation = delta / (value + eps)
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(argmax == 0, (g - b) / d,
                      torch.where(argmax == 1, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    hue = torch.where(delta > 0, torch.remainder(hue / 6.0, 1.0), torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv` (hue in turns, taken modulo 1)."""
    hue, saturation, value = hsv.unbind(1)
    h6 = torch.remainder(hue, 1.0) * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    p, q, t = value * (1 - saturation), value * (1 - f * saturation), value * (1 - (1 - f) * saturation)
    sector = sector.long() % 6
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    out = torch.zeros_like(hsv)
    for k, channels in enumerate(choices):
        sel = (sector == k).unsqueeze(1)
        out = torch.where(sel, torch.stack(channels, 1), out)
    return out


def _imagenet(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
    return mean, std


def jitter_colours(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                   saturation: torch.Tensor, hue: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Deterministic colour jitter of a batch of ImageNet-normalised RGB images (N, 3, H, W), as
    the kornia ColorJitter the reference called (today's `kornia.augmentation.ColorJiggle`): on the
    image in [0, 1], brightness adds `brightness - 1`, contrast multiplies by `contrast`,
    saturation multiplies the HSV saturation, hue adds `hue` turns; each step clipped to [0, 1],
    the four in image i's `order[i]` (a permutation of 0..3 in that list's order). Factors: (N,)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"colour jitter expects (N, 3, H, W) images, got {tuple(images.shape)}")
    n = images.shape[0]
    if order.shape != (n, 4) or any(f.shape != (n,) for f in (brightness, contrast, saturation, hue)):
        raise ValueError(f"colour jitter needs (N,) factors and an (N, 4) order for N = {n}")
    mean, std = _imagenet(images.float())
    x = (images.float() * std + mean).clamp(0.0, 1.0)
    out = []
    for i in range(n):
        xi = x[i: i + 1]
        for op in order[i].tolist():
            if op == 0:
                xi = (xi + (float(brightness[i]) - 1.0)).clamp(0.0, 1.0)
            elif op == 1:
                xi = (xi * float(contrast[i])).clamp(0.0, 1.0)
            elif op == 2:
                hsv = rgb_to_hsv(xi)
                hsv = torch.stack([hsv[:, 0], (hsv[:, 1] * float(saturation[i])).clamp(0.0, 1.0), hsv[:, 2]], 1)
                xi = hsv_to_rgb(hsv)
            else:
                hsv = rgb_to_hsv(xi)
                xi = hsv_to_rgb(torch.stack([hsv[:, 0] + float(hue[i]), hsv[:, 1], hsv[:, 2]], 1))
        out.append(xi)
    return ((torch.cat(out) - mean) / std).to(images.dtype)


def blur_kernel_size(side: int) -> int:
    """The reference's Gaussian kernel size for an image side: ceil(0.1 * side), made odd
    (floor(c - 0.5 + c % 2): an even c becomes c - 1)."""
    c = math.ceil(0.1 * side)
    return int(math.floor(c - 0.5 + c % 2))


def gaussian_kernel(size: int, sigma: float, device=None) -> torch.Tensor:
    """A normalised 1-D Gaussian window of odd `size` centred on its middle tap."""
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    k = torch.exp(-x.pow(2) / (2.0 * sigma ** 2))
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image of (N, C, H, W) blurred with its own sigma (N,), separably, kernel size from
    `blur_kernel_size` per axis, reflected borders (kornia's GaussianBlur2d as the reference
    called it). Blurring commutes with the per-channel normalisation, so it runs on the
    normalised images directly."""
    if images.ndim != 4 or sigma.shape != (images.shape[0],):
        raise ValueError(f"blur expects (N, C, H, W) images and (N,) sigmas, got "
                         f"{tuple(images.shape)} and {tuple(sigma.shape)}")
    n, c, h, w = images.shape
    ky, kx = blur_kernel_size(h), blur_kernel_size(w)
    out = []
    for i in range(n):
        x = images[i: i + 1].float()
        s = float(sigma[i])
        if kx > 1:
            k = gaussian_kernel(kx, s, x.device).reshape(1, 1, 1, kx).expand(c, 1, 1, kx)
            x = F.conv2d(F.pad(x, (kx // 2, kx // 2, 0, 0), mode="reflect"), k, groups=c)
        if ky > 1:
            k = gaussian_kernel(ky, s, x.device).reshape(1, 1, ky, 1).expand(c, 1, ky, 1)
            x = F.conv2d(F.pad(x, (0, 0, ky // 2, ky // 2), mode="reflect"), k, groups=c)
        out.append(x)
    return torch.cat(out).to(images.dtype)


def strong_augment(images: torch.Tensor, generator: torch.Generator | None = None, *,
                   jitter: bool = True, blur: bool = True) -> tuple[torch.Tensor, dict[str, bool]]:
    """The reference's strong augmentation of a mixed batch: colour jitter with probability
    `JITTER_P`, then Gaussian blur with probability `BLUR_P`; whether each happens is one draw for
    the whole batch, the factors and sigma are drawn per image. All draws come from `generator`
    (a CPU torch.Generator) in a fixed order and happen whatever the outcome or the switches, so
    turning one part off does not change the other's draws. Returns the images and which parts
    ran. Labels and pixel weights are not touched (the reference's flip is off)."""
    n = images.shape[0]
    s = JITTER_STRENGTH
    u_jitter = float(torch.rand((), generator=generator))
    factors = [torch.empty(n).uniform_(max(0.0, 1.0 - s), 1.0 + s, generator=generator) for _ in range(3)]
    hue = torch.empty(n).uniform_(-s, s, generator=generator)
    order = torch.stack([torch.randperm(4, generator=generator) for _ in range(n)])
    u_blur = float(torch.rand((), generator=generator))
    sigma = torch.empty(n).uniform_(*BLUR_SIGMA, generator=generator)
    done = {"jitter": jitter and u_jitter > 1.0 - JITTER_P, "blur": blur and u_blur > 1.0 - BLUR_P}
    if done["jitter"]:
        images = jitter_colours(images, *factors, hue, order)
    if done["blur"]:
        images = gaussian_blur(images, sigma)
    return images, done


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
               copy_buffers: bool = False) -> float:
    """Moves the teacher towards the student after a student step: every parameter becomes
    a * teacher + (1 - a) * student with a = `ema_alpha(step, alpha)`; returns a.

    Buffers (BatchNorm running statistics, counters) are left alone, as in the reference, whose
    teacher runs in train mode and so never reads them. `copy_buffers` copies the student's
    buffers into the teacher instead, for a teacher evaluated in eval mode. Both modules must have the same architecture
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
    2. Teacher (EMA of the student, no gradients) on the target batch: in train mode by default,
       i.e. BatchNorm normalises with the target batch's own statistics, as the reference
       (`teacher_mode: eval`: eval mode with the student's copied running statistics).
       Pseudo-labels = its argmax; weight = the share of pixels at or above
       `confidence_threshold`, pooled over the batch (or per image: `confidence_per_image`).
    3. ClassMix: half the classes of each source image pasted onto a target image, then the
       reference's strong augmentation of the mixed images (`color_jitter`, `blur`); the student
       learns them against the mixed labels, weighted per pixel (1 on pasted source pixels, the
       confidence weight elsewhere): `mixed_weight` x that loss.
    The teacher follows the student once per optimiser step, at the first micro-batch of the next
    step (`ema_alpha(step - 1)`): the reference's update after its optimiser step, shifted by one
    call. ClassMix and augmentation randomness come from (`seed`, step, micro-batch, rank): a
    resumed run mixes as an uninterrupted one.
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
        self._last_step, self._micro = -1, 0     # EMA once per optimiser step, micro-batch index

    def _generator(self, step: int) -> torch.Generator:
        """A CPU generator for (seed, step, micro-batch, rank), hashed by numpy's SeedSequence
        (torch's CPU generator keeps only 32 bits of its seed, so no bit packing)."""
        import numpy as np
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        state = np.random.SeedSequence([self.seed, step, self._micro, rank]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(state))

    def training_step(self, batch: Batch, step: int, backward: Backward) -> dict[str, torch.Tensor]:
        from segshift.components.engine.loop import unwrap
        from segshift.components.losses import segmentation_loss
        model, teacher = self.modules["model"], unwrap(self.modules["teacher"])
        eval_teacher = self.dacs.teacher_mode == "eval"
        if step != self._last_step:              # first micro-batch of this optimiser step
            if step > 0:
                ema_update(teacher, unwrap(model), self.dacs.ema_alpha, step=step - 1,
                           copy_buffers=eval_teacher)
            self._last_step, self._micro = step, 0
        else:
            self._micro += 1
        images, labels = batch["labelled"]
        target_images, _ = batch["unlabelled"]
        check_same_size(images, target_images, "DACS mixes")
        logs = segmentation_loss(model(images), labels, self.cfg.aux_weight)
        backward(logs["loss"])      # one backward per forward pass, as DDP expects

        teacher.train(not eval_teacher)          # reference: train mode, BN on the batch's statistics
        with torch.no_grad():
            probs = F.interpolate(teacher(target_images).main.float(), size=target_images.shape[-2:],
                                  mode="bilinear", align_corners=False).softmax(1)
        weight = confidence_weight(probs, self.dacs.confidence_threshold,
                                   per_image=self.dacs.confidence_per_image)
        generator = self._generator(step)
        mask = classmix_mask(labels.cpu(), generator,
                             exclude_ignore=not self.dacs.classmix_ignore).to(labels.device)
        mixed_images, done = strong_augment(mix(mask, images, target_images), generator,
                                            jitter=self.dacs.color_jitter, blur=self.dacs.blur)
        mixed_labels = mix(mask, labels, probs.argmax(1))
        mixed = weighted_cross_entropy(model(mixed_images).main, mixed_labels,
                                       mixed_pixel_weight(mask, weight))
        backward(self.dacs.mixed_weight * mixed)
        logs.update({"mixed": mixed, "confident_share": weight.mean(),
                     "pasted_share": mask.float().mean()})
        logs["loss"] = logs["loss"] + self.dacs.mixed_weight * mixed
        return {name: value.detach() for name, value in logs.items()}


def build(model: nn.Module, cfg, params, round=None) -> DACS:
    return DACS(model, cfg, params.methods.dacs, seed=params.engine.seed)


METHOD = MethodSpec("dacs", build)
