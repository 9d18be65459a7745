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
