"""`segshift preview`: a picture of what the built-in generator makes with the current params."""
from __future__ import annotations

import argparse
from pathlib import Path

from segshift.components.config import load_params
from segshift.components.data.synthetic import (CONDITIONS, render_sample, sample_rng,
                                                source_style, target_style)
from segshift.components.io import write_png
from segshift.components.visualize import colorize, grid


def preview_grid(seed: int, height: int, width: int, appearance_gap: float):
    """Row 1-2: source images and labels; row 3-4: one target image per condition and labels."""
    rows = []
    for domain, style in (("source", source_style()), ("target", target_style(appearance_gap))):
        conditions = ["clear"] * len(CONDITIONS) if domain == "source" else list(CONDITIONS)
        samples = [render_sample(style, height, width, condition, sample_rng(seed, domain, "train", i))
                   for i, condition in enumerate(conditions)]
        rows.append([image for image, _ in samples])
        rows.append([colorize(label) for _, label in samples])
    return grid(rows)


def _cmd_preview(args: argparse.Namespace) -> int:
    builtin = load_params(args.params).prepare.builtin
    picture = preview_grid(builtin.seed, builtin.height, builtin.width, builtin.appearance_gap)
    write_png(Path(args.out), picture)
    print(f"wrote {args.out}")
    return 0


def build_preview_parser(sub, add_params) -> None:
    parser = sub.add_parser("preview", help="render a grid of built-in source/target samples")
    add_params(parser)
    parser.add_argument("--out", default="docs/builtin_samples.png", help="PNG to write")
    parser.set_defaults(func=_cmd_preview)
