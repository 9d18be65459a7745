"""components.evaluation: `evaluate` and the per-group `evaluate_by_group` (one pass, many groups)."""
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from segshift.components.evaluation import evaluate, evaluate_by_group
from segshift.components.models.base import SegOutput


class Pairs(Dataset):
    """Random images and labels (with some ignore pixels), fixed by a seed."""

    def __init__(self, n: int, height: int = 8, width: int = 12, labelled: bool = True, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, height, width, generator=g)
        labels = torch.randint(0, 19, (n, height, width), generator=g)
        labels[torch.rand(n, height, width, generator=g) < 0.1] = 255
        self.labels, self.labelled = labels, labelled

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i] if self.labelled else torch.empty(0)


class Tiny(nn.Module):
    """Logits at half resolution, so predictions are upsampled to the label size."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 19, 3, stride=2, padding=1)

    def forward(self, x):
        return SegOutput(self.conv(x))


GROUPS = ["clear", "night", None, "clear", "fog", "night", "clear"]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_grouped_total_equals_plain_evaluate_and_the_sum_of_groups(batch_size):
    data, model = Pairs(len(GROUPS)), Tiny()
    plain = evaluate(model, data, batch_size, torch.device("cpu"))
    grouped = evaluate_by_group(model, data, GROUPS, batch_size, torch.device("cpu"))
    assert torch.equal(grouped.total.confusion, plain.confusion)
    assert grouped.total.mean_entropy == pytest.approx(plain.mean_entropy, rel=1e-5)
    assert list(grouped.groups) == ["clear", "night", None, "fog"]
    assert torch.equal(sum(e.confusion for e in grouped.groups.values()), grouped.total.confusion)
    assert grouped.counts == {"clear": 3, "night": 2, None: 1, "fog": 1}


def test_each_group_matches_evaluating_its_samples_alone():
    data, model = Pairs(len(GROUPS)), Tiny(seed=3)
    grouped = evaluate_by_group(model, data, GROUPS, 2, torch.device("cpu"))
    for group in ("clear", "night", "fog"):
        subset = torch.utils.data.Subset(data, [i for i, g in enumerate(GROUPS) if g == group])
        alone = evaluate(model, subset, 4, torch.device("cpu"))
        assert torch.equal(grouped.groups[group].confusion, alone.confusion), group
        assert grouped.groups[group].mean_entropy == pytest.approx(alone.mean_entropy, rel=1e-5)
        assert grouped.groups[group].summary()["miou"] == alone.summary()["miou"]


def test_unlabelled_data_gives_entropy_but_an_empty_confusion():
    data = Pairs(4, labelled=False)
    grouped = evaluate_by_group(Tiny(), data, ["a", "b", "a", "b"], 3, torch.device("cpu"))
    assert int(grouped.total.confusion.sum()) == 0
    assert 0.0 < grouped.total.mean_entropy <= 1.0 and 0.0 < grouped.groups["a"].mean_entropy <= 1.0


def test_group_list_must_match_the_dataset():
    with pytest.raises(ValueError, match="3 group names for 7 samples"):
        evaluate_by_group(Tiny(), Pairs(7), ["a"] * 3, 2, torch.device("cpu"))


def test_model_mode_is_restored():
    model = Tiny().train()
    evaluate_by_group(model, Pairs(2), [None, None], 2, torch.device("cpu"))
    assert model.training


# --- scoring at full resolution (ADVENT eval_UDA.py: logits upsampled to the full label) ---------

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from segshift.components import evaluation as evaluation_module  # noqa: E402
from segshift.components.data.formats import resize_label  # noqa: E402

ROAD, POLE = 0, 5


class FullLabelled(Dataset):
    """Prepared (nearest-resized) labels for batching, plus native-resolution labels to score on."""

    def __init__(self, images: torch.Tensor, full: list[np.ndarray | None], prepared_size: tuple[int, int]):
        self.images, self.full = images, full
        width, height = prepared_size
        self.labels = [torch.from_numpy(resize_label(f, prepared_size).astype(np.int64)) if f is not None
                       else torch.zeros(height, width, dtype=torch.int64) for f in full]

    has_full_labels = True

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def full_label(self, i):
        f = self.full[i]
        return torch.empty(0, dtype=torch.int64) if f is None else torch.from_numpy(f.astype(np.int64))


class FixedLogits(nn.Module):
    """The same (19, h, w) logits for every image, whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return SegOutput(self.logits.expand(len(x), -1, -1, -1))


def _pole_label() -> np.ndarray:
    """A 4x8 road scene with a 1-pixel-wide pole in column 3: nearest resizing to 4x2 drops it."""
    label = np.full((4, 8), ROAD, np.uint8)
    label[:, 3] = POLE
    return label


