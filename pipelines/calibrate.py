"""`segshift calibrate`: measure the built-in domain gap (source-only vs oracle vs colour-normalised).

The generator is only useful if adaptation has something to close: a model trained on source
labels must fall well short of one trained on target labels, and whitening each image's colours
(the cheapest possible "adaptation") must not be enough.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from segshift.components.config import CalibrateConfig, ModelConfig, load_params
from segshift.components.data.dataset import PreparedSplit
from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.io import atomic_write_text
from segshift.components.metrics import confusion_matrix, summarise
from segshift.components.models.deeplab import DeepLabV2

# (name, training domain, per-image colour normalisation)
CALIBRATION_RUNS = (("source_only", "source", False), ("oracle", "target", False),
                    ("source_only_colour_norm", "source", True))


def _model(model_cfg: ModelConfig) -> DeepLabV2:
    return DeepLabV2(19, model_cfg.backbone, model_cfg.width, tuple(model_cfg.rates), aux_head=False)


def train_quick(cfg: CalibrateConfig, model_cfg: ModelConfig, train: PreparedSplit, desc: str,
                progress: bool) -> DeepLabV2:
    """A plain supervised run of the main head: Adam, poly decay, horizontal flips."""
    torch.manual_seed(cfg.seed)
    model = _model(model_cfg).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    step, batches = 0, iter(loader)
    for step in tqdm(range(cfg.iterations), desc=desc, disable=not progress, dynamic_ncols=True):
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        if torch.rand(()) < 0.5:
            images, labels = images.flip(-1), labels.flip(-1)
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr * (1 - step / cfg.iterations) ** 0.9
        logits = F.interpolate(model(images).main, size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: DeepLabV2, split: PreparedSplit, batch_size: int) -> dict:
    conf = torch.zeros(19, 19, dtype=torch.long)
    for images, labels in DataLoader(split, batch_size=batch_size):
        logits = F.interpolate(model(images).main, size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
        conf += confusion_matrix(logits.argmax(1), labels)
    return summarise(conf)


def calibrate(prepared_dir: Path, cfg: CalibrateConfig, model_cfg: ModelConfig,
              progress: bool = True) -> dict:
    results: dict = {}
    for name, domain, colour_norm in CALIBRATION_RUNS:
        start = time.perf_counter()
        train = PreparedSplit(prepared_dir / domain, "train", cache=True, per_image_norm=colour_norm)
        test = PreparedSplit(prepared_dir / "target", "test", cache=True, per_image_norm=colour_norm)
        model = train_quick(cfg, model_cfg, train, name, progress)
        results[name] = evaluate(model, test, cfg.batch_size)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    oracle = results["oracle"]["miou"]
    results["ratios"] = {name: results[name]["miou"] / oracle
                         for name in ("source_only", "source_only_colour_norm")}
    return results


def _cmd_calibrate(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    results = calibrate(Path(params.prepare.out_dir), params.calibrate, params.model,
                        progress=not args.quiet)
    atomic_write_text(params.calibrate.out, json.dumps(results, indent=2))
    for name in ("source_only", "oracle", "source_only_colour_norm"):
        print(f"{name:26s} target-test mIoU {100 * results[name]['miou']:5.1f}")
    for name, ratio in results["ratios"].items():
        print(f"{name:26s} / oracle = {ratio:.2f}")
    return 0


def build_calibrate_parser(sub, add_params) -> None:
    parser = sub.add_parser("calibrate", help="measure the domain gap of the prepared data")
    add_params(parser)
    parser.set_defaults(func=_cmd_calibrate)
