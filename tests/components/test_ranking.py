"""IntraDA ranking helpers: scores, the rare-class normaliser, the lambda split, pseudo-labels,
AUROC, and the ranking table's round trip and consistency checks."""
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from segshift.components.data.labels import IGNORE_INDEX, NUM_CLASSES, RARE_CLASSES
from segshift.components.data.manifest import SampleRecord, write_manifest
from segshift.components.io import write_png
from segshift.components.models.base import SegOutput
from segshift.components.ranking import (RANKING_NAME, RankingError, auroc, build_ranking_table,
                                         check_ranking_matches, file_sha256, image_scores,
                                         pseudo_label, pseudo_label_paths, ranked_splits,
                                         rare_class_normaliser, rare_classes_present, ranking_metadata,
                                         read_ranking, score_images, split_by_lambda, split_counts,
                                         write_ranking)


def one_hot(labels: np.ndarray, classes: int = NUM_CLASSES) -> torch.Tensor:
    """(N, H, W) ids -> (N, C, H, W) one-hot probabilities."""
    return torch.nn.functional.one_hot(torch.as_tensor(labels).long(), classes).permute(0, 3, 1, 2).float()


# -- scores ---------------------------------------------------------------------------------------

def test_image_scores_are_the_mean_normalised_entropy():
    uniform = torch.full((1, NUM_CLASSES, 4, 6), 1 / NUM_CLASSES)
    certain = one_hot(np.zeros((1, 4, 6), np.int64))
    half = certain.clone()
    half[:, :, :2] = 1 / NUM_CLASSES                 # top half uniform, bottom half certain
    scores = image_scores(torch.cat([uniform, certain, half]))
    assert scores.dtype == np.float64 and scores.shape == (3,)
    assert scores == pytest.approx([1.0, 0.0, 0.5], abs=1e-6)
    two = torch.zeros(1, NUM_CLASSES, 1, 1)
    two[0, :2] = 0.5                                  # two classes at 1/2: log 2 / log 19
    assert image_scores(two.numpy())[0] == pytest.approx(math.log(2) / math.log(NUM_CLASSES))


def test_rare_class_normaliser_follows_the_reference_formula():
    common = np.array([[0, 1, 2], [8, 10, 13]])
    assert rare_classes_present(common) == 0
    assert rare_class_normaliser(common) == pytest.approx(1.5)
    all_rare = np.array(RARE_CLASSES).reshape(1, -1)
    assert rare_class_normaliser(all_rare) == pytest.approx(0.5)
    # three rare classes (wall, pole, bus), each repeated, plus commons and ignore: (11 - 3) / 11 + 0.5
    pred = np.array([[3, 3, 5, 15], [0, 1, 255, 15]], np.uint8)
    assert rare_classes_present(pred) == 3
    assert rare_class_normaliser(pred) == pytest.approx(8 / 11 + 0.5)


# -- the split ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, lam, easy", [(10, 0.67, 6), (10, 0.5, 5), (3, 0.67, 2), (100, 0.29, 29),
                                          (100, 0.67, 67), (10, 0.99, 9), (7, 0.2, 1)])
def test_split_counts_floor_lambda_n(n, lam, easy):
    assert split_counts(n, lam) == (easy, n - easy)


@pytest.mark.parametrize("n, lam, counts", [(10, 0.05, "0 easy and 10 hard"), (1, 0.67, "0 easy and 1 hard"),
                                            (4, 0.2, "0 easy and 4 hard")])
def test_an_empty_split_is_refused_with_lambda_n_and_counts(n, lam, counts):
    with pytest.raises(RankingError) as error:
        split_by_lambda(np.linspace(0, 1, n), lam)
    message = str(error.value)
    assert f"rank.lambda = {lam}" in message and f"N = {n}" in message and counts in message