def test_a_thin_pole_visible_only_at_full_resolution_is_scored_there():
    full = _pole_label()
    assert POLE not in resize_label(full, (4, 2))        # the prepared label has lost the pole
    logits = torch.zeros(1, 19, 1, 2)
    logits[:, ROAD] = 1.0                                 # predicts road everywhere
    model = FixedLogits(logits)
    data = FullLabelled(torch.zeros(1, 3, 2, 4), [full], (4, 2))
    conf = evaluate(model, data, 1, torch.device("cpu")).confusion
    expected = torch.zeros(19, 19, dtype=torch.long)
    expected[ROAD, ROAD] = 28                             # 4 rows x 7 road columns
    expected[POLE, ROAD] = 4                              # the pole's 4 pixels, missed
    assert torch.equal(conf, expected)
    summary = evaluate(model, data, 1, torch.device("cpu")).summary()
    assert summary["per_class_iou"]["road"] == pytest.approx(28 / 32) and summary["per_class_iou"]["pole"] == 0
    # today's scoring at the prepared size sees 8 road pixels, all right, and no pole at all
    prepared = Pairs(1)
    prepared.images, prepared.labels = data.images, torch.stack(data.labels)
    today = evaluate(model, prepared, 1, torch.device("cpu")).confusion
    assert int(today[ROAD, ROAD]) == 8 and int(today.sum()) == 8


def test_logits_are_upsampled_bilinearly_with_aligned_corners_before_the_argmax():
    # Low-resolution logits over 3 columns: road | pole | pole. Upsampled to 8 columns with
    # align_corners=True (column X samples x = 2X/7): road wins for X = 0, 1 (x = 0, 0.29), pole from
    # X = 2 (x = 0.57: road 0.43 < pole 0.57). (align_corners=False would give road up to X = 2.)
    logits = torch.zeros(1, 19, 2, 3)
    logits[:, ROAD] = torch.tensor([1.0, 0.0, 0.0])
    logits[:, POLE] = torch.tensor([0.0, 1.0, 1.0])
    full = np.full((4, 8), ROAD, np.uint8)
    full[:, 2] = POLE                                     # the pole: column 2 only
    data = FullLabelled(torch.zeros(1, 3, 2, 4), [full], (4, 2))
    conf = evaluate(FixedLogits(logits), data, 1, torch.device("cpu")).confusion
    expected = torch.zeros(19, 19, dtype=torch.long)
    expected[ROAD, ROAD] = 8                              # columns 0, 1
    expected[ROAD, POLE] = 20                             # columns 3..7, predicted pole
    expected[POLE, POLE] = 4                              # column 2
    assert torch.equal(conf, expected)


def _random_full_data(n: int = 5, seed: int = 0) -> tuple[FullLabelled, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    full = []
    for i in range(n):
        label = rng.integers(0, 19, size=(16, 24)).astype(np.uint8)
        label[rng.random((16, 24)) < 0.1] = 255
        full.append(label)
    images = torch.from_numpy(rng.standard_normal((n, 3, 8, 12)).astype(np.float32))
    return FullLabelled(images, full, (12, 8)), full


def test_full_resolution_confusion_matches_the_reference_computation_for_any_batch_size():
    data, full = _random_full_data()
    model = Tiny(seed=1)
    expected = torch.zeros(19, 19, dtype=torch.long)
    with torch.no_grad():
        for i in range(len(data)):                        # eval_UDA.py, one image at a time
            out = F.interpolate(model(data.images[i:i + 1]).main, size=full[i].shape, mode="bilinear",
                                align_corners=True)
            pred = out[0].argmax(0).numpy().ravel()
            gt = full[i].ravel().astype(np.int64)
            keep = gt != 255
            expected += torch.from_numpy(np.bincount(19 * gt[keep] + pred[keep], minlength=361).reshape(19, 19))
    results = [evaluate(model, data, b, torch.device("cpu")) for b in (1, 2, 16)]
    for result in results:
        assert torch.equal(result.confusion, expected)
        assert result.mean_entropy == pytest.approx(results[0].mean_entropy, rel=1e-6)
    assert int(expected.sum()) == sum(int((f != 255).sum()) for f in full)   # every full-res pixel
    groups = ["a", "b", "a", None, "b"]
    grouped = evaluate_by_group(model, data, groups, 2, torch.device("cpu"))
    assert torch.equal(grouped.total.confusion, expected)
    assert grouped.total.mean_entropy == pytest.approx(results[0].mean_entropy, rel=1e-5)
    alone = evaluate(model, torch.utils.data.Subset(data, [0, 2]), 2, torch.device("cpu"))
    # a Subset has no full labels: it is scored at the prepared size, as before
    assert int(alone.confusion.sum()) == sum(int((data.labels[i] != 255).sum()) for i in (0, 2))


def test_full_resolution_upsamples_one_image_at_a_time(monkeypatch):
    data, _ = _random_full_data(n=6)
    shapes = []
    original = evaluation_module.upsample_to_full

    def recording(logits, size):
        shapes.append(tuple(logits.shape[:1]) + tuple(size))
        return original(logits, size)

    monkeypatch.setattr(evaluation_module, "upsample_to_full", recording)
    evaluate(Tiny(), data, 4, torch.device("cpu"))
    evaluate_by_group(Tiny(), data, [None] * 6, 4, torch.device("cpu"))
    assert shapes == [(1, 16, 24)] * 12                    # never a whole batch at full size


def test_samples_without_a_full_label_are_scored_as_before():
    plain = Pairs(4)
    data = FullLabelled(plain.images, [None] * 4, (12, 8))
    data.labels = list(plain.labels)
    model = Tiny(seed=2)
    for batch_size in (1, 3):
        before = evaluate(model, plain, batch_size, torch.device("cpu"))
        now = evaluate(model, data, batch_size, torch.device("cpu"))
        assert torch.equal(now.confusion, before.confusion)
        assert now.mean_entropy == pytest.approx(before.mean_entropy, rel=1e-6)
