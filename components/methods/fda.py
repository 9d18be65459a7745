"""FDA, Fourier Domain Adaptation (Yang & Soatto, CVPR 2020): the mechanisms, without a training loop.

Why it works: in a synthetic-to-real gap much of the difference is "style" (global colour, contrast,
illumination, sensor noise), and style lives in the low frequencies of the amplitude spectrum,
while the semantic layout (edges, shapes) lives in the phase. Giving a source image the target's
low-frequency amplitude, keeping the source phase, makes it look like a target image *without* a
learned translation network and without changing what its labels describe. The network is then
trained on these "source in target" images with the source labels, plus an entropy penalty on
target predictions, and the models of several window sizes beta are averaged (multi-band
transfer), whose confident predictions become pseudo-labels for a self-training round.

Reference code followed (YanchaoYang/FDA on GitHub):

- `utils/__init__.py`: `FDA_source_to_target` (the torch path used by `train.py`) swaps the four
  b x b corners of the *unshifted* amplitude spectrum, b = floor(min(H, W) * beta);
  `FDA_source_to_target_np` (the demo) fftshifts and swaps the centred (2b+1) x (2b+1) square,
  i.e. every frequency with |k_y| <= b and |k_x| <= b. `train.py` applies it to raw 0..255 images
  (mean subtraction comes after) and does not clip the result.
- `model/deeplab.py` `forward` (train phase): softmax of the classifier's logits at *their own*
  (1/8) resolution, entropy / ln(19), then (ent**2 + 1e-8) ** ita, mean over those pixels; ita = 2
  by default (`options/train_options.py`), weight entW = 0.005. `train.py` adds it on target
  images when `i > switch2entropy` (README command: 0; options default 50000 of 150000 steps).
- `SStrain.py` (the self-training round): source in target style (LB = 0.01) + cross-entropy on
  the pseudo-labelled target images + entW x the entropy of *those same* predictions, from the
  first step (no switch); no entropy term on the plain target batch, which only lends its style.
- `getSudoLabel_multi.py`: the three beta models' softmax maps averaged with weights
  (0.3333, 0.3333, 0.3334); per predicted class the threshold is the confidence at index
  round(0.66 * n) of that class's sorted confidences over the whole target set, capped at 0.9;
  pixels below their class's threshold become ignore.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from segshift.components.data.dataset import IMAGENET_MEAN, IMAGENET_STD, PreparedSplit
from segshift.components.data.labels import IGNORE_INDEX, NUM_CLASSES
from segshift.components.evaluation import (Evaluation, has_full_labels, protocol_confusion, scoring_loader,
                                            upsample_to_full, validation_metrics)
from segshift.components.losses import normalised_entropy, upsample
from segshift.components.methods.base import Backward, Batch, Method, MethodSpec, check_same_size
from segshift.components.methods.rounds import Round, RoundContext, source_and_target
from segshift.components.models.base import SegOutput
from segshift.components.models.classes import model_protocol, to_train_ids

#: the window sizes of the paper's multi-band transfer (MBT)
PAPER_BETAS: tuple[float, ...] = (0.01, 0.05, 0.09)
#: FDA's `ita` for the robust entropy, and the weight `entW` of that term
DEFAULT_ETA = 2.0
DEFAULT_ENTROPY_WEIGHT = 0.005
#: `getSudoLabel_multi.py`: the per-class rank of the threshold and its cap
DEFAULT_CLASS_QUANTILE = 0.66
DEFAULT_THRESHOLD_CAP = 0.9
#: the squared Charbonnier epsilon of the reference code (1e-8 = 1e-4 ** 2)
CHARBONNIER_EPS2 = 1e-8


def check_beta(beta: float) -> float:
    """beta must lie in (0, 0.5): 0 swaps nothing, and from 0.5 on the window would cover the whole
    spectrum along the shorter side (the image would become the target's amplitude everywhere)."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < 0.5:
        raise ValueError(f"FDA beta = {beta!r} must be a number in (0, 0.5)")
    return float(beta)


def window_half_size(height: int, width: int, beta: float) -> int:
    """b = floor(min(H, W) * beta), as the reference code computes it (np.floor of the product)."""
    return math.floor(min(height, width) * check_beta(beta))


def low_frequency_mask(height: int, width: int, beta: float, device: torch.device | None = None) -> torch.Tensor:
    """(H, W) bool mask, in the *unshifted* torch.fft.fft2 layout, of the frequencies FDA swaps:
    |k_y| <= b and |k_x| <= b with b = floor(min(H, W) * beta); empty when b = 0.

    For b >= 1 this is exactly the centred (2b+1)^2 square of the reference's numpy path (seen
    without fftshift it is the four corners). The reference's torch path takes corners of side b,
    i.e. frequencies -b..b-1, which is not symmetric under k -> -k: the swapped spectrum is then
    not Hermitian and the real image that comes back no longer has the target's amplitude there.
    The symmetric window keeps the result exactly real and the swap exact. For b = 0 the torch
    path swaps nothing (empty corners), and so do we; the numpy path would swap the DC term.
    """
    b = window_half_size(height, width, beta)
    if b == 0:
        return torch.zeros(height, width, dtype=torch.bool, device=device)
    return (_abs_frequency(height, device)[:, None] <= b) & (_abs_frequency(width, device)[None, :] <= b)


def _abs_frequency(n: int, device: torch.device | None) -> torch.Tensor:
    """|k| of each index of an unshifted length-n FFT: index i is frequency i or i - n."""
    i = torch.arange(n, device=device)
    return torch.minimum(i, n - i)


def low_frequency_swap(source: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """The FDA image transfer: `source` with the low-frequency amplitude of `target`, source phase.

    source: (N, C, H, W) float images; target: (N, C, H, W) or (1, C, H, W) (one style image for
    the whole batch). Image i takes the style of target i, channel by channel. Apply it to images
    on the scale the network will see *before* normalisation (the reference uses raw 0..255 and
    subtracts the mean afterwards; the result is not clipped, values may leave the input range).
    Returns a tensor of the source's shape, dtype and device. The FFT runs in float32 (float64
    for float64 input), as half-precision FFTs need power-of-two sizes.
    """
    check_beta(beta)
    if source.ndim != 4 or target.ndim != 4:
        raise ValueError(f"FDA expects (N, C, H, W) images, got source {tuple(source.shape)} "
                         f"and target {tuple(target.shape)}")
    if target.shape[1:] != source.shape[1:] or target.shape[0] not in (1, source.shape[0]):
        raise ValueError(f"FDA target {tuple(target.shape)} must match source {tuple(source.shape)} "
                         "in (C, H, W) and have the same batch size or 1 (crop the target first)")
    if not source.is_floating_point() or not target.is_floating_point():
        raise TypeError(f"FDA expects float images, got {source.dtype} and {target.dtype}")
    height, width = source.shape[-2:]
    mask = low_frequency_mask(height, width, beta, device=source.device)
    if not mask.any():
        return source.clone()
    work = torch.float64 if source.dtype == torch.float64 else torch.float32
    # rfft2 keeps the columns 0..W//2; the window is Hermitian-symmetric, so that half decides it.
    half = mask[:, : width // 2 + 1]
    spec_src = torch.fft.rfft2(source.to(work))
    amp_trg = torch.fft.rfft2(target.to(work)).abs().expand_as(spec_src)
    swapped = torch.where(half, torch.polar(amp_trg, spec_src.angle()), spec_src)
    return torch.fft.irfft2(swapped, s=(height, width)).to(source.dtype)


def charbonnier_entropy(probs: torch.Tensor, eta: float = DEFAULT_ETA, eps2: float = CHARBONNIER_EPS2) -> torch.Tensor:
    """FDA's robust entropy penalty on target predictions: mean over pixels of (e^2 + eps2)^eta,
    e the per-pixel entropy of `probs` (N, C, H, W) divided by ln C (the reference divides by
    2.9444 = ln 19), so e is in [0, 1].

    Why the Charbonnier form: for eta > 0.5 it penalises high-entropy (uncertain) predictions
    more than low-entropy ones (the paper's argument; eta = 2 in the code), so the target term
    acts mostly where the network hesitates instead of sharpening what it already predicts.
    eps2 = 1e-8 is the code's constant (the paper writes 0.001^2).
    """
    if eta <= 0:
        raise ValueError(f"Charbonnier entropy eta = {eta} must be > 0")
    if probs.ndim != 4 or probs.shape[1] < 2:
        raise ValueError(f"expected (N, C, H, W) probabilities with C >= 2, got {tuple(probs.shape)}")
    p = probs if probs.dtype == torch.float64 else probs.float()
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(1) / math.log(p.shape[1])
    return ((ent ** 2 + eps2) ** eta).mean()


def multi_band_ensemble(prob_maps: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Multi-band transfer: the (weighted) mean of the softmax probabilities of models trained
    with different beta (the paper: 0.01, 0.05, 0.09). Each band's model errs differently (small
    windows keep more source style, large ones add more artefacts), so the average is better than
    any one of them (the paper: 50.45 mIoU on GTA5 -> Cityscapes with DeepLab-v2). Probabilities
    are averaged, not logits. Default weights are equal, as the reference's
    (0.3333, 0.3333, 0.3334). All maps must have the same shape (upsample them first)."""
    maps = list(prob_maps)
    if not maps:
        raise ValueError("multi-band ensemble needs at least one probability map")
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) != 1:
        raise ValueError(f"multi-band ensemble maps differ in shape: {sorted(shapes)}")
    if weights is None:
        weights = [1.0 / len(maps)] * len(maps)
    weights = [float(w) for w in weights]
    if len(weights) != len(maps) or any(w < 0 for w in weights) or not math.isclose(sum(weights), 1.0, abs_tol=1e-3):
        raise ValueError(f"ensemble weights {weights} must be {len(maps)} non-negative numbers summing to 1")
    return sum(w * m.float() for w, m in zip(weights, maps))


def class_thresholds(labels: torch.Tensor, confidence: torch.Tensor, num_classes: int,
                     quantile: float = DEFAULT_CLASS_QUANTILE,
                     cap: float = DEFAULT_THRESHOLD_CAP) -> torch.Tensor:
    """Per predicted class c, the confidence of rank round(quantile * n_c) in the ascending sorted
    confidences of its n_c pixels, capped at `cap`; 0 for a class never predicted (float32, (C,)).

    Why per class: one global cut keeps only the easy, dominant classes; a per-class rank keeps
    the top share of *every* class, and the cap stops frequent, very confident classes (road,
    sky) from discarding their moderately confident pixels. round() is half-to-even, like the
    reference's np.round. Pass the predictions of the whole target set (the reference thresholds
    over all images at once): thresholds from one batch are noisier.
    """
    if not 0 <= quantile <= 1:
        raise ValueError(f"class threshold quantile = {quantile} must be in [0, 1]")
    if labels.shape != confidence.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and confidence {tuple(confidence.shape)} differ")
    thresholds = torch.zeros(num_classes, dtype=torch.float32)
    flat_labels, flat_conf = labels.reshape(-1), confidence.reshape(-1).float()
    for c in range(num_classes):
        values = flat_conf[flat_labels == c]
        if values.numel():
            # sorted[index] without sorting; the reference indexes x[round(0.66 n)], which is out
            # of range for n = 1 (an IndexError there): we take the last value instead
            index = min(round(values.numel() * quantile), values.numel() - 1)
            thresholds[c] = values.kthvalue(index + 1).values.cpu()
    return thresholds.clamp_max(cap)


def apply_class_thresholds(labels: torch.Tensor, confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """A copy of `labels` (int) whose pixels with confidence < their class's threshold (and any
    label outside the thresholds' classes) are IGNORE_INDEX."""
    thresholds = thresholds.to(confidence.device, torch.float32)
    valid = (labels >= 0) & (labels < thresholds.numel())
    keep = valid & (confidence.float() >= thresholds[labels.clamp(0, thresholds.numel() - 1)])
    return torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))