def test_split_by_lambda_sorts_ascending_and_keeps_tie_order():
    scores = [0.5, 0.1, 0.9, 0.1, 0.3]
    easy, hard = split_by_lambda(scores, 0.6)
    assert easy.tolist() == [1, 3, 4] and hard.tolist() == [0, 2]     # tie 0.1: input order kept
    with pytest.raises(RankingError, match="NaN"):
        split_by_lambda([0.1, float("nan"), 0.2], 0.5)


# -- pseudo-labels --------------------------------------------------------------------------------

def test_pseudo_label_is_the_argmax_and_threshold_ignores_exactly_the_unsure_pixels():
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.dirichlet(np.full(NUM_CLASSES, 0.3), size=(2, 5, 7))).permute(0, 3, 1, 2)
    label = pseudo_label(probs, None)
    assert label.dtype == np.uint8 and label.shape == (2, 5, 7)
    assert (label == probs.argmax(1).numpy()).all()
    threshold = 0.5
    thresholded = pseudo_label(probs, threshold)
    confidence = probs.max(1).values.numpy()
    unsure, sure = confidence < threshold - 1 / 255, confidence >= threshold   # 1/255 resolution
    assert 0 < unsure.sum() < unsure.size
    assert (thresholded[unsure] == IGNORE_INDEX).all()
    assert (thresholded[sure] == label[sure]).all()
    # exactly at the threshold is kept; a single (C, H, W) image works too
    at = torch.zeros(NUM_CLASSES, 1, 1)
    at[4] = 0.5
    at[7] = 0.5
    assert pseudo_label(at, 0.5).tolist() == [[4]]


# -- AUROC ----------------------------------------------------------------------------------------

def test_auroc_known_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auroc([1.0, 1.0, 2.0], [True, False, True]) == pytest.approx(0.75)   # one tie = 1/2
    assert math.isnan(auroc([0.1, 0.2], [True, True]))


# -- batch inference ------------------------------------------------------------------------------

