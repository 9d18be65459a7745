"""Pictures people would rather look at than read: coloured label maps and sample grids."""
from __future__ import annotations

import numpy as np

from segshift.components.data.labels import IGNORE_INDEX

# The Cityscapes colour of each train id (0..18), as in the official devkit.
TRAIN_ID_COLOURS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 RGB in Cityscapes colours; ignore is black."""
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(TRAIN_ID_COLOURS)] = TRAIN_ID_COLOURS
    palette[IGNORE_INDEX] = 0
    return palette[label]


def grid(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Tile equally sized RGB images into one picture with white gaps."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            canvas[i * (height + gap):i * (height + gap) + height, j * (width + gap):j * (width + gap) + width] = tile
    return canvas


def heatmap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB (inferno: dark = low, yellow = high)."""
    import cv2
    scaled = np.clip(values * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def denormalise(image: np.ndarray) -> np.ndarray:
    """(3, H, W) ImageNet-normalised float -> (H, W, 3) uint8 RGB."""
    from segshift.components.data.dataset import IMAGENET_MEAN, IMAGENET_STD
    rgb = image.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(rgb * 255.0, 0, 255).astype(np.uint8)


def prediction_rows(images: np.ndarray, labels: np.ndarray | None, predictions: np.ndarray,
                    entropies: np.ndarray) -> list[list[np.ndarray]]:
    """One row per sample: image | ground truth (if any) | prediction | entropy map."""
    rows = []
    for i in range(len(images)):
        row = [denormalise(images[i])]
        if labels is not None:
            row.append(colorize(labels[i].astype(np.uint8)))
        row += [colorize(predictions[i].astype(np.uint8)), heatmap(entropies[i])]
        rows.append(row)
    return rows


def _figure_to_rgb(figure) -> np.ndarray:
    import matplotlib.pyplot as plt
    figure.canvas.draw()
    rgb = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return rgb


def confusion_matrix_picture(conf: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Row-normalised confusion matrix (ground truth rows) as an RGB picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = conf.sum(1, keepdims=True)
    share = np.divide(conf, rows, out=np.zeros(conf.shape, np.float64), where=rows > 0)
    figure, ax = plt.subplots(figsize=(8, 7), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    figure.tight_layout()
    return _figure_to_rgb(figure)


def iou_bar_picture(series: dict[str, dict[str, float]], title: str) -> np.ndarray:
    """Grouped bars of per-class IoU (in %) for one or more named results."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(next(iter(series.values())))
    figure, ax = plt.subplots(figsize=(11, 4), dpi=100)
    width = 0.8 / len(series)
    for k, (label, ious) in enumerate(series.items()):
        values = [100 * (ious[n] if ious[n] == ious[n] else 0.0) for n in names]
        ax.bar(np.arange(len(names)) + k * width, values, width, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return _figure_to_rgb(figure)


def grouped_bar_picture(series: dict[str, dict[str, float]], title: str, ylabel: str = "mIoU (%)",
                        ylim: float = 100.0) -> np.ndarray:
    """Grouped bars, one series per name (values as fractions, drawn in %; NaN/None as 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys(g for values in series.values() for g in values))
    figure, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(groups) * max(1, len(series)) / 2), 4),
                              dpi=100)
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        heights = [values.get(g) for g in groups]
        heights = [100 * v if v is not None and v == v else 0.0 for v in heights]
        ax.bar(np.arange(len(groups)) + k * width, heights, width, label=label)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, ylim)
    ax.set_title(title)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return _figure_to_rgb(figure)
