"""The sweep's pictures: target-val mIoU against lambda, and parallel coordinates of all trials."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from segshift.components.config import Params, SearchDimension
from segshift.components.io import atomic_write_bytes

METRIC = "val_miou"
LAMBDA_NAME = "lambda_vs_miou.png"
PARALLEL_NAME = "parallel_coordinates.png"
STATE_COLOURS = {"finished": "#4c72b0", "stopped": "#dd8452", "error": "#c44e52"}


def axis_position(dimension: SearchDimension, value: Any) -> float:
    """Where `value` sits on its dimension's axis, in [0, 1] (log scale for loguniform)."""
    if dimension.type == "choice":
        values = [repr(v) for v in dimension.values or []]
        return values.index(repr(value)) / max(1, len(values) - 1) if repr(value) in values else math.nan
    low, high, v = float(dimension.low), float(dimension.high), float(value)
    if dimension.type == "loguniform":
        low, high, v = math.log(low), math.log(high), math.log(v)
    return (v - low) / (high - low)


def figure_png(figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _x_key(space: dict[str, SearchDimension]) -> str:
    if "rank.lambda" in space:
        return "rank.lambda"
    numeric = [k for k, d in space.items() if d.type != "choice"]
    return numeric[0] if numeric else next(iter(space))


def lambda_picture(rows: list[dict], space: dict[str, SearchDimension]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = _x_key(space)
    figure, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for state, colour in STATE_COLOURS.items():
        chosen = [r for r in rows if r["state"] == state and math.isfinite(r[METRIC])]
        if chosen:
            x = [axis_position(space[key], r["config"][key]) if space[key].type == "choice"
                 else r["config"][key] for r in chosen]
            ax.scatter(x, [100 * r[METRIC] for r in chosen], color=colour, label=state, s=30)
    if space[key].type == "loguniform":
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("target-val mIoU (best report)")
    ax.set_title(f"sweep: {key} vs target-val mIoU ({len(rows)} trials)", fontsize=10)
    ax.legend(fontsize=8)
    return figure_png(figure)


def parallel_picture(rows: list[dict], space: dict[str, SearchDimension]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(space)
    finite = [r for r in rows if math.isfinite(r[METRIC])]
    figure, ax = plt.subplots(figsize=(max(6, 1.6 * (len(keys) + 1)), 4), dpi=100)
    if finite:
        scores = np.array([r[METRIC] for r in finite])
        low, high = scores.min(), scores.max()
        cmap = plt.get_cmap("viridis")
        for row, score in sorted(zip(finite, scores), key=lambda item: item[1]):
            y = [axis_position(space[k], row["config"][k]) for k in keys]
            y.append((score - low) / (high - low) if high > low else 0.5)
            ax.plot(range(len(keys) + 1), y, color=cmap((score - low) / (high - low) if high > low else 1.0),
                    alpha=0.8, linewidth=1.5 if row is finite[0] else 1.0)
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(100 * low, 100 * high))
        figure.colorbar(sm, ax=ax, label="target-val mIoU")
    ax.set_xticks(range(len(keys) + 1))
    ax.set_xticklabels([*keys, "val mIoU"], rotation=20, fontsize=8)
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["low", "high"])
    ax.set_title("sweep: parallel coordinates (colour = target-val mIoU)", fontsize=10)
    return figure_png(figure)


def write_pictures(rows: list[dict], params: Params, directory: Path) -> list[Path]:
    space = dict(params.sweep.space)
    return [atomic_write_bytes(directory / LAMBDA_NAME, lambda_picture(rows, space)),
            atomic_write_bytes(directory / PARALLEL_NAME, parallel_picture(rows, space))]