class FixedLogits(torch.nn.Module):
    """Logits at half resolution: image 0 all class 0 (common), image 1 shows rare classes."""

    def forward(self, images):
        n, _, h, w = images.shape
        logits = torch.zeros(n, NUM_CLASSES, h // 2, w // 2)
        logits[0, 0] = 10.0
        logits[1, 3, :, : w // 4] = 10.0
        logits[1, 12, :, w // 4:] = 10.0
        return SegOutput(logits)


def test_score_images_gives_scores_normalisers_histograms_and_pseudo_labels():
    scores = score_images(FixedLogits(), torch.zeros(2, 3, 8, 8), keep_entropy=True)
    assert scores.labels.shape == (2, 8, 8) and scores.entropy.shape == (2, 8, 8)
    assert scores.labels.dtype == np.uint8 and scores.confidence_q.dtype == np.uint8
    assert scores.rare_present.tolist() == [0, 2]
    assert scores.normaliser == pytest.approx([1.5, 9 / 11 + 0.5])
    assert scores.class_histogram.dtype == np.float32 and scores.class_histogram.shape == (2, NUM_CLASSES)
    assert scores.class_histogram.sum(1) == pytest.approx([1.0, 1.0])
    assert scores.class_histogram[0, 0] == 1.0
    assert scores.class_histogram[1, 3] + scores.class_histogram[1, 12] == pytest.approx(1.0)
    assert (scores.score < 0.05).all() and (scores.mean_confidence > 0.95).all()
    assert scores.score[0] < scores.score[1]          # the boundary between 3 and 12 is unsure
    histograms = scores.confidence_histograms()
    assert histograms.shape == (2, NUM_CLASSES, 256) and histograms.sum(axis=(1, 2)).tolist() == [64, 64]
    assert histograms[0, 0].sum() == 64 and histograms[0, 0, 250:].sum() == 64   # all sure road


# -- the table ------------------------------------------------------------------------------------

def records(n: int, normalisers=None) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"sample_id": f"t_{i:03d}", "score": float(s), "normaliser": 1.0 if normalisers is None
             else normalisers[i], "mean_confidence": 0.5, "condition": "fog" if i % 2 else None,
             "class_histogram": np.full(NUM_CLASSES, 1 / NUM_CLASSES, np.float32)}
            for i, s in enumerate(rng.random(n))]


def make_table(recs, lam=0.6, normalise=False):
    return build_ranking_table(list(reversed(recs)), lam, normalise, 0.9, "a" * 64, "b" * 64)


def test_ranking_table_has_the_schema_rank_order_and_metadata(tmp_path):
    recs = records(10)
    table = make_table(recs)
    assert table.num_rows == 10 and table["rank"].to_pylist() == list(range(10))
    assert table.schema.field("class_histogram").type == pa.list_(pa.float32(), NUM_CLASSES)
    assert table.schema.field("rank").type == pa.int32()
    scores = table["score"].to_pylist()
    assert scores == sorted(scores) and table["score_normalised"].to_pylist() == scores
    assert table["split"].to_pylist() == ["easy"] * 6 + ["hard"] * 4
    assert table["pseudo_label"].to_pylist()[:6] == [f"pseudo_labels/{s}.png"
                                                     for s in table["sample_id"].to_pylist()[:6]]
    assert table["pseudo_label"].to_pylist()[6:] == [None] * 4
    write_ranking(table, tmp_path)
    again = read_ranking(tmp_path)
    assert again.equals(table)
    assert ranking_metadata(again) == {"manifest_sha256": "a" * 64, "model_sha256": "b" * 64,
                                       "lambda": 0.6, "entropy_normalisation": False,
                                       "confidence_threshold": 0.9, "class_balanced_share": None}
    easy, hard = ranked_splits(again)
    assert easy + hard == again["sample_id"].to_pylist() and len(easy) == 6
    paths = pseudo_label_paths(tmp_path, again)
    assert list(paths) == easy and paths[easy[0]] == tmp_path / "pseudo_labels" / f"{easy[0]}.png"


def test_normalisation_ranks_by_score_times_normaliser():
    recs = [{**r, "score": 0.5 + 0.01 * i} for i, r in enumerate(records(4))]
    normalisers = [1.5, 1.5, 1.5, 0.5]                    # the last image shows all rare classes
    recs = [{**r, "normaliser": k} for r, k in zip(recs, normalisers)]
    table = make_table(recs, lam=0.5, normalise=True)
    assert table["sample_id"].to_pylist()[0] == "t_003"
    assert table["score_normalised"].to_pylist()[0] == pytest.approx(0.53 * 0.5)
    assert table["score"].to_pylist()[0] == pytest.approx(0.53)
    plain = make_table(recs, lam=0.5, normalise=False)
    assert plain["sample_id"].to_pylist()[-1] == "t_003"


def test_read_ranking_names_the_path_when_missing_corrupt_or_foreign(tmp_path):
    with pytest.raises(RankingError, match=f"{tmp_path / RANKING_NAME}: no ranking; run `segshift rank`"):
        read_ranking(tmp_path)
    (tmp_path / RANKING_NAME).write_bytes(b"not parquet")
    with pytest.raises(RankingError, match="not a readable Parquet file"):
        read_ranking(tmp_path)
    pq.write_table(pa.table({"sample_id": ["a"], "score": [1]}), tmp_path / RANKING_NAME)
    with pytest.raises(RankingError, match="column 'score' is int64, expected double; .*missing column 'rank'"):
        read_ranking(tmp_path)


def prepared_target(directory: Path, n: int) -> Path:
    target = directory / "target"
    target.mkdir(parents=True, exist_ok=True)
    rows = [SampleRecord(f"t_{i:03d}", "builtin", "target", "train", f"images/train/t_{i:03d}.png",
                         None, 8, 8) for i in range(n)]
    rows.append(SampleRecord("v_000", "builtin", "target", "val", "images/val/v_000.png", None, 8, 8))
    write_manifest(rows, target)
    return target


def test_check_ranking_matches_reports_manifest_ids_and_missing_pseudo_labels(tmp_path):
    target = prepared_target(tmp_path / "prepared", 10)
    out = tmp_path / "ranking"
    table = build_ranking_table(records(10), 0.6, False, None, file_sha256(target / "manifest.parquet"), "m")
    write_ranking(table, out)
    for path in pseudo_label_paths(out, table).values():
        write_png(path, np.zeros((8, 8), np.uint8))
    check_ranking_matches(out, target)                    # consistent: no error

    missing = next(iter(pseudo_label_paths(out, table).values()))
    missing.unlink()
    with pytest.raises(RankingError, match=r"1 easy image\(s\) have no pseudo-label file"):
        check_ranking_matches(out, target)
    write_png(missing, np.zeros((8, 8), np.uint8))

    other = prepared_target(tmp_path / "other", 12)       # re-prepared with more images
    with pytest.raises(RankingError) as error:
        check_ranking_matches(out, other)
    message = str(error.value)
    assert "different prepared target" in message
    assert "2 of 12 target train image(s) are not ranked (e.g. t_010, t_011)" in message
    assert "re-run `segshift rank`" in message
    fewer = prepared_target(tmp_path / "fewer", 8)
    with pytest.raises(RankingError, match=r"2 ranked image\(s\) are not in target train"):
        check_ranking_matches(out, fewer)


# -- against the reference (feipanir/IntraDA, formerly feipan664, entropyrk/entropy.py at 01de135) ---

class GivenLogits(torch.nn.Module):
    """Returns fixed per-image logits at the image size (so no upsampling is involved)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return SegOutput(self.logits[: images.shape[0]])


def _intrada_split(logits: torch.Tensor, names: list[str], lambda1: float, normalize: bool):
    """entropy.py `main` + `cluster_subdomain`, as written there (one image per batch)."""
    rare_class = [3, 4, 5, 6, 7, 9, 12, 14, 15, 16, 17]
    entropy_list = []
    for name, pred in zip(names, logits):
        pred = pred[None]
        if normalize:
            present = set(np.unique(pred.argmax(1).numpy()).tolist()).intersection(rare_class)
            normalizor = (11 - len(present)) / 11.0 + 0.5
        else:
            normalizor = 1
        prob = pred.softmax(1)
        entropy = -torch.mul(prob, torch.log2(prob + 1e-30)) / np.log2(prob.shape[1])
        entropy_list.append((name, entropy.mean().item() * normalizor))
    entropy_rank = [item[0] for item in sorted(entropy_list, key=lambda img: img[1])]
    cut = int(len(entropy_rank) * lambda1)
    return entropy_rank[:cut], entropy_rank[cut:], [np.argmax(p.numpy(), axis=0) for p in logits]


@pytest.mark.parametrize("normalize", [False, True])
def test_ranking_split_and_pseudo_labels_are_intradas(normalize):
    torch.manual_seed(5)
    n, h, w = 12, 6, 8
    logits = torch.randn(n, NUM_CLASSES, h, w) * torch.linspace(0.5, 6, n).view(n, 1, 1, 1)
    for i in range(0, n, 3):                      # some images show rare classes, some none
        logits[i, list(RARE_CLASSES)[: i % 7]] -= 50
    names = [f"t_{i:03d}" for i in range(n)]
    easy_ref, hard_ref, labels_ref = _intrada_split(logits, names, 0.67, normalize)

    scores = score_images(GivenLogits(logits), torch.zeros(n, 3, h, w))
    recs = [{"sample_id": s, "score": float(scores.score[i]), "normaliser": float(scores.normaliser[i]),
             "mean_confidence": float(scores.mean_confidence[i]), "condition": None,
             "class_histogram": scores.class_histogram[i]} for i, s in enumerate(names)]
    table = build_ranking_table(recs, 0.67, normalize, None, "a" * 64, "b" * 64)
    easy, hard = ranked_splits(table)
    assert (easy, hard) == (easy_ref, hard_ref)
    for i in range(n):                            # pseudo-label: the plain argmax (no selection)
        assert np.array_equal(scores.labels[i], labels_ref[i])