def ensemble_pseudo_labels(prob_maps: Sequence[torch.Tensor], quantile: float = DEFAULT_CLASS_QUANTILE,
                           cap: float = DEFAULT_THRESHOLD_CAP) -> tuple[torch.Tensor, torch.Tensor]:
    """FDA's self-training labels from the multi-band ensemble of (N, C, H, W) probability maps:
    argmax of the averaged map, with pixels below their class's threshold (`class_thresholds`,
    computed over all N images given) set to IGNORE_INDEX. Returns (labels (N, H, W) int64,
    thresholds (C,))."""
    mean = multi_band_ensemble(prob_maps)
    confidence, labels = mean.max(1)
    thresholds = class_thresholds(labels, confidence, mean.shape[1], quantile, cap)
    return apply_class_thresholds(labels, confidence, thresholds), thresholds


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (N, 3, H, W) tensors back to the 0..255 scale FDA swaps spectra on."""
    mean = torch.as_tensor(IMAGENET_MEAN, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean) * 255.0


def from_pixels(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.as_tensor(IMAGENET_MEAN, device=pixels.device).view(1, -1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=pixels.device).view(1, -1, 1, 1)
    return (pixels / 255.0 - mean) / std


class FDA(Method):
    """One FDA step (roles: `labelled` = source with labels, `unlabelled` = target).

    1. Source in target style: each source image gets its target partner's low-frequency
       amplitude (window `beta`, on the 0..255 scale as the reference, then normalised again).
    2. Cross-entropy of the stylised source batch against the source labels (main + aux).
    3. From step `entropy_start` on: `entropy_weight` x the Charbonnier entropy (`eta`) of the
       target predictions at the network's output resolution, as the reference's model computes
       it (no upsampling first).
    4. Self-training round (`self_training`, role `pseudo` = target images with the multi-band
       ensemble's pseudo-labels), as `SStrain.py`: + their cross-entropy (main + aux) +
       `entropy_weight` x the Charbonnier entropy of those same predictions, from the first step;
       the plain target batch then only lends its style (no entropy term of its own).
    A model per beta of `PAPER_BETAS`, averaged by `multi_band_ensemble`, gives the pseudo-labels
    of FDA's self-training round.
    """

    roles = ("labelled", "unlabelled")

    def __init__(self, model: nn.Module, stage_cfg, fda_cfg, beta: float | None = None,
                 self_training: bool = False):
        super().__init__()
        self.cfg, self.fda = stage_cfg, fda_cfg
        self.beta = check_beta(fda_cfg.beta if beta is None else beta)
        if self_training:
            self.roles = ("labelled", "unlabelled", "pseudo")
        self.add_segmenter(model, stage_cfg.optimizer)

    def training_step(self, batch: Batch, step: int, backward: Backward) -> dict[str, torch.Tensor]:
        from segshift.components.losses import segmentation_loss
        model = self.modules["model"]
        images, labels = batch["labelled"]
        target_images, _ = batch["unlabelled"]
        check_same_size(images, target_images, "FDA swaps spectra of")
        partners = target_images[torch.arange(images.shape[0]) % target_images.shape[0]]
        stylised = from_pixels(low_frequency_swap(to_pixels(images.float()), to_pixels(partners.float()),
                                                  self.beta)).to(images.dtype)
        logs = segmentation_loss(model(stylised), labels, self.cfg.aux_weight)
        backward(logs["loss"])
        weight = self.fda.entropy_weight
        if "pseudo" in self.roles:
            # SStrain.py: loss_seg_psu + entW * loss_ent_psu, one forward, no entropy switch
            pseudo_images, pseudo_labels = batch["pseudo"]
            out = model(pseudo_images)
            pseudo = segmentation_loss(out, pseudo_labels, self.cfg.aux_weight)["loss"]
            total = pseudo
            if weight > 0:
                entropy = charbonnier_entropy(out.main.float().softmax(1), self.fda.eta)
                total = total + weight * entropy
                logs["entropy"] = entropy
            backward(total)
            logs["pseudo"] = pseudo
            logs["loss"] = logs["loss"] + total
        elif step >= self.fda.entropy_start and weight > 0:
            # the reference's model takes the entropy of its logits at their own resolution
            entropy = charbonnier_entropy(model(target_images).main.float().softmax(1), self.fda.eta)
            backward(weight * entropy)
            logs["entropy"] = entropy
            logs["loss"] = logs["loss"] + weight * entropy
        return {name: value.detach() for name, value in logs.items()}


# -- the multi-band transfer: one model per beta, their ensemble, a self-training round ----------------
#
# One model per beta of the ensemble, whose mean softmax is evaluated (the paper's MBT result) and
# pseudo-labels target train (per-class confidence thresholds), then a self-training round at `beta`
# on them, from the stage's init like the band models (the reference's).

def ensemble_probabilities(outputs, size: tuple[int, int], resize=upsample) -> torch.Tensor:
    """The multi-band ensemble as the reference computes it (`evaluation_multi.py`,
    `getSudoLabel_multi.py`): each model's softmax at its output resolution, averaged, and the
    averaged probabilities resized to `size` (`resize`: bilinear; `upsample_to_full` for a
    native-resolution label, as the reference's 2048x1024 evaluation)."""
    mean = multi_band_ensemble([out.main.float().softmax(1) for out in outputs])
    return mean if tuple(mean.shape[-2:]) == tuple(size) else resize(mean, size)


def _targets(labels: torch.Tensor, full_labels: list[torch.Tensor] | None):
    """(label (1, H, W), the resize that scores against it) per sample: the native-resolution label
    where the dataset has one (as `evaluate`), else the prepared label."""
    for i in range(labels.shape[0]):
        if full_labels is not None and full_labels[i].numel():
            yield full_labels[i][None], upsample_to_full
        else:
            yield labels[i:i + 1], upsample


@torch.inference_mode()
def evaluate_ensemble(models: list[torch.nn.Module], dataset, batch_size: int, device: torch.device,
                      progress: bool = False, desc: str = "fda: ensemble") -> tuple[Evaluation, list[Evaluation]]:
    """The ensemble's evaluation on a labelled split (argmax of `ensemble_probabilities` at the
    label's size, the native-resolution label where the split has one) and each model's own (argmax
    of its upsampled logits, as `evaluate`), in one pass, one image at a time; a head of another
    class protocol is scored in train ids, as `evaluate` does."""
    protocol = model_protocol(models[0])
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    own = [torch.zeros_like(conf) for _ in models]
    entropy_sum, own_entropy, pixels = 0.0, [0.0] * len(models), 0
    for model in models:
        model.eval()
    full = has_full_labels(dataset)
    for batch in tqdm(scoring_loader(dataset, batch_size, 0, full), desc=desc, disable=not progress,
                      dynamic_ncols=True):
        images, labels, full_labels = batch if full else (*batch, None)
        outputs = [model(images.to(device)) for model in models]
        for i, (target, resize) in enumerate(_targets(labels, full_labels)):
            size = tuple(target.shape[-2:])
            sample = [SegOutput(out.main[i:i + 1]) for out in outputs]
            probs = ensemble_probabilities(sample, size, resize)
            entropy = normalised_entropy(probs)
            entropy_sum += float(entropy.sum())
            pixels += entropy.numel()
            conf += protocol_confusion(probs.argmax(1).cpu(), target, NUM_CLASSES, protocol)
            for k, out in enumerate(sample):
                single = resize(out.main.float(), size).softmax(1)
                own_entropy[k] += float(normalised_entropy(single).sum())
                own[k] += protocol_confusion(single.argmax(1).cpu(), target, NUM_CLASSES, protocol)
    return (Evaluation(conf, entropy_sum / max(pixels, 1), protocol),
            [Evaluation(c, e / max(pixels, 1), protocol) for c, e in zip(own, own_entropy)])


def ensemble_results(context: RoundContext, betas: list[float], inits: list[str]) -> tuple[dict, dict]:
    """The multi-band ensemble (the paper's MBT result) and each band model on target val and
    test: `{"val": summary, "test": summary, "bands": {beta: {"val_miou", "test_miou"}}}`, and
    the ensemble's `validation_metrics` (the schema of a stage's `val`)."""
    models = [context.model(init) for init in inits]
    params, target = context.params, context.prepared / "target"
    result: dict = {"bands": {f"{b:g}": {} for b in betas}}
    for split in ("val", "test"):
        dataset = PreparedSplit(target, split, cache=False)
        ensemble, bands = evaluate_ensemble(models, dataset, params.engine.eval_batch_size, context.device,
                                            context.progress, f"fda: ensemble on target {split}")
        result[split] = ensemble.summary()
        if split == "val":
            val_metrics = validation_metrics(ensemble)
        for beta, band in zip(betas, bands):
            result["bands"][f"{beta:g}"][f"{split}_miou"] = band.summary()["miou"]
    return result, val_metrics


def target_pseudo_labels(context: RoundContext, inits: list[str]) -> tuple[dict, dict]:
    """`getSudoLabel_multi.py`: argmax of the models' mean softmax (`ensemble_probabilities`); per
    predicted class, the confidence of rank round(0.66 n) among that class's n pixels of the whole
    target train set (`class_thresholds`), capped at 0.9; pixels below their class's threshold
    are ignored. Confidences are kept in float32, as the rule ranks exact values. Classes are the
    head's (16 for model.classes: synthia16); the labels are written as train ids."""
    models = [context.model(init) for init in inits]
    protocol = model_protocol(models[0])
    size = context.image_size
    raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for ids, outputs in context.predict(models, "fda: ensemble pseudo-labels"):
        probs = ensemble_probabilities(outputs, size)
        classes = probs.shape[1]                      # the head's classes
        confidence, predicted = probs.max(1)
        for sample_id, label, conf in zip(ids, predicted.to(torch.uint8).cpu(), confidence.cpu()):
            raw[sample_id] = (label, conf)
    thresholds = class_thresholds(torch.cat([label.reshape(-1) for label, _ in raw.values()]).long(),
                                  torch.cat([conf.reshape(-1) for _, conf in raw.values()]),
                                  classes, DEFAULT_CLASS_QUANTILE, DEFAULT_THRESHOLD_CAP)
    labels = {sid: to_train_ids(apply_class_thresholds(label.long(), conf, thresholds).to(torch.uint8).numpy(),
                                protocol)
              for sid, (label, conf) in raw.items()}
    kept = float(np.mean([np.mean(label != IGNORE_INDEX) for label in labels.values()]))
    return labels, {"images": len(labels), "labelled_pixels": kept,
                    "thresholds": [round(float(t), 6) for t in thresholds]}


def rounds(context: RoundContext) -> dict:
    """Unlike LSE's and LabOR's rounds, each model here trains the stage's full `iterations`: the
    multi-band transfer averages *trained* FDA models (the paper trains each band, then the
    self-training round, to the end). Split four ways, every band model stops inside the dip that
    follows the switch to stylised inputs (target val 17 after 37 steps against 19 to 21 after
    150 on the built-in data), and the ensemble of three such models labels worse than any one.

    The ensemble of the band models is evaluated on target val and test (`ensemble`, and MLflow
    `fda_ensemble_*`): it is the paper's MBT number (`evaluation_multi.py`). Without the
    self-training round (`self_training: false`) it is also the stage's headline `val` / `test`
    (these keys of the returned extra replace the single selected model's in the stage metrics,
    whose own scores stay under `ensemble.bands`). The self-training round (`SStrain.py`) starts
    from the stage's init like the band models (`self_training_init: stage`) or from the trained
    `beta` band (`band`), at `beta`."""
    fda = context.params.methods.fda
    betas = list(fda.ensemble_betas)
    steps = context.cfg.iterations
    for beta in betas:
        name = f"beta-{beta:g}"
        spec = context.round_spec(name, "fda", steps, source_and_target(), None, beta)
        context.train(spec)
    inits = [f"beta-{b:g}/best.pt" for b in betas]
    results, val_metrics = ensemble_results(context, betas, inits)
    ensemble = {"betas": betas, **results}
    context.log({f"fda_ensemble_{split}_{key}": ensemble[split][key]
                 for split in ("val", "test") for key in ("miou", "pixel_accuracy")})
    if not fda.self_training:
        return {"ensemble": ensemble, "headline": "ensemble", "val": val_metrics, "test": ensemble["test"]}
    name = "self-training"
    saved = context.labelled_before(name)
    if saved is None:
        labels, report = target_pseudo_labels(context, inits)
        own = f"beta-{fda.beta:g}/best.pt" if fda.self_training_init == "band" else None
        data = source_and_target()
        data["pseudo"] = {"domain": "target", "ids": sorted(labels), "labels_dir": f"{name}/labels"}
        spec = context.round_spec(name, "fda", steps, data, own, fda.beta)
        context.save_round(spec, report, context.write_labels(name, labels))
    else:
        spec, report = Round(**saved["round"]), saved["report"]
    context.log({"fda_pseudo_labelled_pixels": report["labelled_pixels"]})
    context.train(spec)
    return {"ensemble": {**ensemble, **report}, "headline": "selected_round"}


def build(model: nn.Module, cfg, params, round: Round | None = None) -> FDA:
    return FDA(model, cfg, params.methods.fda)


def build_round(model: nn.Module, cfg, params, round: Round | None = None) -> FDA:
    """A band model's step (at the round's beta), or the self-training round's (it has `pseudo` data)."""
    return FDA(model, cfg, params.methods.fda, beta=round.beta, self_training="pseudo" in round.data)


METHOD = MethodSpec("fda", build, steps={"fda": build_round}, rounds=rounds,
                    in_rounds=lambda params: bool(params.methods.fda.ensemble_betas))
