"""LabOR mechanisms: the two-head pixel selector, disagreement, SPL/PPL selection and the annotator."""
import math

import cv2
import numpy as np
import pytest
import torch

from segshift.components.data.labels import IGNORE_INDEX
from segshift.components.methods.labor import (
    Annotator,
    OracleAnnotator,
    TwoHeadSegmenter,
    check_label_budget,
    connected_regions,
    head_discrepancy,
    inconsistency_mask,
    pixel_discrepancy,
    point_based_selection,
    prototype_point_selection,
    segment_based_selection,
)
from segshift.components.models.bisenet import BiSeNet
from segshift.components.models.deeplab import DeepLabV2

# --- label budget -----------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.022, 1, 1e-6, "0.5"])
def test_valid_budgets_pass(share):
    assert check_label_budget(share) == float(share)


@pytest.mark.parametrize("share", [0, -0.1, 1.0001, 2, float("nan"), float("inf"), "lots", None])
def test_a_budget_of_zero_or_above_everything_is_a_config_error(share):
    with pytest.raises(ValueError, match="label budget share"):
        check_label_budget(share)


# --- disagreement -----------------------------------------------------------------------------------


def test_inconsistency_mask_is_the_argmax_disagreement_on_hand_made_logits():
    # 1 image, 3 classes, 2x2 pixels; per pixel: head a argmax, head b argmax
    a = torch.tensor([[[5.0, 0.0], [0.0, 0.0]],     # class 0
                      [[0.0, 5.0], [0.0, 1.0]],     # class 1
                      [[0.0, 0.0], [5.0, 0.0]]])[None]   # class 2 -> a: [[0, 1], [2, 1]]
    b = torch.tensor([[[3.0, 0.0], [0.0, 2.0]],
                      [[1.0, 0.0], [0.0, 0.0]],
                      [[0.0, 4.0], [9.0, 0.0]]])[None]   # b: [[0, 2], [2, 0]]
    mask = inconsistency_mask(a, b)
    assert mask.dtype == torch.bool and mask.shape == (1, 2, 2)
    assert mask.tolist() == [[[False, True], [False, True]]]
    assert torch.equal(inconsistency_mask(a.softmax(1), b.softmax(1)), mask)
    assert not inconsistency_mask(a, a).any()


def test_inconsistency_mask_refuses_mismatched_outputs():
    with pytest.raises(ValueError, match="differ in shape"):
        inconsistency_mask(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 3))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        inconsistency_mask(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2))


def test_discrepancy_is_the_mean_l1_distance_of_the_softmax_maps():
    # two pixels over 3 classes; pixel 0: a = (1, 0, 0), b = (0, 1, 0) -> mean |diff| = 2/3;
    # pixel 1: both (0.5, 0.5, 0) -> 0
    pa = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]).T.reshape(1, 3, 1, 2)
    pb = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]).T.reshape(1, 3, 1, 2)
    per_pixel = pixel_discrepancy(pa, pb)
    assert per_pixel.shape == (1, 1, 2)
    assert per_pixel.flatten().tolist() == pytest.approx([2 / 3, 0.0])
    assert head_discrepancy(pa, pb).item() == pytest.approx(1 / 3)
    assert head_discrepancy(pa, pa).item() == 0.0
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 19, 4, 4, generator=gen).softmax(1), torch.randn(2, 19, 4, 4, generator=gen).softmax(1)
    assert head_discrepancy(x, y).item() == pytest.approx((x - y).abs().mean().item())
    assert 0 <= head_discrepancy(x, y).item() <= 2 / 19


# --- the two-head pixel selector ---------------------------------------------------------------------


def _deeplab():
    torch.manual_seed(0)
    return DeepLabV2(num_classes=5, backbone="resnet18", width=0.125, rates=(1, 2), aux_head=True).eval()


def test_two_heads_without_perturbation_reproduce_the_model_and_leave_it_untouched():
    model = _deeplab()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    selector = TwoHeadSegmenter(model, perturbation=0.0).eval()
    assert selector.head_name == "layer6" and selector.num_classes == 5
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out, reference = selector(x), model(x).main
    assert out.a.shape == reference.shape == (2, 5, 4, 6)
    assert torch.allclose(out.a, reference, atol=1e-6) and torch.allclose(out.b, reference, atol=1e-6)
    # B is a copy: training it must not move A
    with torch.no_grad():
        for p in selector.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.layer6, torch.nn.Module) and model.layer5 is not None
    assert selector.features.layer5 is None                 # the aux head is dropped in B


def test_perturbed_second_head_gives_a_discrepancy_and_parameters_split_cleanly():
    selector = TwoHeadSegmenter(_deeplab(), perturbation=0.05, seed=1).eval()
    with torch.no_grad():
        out = selector(torch.randn(1, 3, 32, 32))
    assert head_discrepancy(out.a.softmax(1), out.b.softmax(1)).item() > 0
    heads = {id(p) for p in selector.classifier_parameters()}
    feats = {id(p) for p in selector.feature_parameters()}
    assert heads.isdisjoint(feats)
    assert heads | feats == {id(p) for p in selector.parameters()}
    # seeded: the same perturbation twice
    other = TwoHeadSegmenter(_deeplab(), perturbation=0.05, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(selector.head_b.parameters(), other.head_b.parameters()))


def test_the_minimax_signs_move_the_discrepancy_the_documented_way():
    torch.manual_seed(0)
    selector = TwoHeadSegmenter(_deeplab(), perturbation=0.5, seed=2).eval()   # eval: fixed BN stats
    x = torch.randn(1, 3, 24, 24)

    def discrepancy():
        out = selector(x)
        return head_discrepancy(out.a.softmax(1), out.b.softmax(1))

    start = discrepancy().item()
    heads = torch.optim.SGD(selector.classifier_parameters(), lr=0.5)
    for _ in range(2):                       # heads: loss = -d (maximise)
        heads.zero_grad()
        (-discrepancy()).backward()
        heads.step()
    widened = discrepancy().item()
    assert widened > start
    feats = torch.optim.SGD(selector.feature_parameters(), lr=0.5)
    for _ in range(2):                       # features: loss = +d (minimise)
        feats.zero_grad()
        discrepancy().backward()
        feats.step()
    assert discrepancy().item() < widened


def test_two_heads_work_on_bisenet_and_refuse_unknown_networks():
    torch.manual_seed(0)
    model = BiSeNet(num_classes=4, backbone="resnet18", width=0.125, aux_head=True).eval()
    selector = TwoHeadSegmenter(model, perturbation=0.0).eval()
    assert selector.head_name == "head" and selector.features.aux16 is None
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(selector(x).a, model(x).main, atol=1e-5)
    with pytest.raises(ValueError, match="classifier attributes"):
        TwoHeadSegmenter(torch.nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="perturbation"):
        TwoHeadSegmenter(model, perturbation=-1)


# --- SPL ----------------------------------------------------------------------------------------------


def test_spl_labels_the_whole_mask_when_it_fits_the_budget():
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:5] = True                          # 6 pixels, budget 10 % = 10
    selected = segment_based_selection(mask, 0.1, np.random.default_rng(0).random((10, 10)))
    assert np.array_equal(selected, mask) and selected is not mask


def test_spl_caps_an_oversized_mask_at_the_budget_keeping_the_most_uncertain_pixels():
    rng = np.random.default_rng(1)
    mask = rng.random((20, 30)) < 0.3
    disc = rng.random((20, 30))
    selected = segment_based_selection(mask, 0.05, disc)
    budget = math.floor(0.05 * 600)
    assert selected.sum() == budget
    assert not (selected & ~mask).any()
    assert disc[selected].min() > disc[mask & ~selected].max()


def test_spl_is_per_image_and_accepts_torch_inputs():
    rng = np.random.default_rng(2)
    mask = np.zeros((2, 10, 10), bool)
    mask[0] = rng.random((10, 10)) < 0.5           # ~50 pixels: capped at 20
    mask[1, :1, :5] = True                         # 5 pixels: kept whole
    disc = torch.rand(2, 10, 10, generator=torch.Generator().manual_seed(0))
    selected = segment_based_selection(torch.from_numpy(mask), 0.2, disc)
    assert selected.shape == (2, 10, 10)
    assert selected[0].sum() == 20 and np.array_equal(selected[1], mask[1])


def test_spl_refuses_bad_arguments():
    mask = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="label budget share = 0"):
        segment_based_selection(mask, 0, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="differ in shape"):
        segment_based_selection(mask, 0.5, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        segment_based_selection(mask, 0.5, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="boolean"):
        segment_based_selection(np.full((4, 4), 2), 0.5, np.zeros((4, 4)))


# --- PPL: one point per region --------------------------------------------------------------------


def _three_regions():
    mask = np.zeros((8, 10), bool)
    mask[0:3, 0:3] = True          # region A, 9 px
    mask[3, 3] = True              # touches A diagonally: same region under 8-connectivity (10 px)
    mask[6:8, 6:10] = True         # region B, 8 px
    mask[0, 8] = True              # region C, 1 px
    disc = np.zeros((8, 10))
    disc[1, 1], disc[3, 3] = 0.5, 0.9   # peak of A is the diagonal pixel
    disc[7, 9] = 0.7                    # peak of B
    return mask, disc


def test_ppl_regions_one_point_per_region_at_its_peak():
    mask, disc = _three_regions()
    assert connected_regions(mask)[0] == 3
    points = point_based_selection(mask, disc, points_per_image=40)
    assert points.dtype == bool and points.shape == mask.shape
    assert sorted(map(tuple, np.argwhere(points))) == [(0, 8), (3, 3), (7, 9)]


def test_ppl_regions_with_fewer_points_than_regions_keeps_the_largest_regions():
    mask, disc = _three_regions()
    assert sorted(map(tuple, np.argwhere(point_based_selection(mask, disc, 2)))) == [(3, 3), (7, 9)]
    assert sorted(map(tuple, np.argwhere(point_based_selection(mask, disc, 1)))) == [(3, 3)]


@pytest.mark.parametrize("seed", range(5))
def test_ppl_regions_property_one_point_in_each_of_the_chosen_components(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((2, 24, 32)) < 0.15
    disc = rng.random((2, 24, 32))
    for k in (1, 5, 1000):
        points = point_based_selection(mask, disc, k)
        for i in range(2):
            count, regions = cv2.connectedComponents(mask[i].astype(np.uint8), connectivity=8)
            hit = regions[points[i]]
            assert points[i].sum() == min(count - 1, k)
            assert (hit > 0).all() and len(set(hit.tolist())) == len(hit)   # distinct components
            for r, (y, x) in zip(hit, np.argwhere(points[i])):
                assert disc[i, y, x] == disc[i][regions == r].max()


def test_ppl_regions_on_an_empty_mask_and_bad_arguments():
    assert not point_based_selection(np.zeros((5, 5), bool), np.zeros((5, 5)), 3).any()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="points_per_image"):
            point_based_selection(np.ones((5, 5), bool), np.zeros((5, 5)), bad)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\)"):
        point_based_selection(np.ones(5, bool), np.zeros(5), 3)


# --- PPL: the paper's prototypes --------------------------------------------------------------------


def test_prototype_points_are_the_pixels_nearest_their_class_prototype():
    # 1 x 5 image, 3 classes; pixels 0-2 predicted class 0, 3-4 class 1; pixel 4 is not uncertain
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.5, 0.2, 0.3],
                      [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]]).T.reshape(3, 1, 5)
    mask = np.array([[True, True, True, True, False]])
    # class-0 prototype = mean of pixels 0..2 = (0.667, 0.183, 0.15): nearest is pixel 1
    assert np.argwhere(prototype_point_selection(mask, probs, 1)).tolist() == [[0, 1]]
    # two points: round-robin -> class 0's nearest (pixel 1) and class 1's only uncertain pixel (3)
    assert np.argwhere(prototype_point_selection(mask, probs, 2)).tolist() == [[0, 1], [0, 3]]
    # third point: class 0's second nearest, pixel 2 (distance 0.23 vs pixel 0's 0.30)
    assert np.argwhere(prototype_point_selection(mask, probs, 3)).tolist() == [[0, 1], [0, 2], [0, 3]]
    assert prototype_point_selection(mask, probs, 40).sum() == 4           # never outside the mask


def test_prototype_points_batch_and_shape_errors():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=(2, 12, 12)).transpose(0, 3, 1, 2)    # (2, 5, 12, 12)
    mask = rng.random((2, 12, 12)) < 0.4
    points = prototype_point_selection(mask, torch.from_numpy(probs), 7)
    assert points.shape == (2, 12, 12) and (points.sum((1, 2)) == 7).all()
    assert not (points & ~mask).any()
    with pytest.raises(ValueError, match="does not match"):
        prototype_point_selection(mask, probs[0], 7)


# --- the annotator --------------------------------------------------------------------------------------


def _truth(rng, n=4, shape=(16, 24)):
    return {f"img{i}": rng.integers(0, 19, shape).astype(np.uint8) for i in range(n)}


@pytest.mark.parametrize("seed", range(5))
def test_the_oracle_reveals_ground_truth_exactly_on_the_asked_pixels(seed):
    rng = np.random.default_rng(seed)
    truth = _truth(rng)
    truth["img0"][0, :4] = IGNORE_INDEX            # void in the ground truth stays void
    oracle = OracleAnnotator(truth)
    ids = ["img2", "img0", "img3"]
    masks = [rng.random((16, 24)) < rng.random() for _ in ids]
    labels = oracle.reveal(ids, masks)
    assert len(labels) == 3
    for sample_id, mask, label in zip(ids, masks, labels):
        assert label.shape == mask.shape and label.dtype == truth[sample_id].dtype
        assert np.array_equal(label[mask], truth[sample_id][mask])
        assert (label[~mask] == IGNORE_INDEX).all()                 # nothing that was not asked for
        assert np.array_equal(label != IGNORE_INDEX, mask & (truth[sample_id] != IGNORE_INDEX))


def test_the_oracle_keeps_exact_books_per_stage():
    rng = np.random.default_rng(0)
    truth = _truth(rng, n=3, shape=(10, 10))         # 300 target pixels
    oracle = OracleAnnotator(truth)
    assert isinstance(oracle, Annotator)
    a = np.zeros((10, 10), bool)
    a[0:2, 0:5] = True                               # 10 px, 1 region
    b = np.zeros((10, 10), bool)
    b[5, 5] = b[8, 1] = b[0, 9] = True               # 3 points, 3 regions
    oracle.start_stage("stage1")
    oracle.reveal(["img0", "img1"], [a, b])
    oracle.reveal(["img0"], [a])                     # asked again: counted, but not new
    oracle.start_stage("stage2")
    c = a.copy()
    c[2, 0:5] = True                                 # 15 px, 5 of them new
    oracle.reveal(["img0"], [c.astype(np.uint8)])    # 0/1 masks are accepted
    assert oracle.ledger == [
        {"stage": "stage1", "queries": 2, "images": 2, "pixels": 23, "new_pixels": 13,
         "share": 23 / 300, "regions": 5},
        {"stage": "stage2", "queries": 1, "images": 1, "pixels": 15, "new_pixels": 5,
         "share": 15 / 300, "regions": 1},
    ]
    assert oracle.revealed_pixels == 18 and oracle.revealed_share == pytest.approx(18 / 300)
    oracle.ledger[0]["pixels"] = 0                   # a copy
    assert oracle.ledger[0]["pixels"] == 23


def test_reveals_without_a_stage_go_to_a_default_one_and_stage_names_are_unique():
    oracle = OracleAnnotator({"x": np.zeros((2, 2), np.uint8)})
    oracle.reveal(["x"], [np.eye(2, dtype=bool)])
    assert oracle.ledger[0]["stage"] == "default" and oracle.ledger[0]["regions"] == 1
    with pytest.raises(ValueError, match="already exists"):
        oracle.start_stage("default")


def test_bad_requests_are_refused_before_anything_is_revealed_or_counted():
    rng = np.random.default_rng(0)
    oracle = OracleAnnotator(_truth(rng, n=2, shape=(4, 4)))
    oracle.start_stage("s")
    ok = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="no ground truth for sample 'nope'"):
        oracle.reveal(["img0", "nope"], [ok, ok])
    with pytest.raises(ValueError, match="mask of 'img1' is"):
        oracle.reveal(["img0", "img1"], [ok, np.ones((4, 5), bool)])
    with pytest.raises(ValueError, match="boolean"):
        oracle.reveal(["img0"], [np.full((4, 4), 3)])
    with pytest.raises(ValueError, match="2 sample ids but 1 masks"):
        oracle.reveal(["img0", "img1"], [ok])
    assert oracle.ledger == [{"stage": "s", "queries": 0, "images": 0, "pixels": 0, "new_pixels": 0,
                              "share": 0.0, "regions": 0}]
    assert oracle.revealed_pixels == 0
    with pytest.raises(ValueError, match="at least one target pixel"):
        OracleAnnotator({})


def test_a_human_tool_satisfies_the_protocol_by_shape_alone():
    class Tool:
        def start_stage(self, name):
            pass

        def reveal(self, sample_ids, masks):
            return [np.full(m.shape, IGNORE_INDEX, np.uint8) for m in masks]

    assert isinstance(Tool(), Annotator)
    assert not isinstance(object(), Annotator)


# --- model A: source + revealed pixels, adversarial loss kept (the paper's Loss 1-3) ---------------

def _model_a(tmp_path, adversarial=True, **overrides):
    from segshift.components.config import load_params
    from segshift.components.methods.labor import AnnotatedTargetTraining
    from segshift.components.models.factory import build_model
    from tests.conftest import write_params
    params = load_params(write_params(tmp_path), {"model.width": 0.125, "inter.method": "labor", **overrides})
    torch.manual_seed(0)
    return params, AnnotatedTargetTraining(build_model(params.model), params.inter, adversarial=adversarial)


def _model_a_step(method, target_labels):
    torch.manual_seed(1)
    source = (torch.randn(2, 3, 32, 64), torch.randint(0, 19, (2, 32, 64)))
    batch = {"labelled": source, "annotated": (torch.randn(2, 3, 32, 64), target_labels)}
    calls = []

    def backward(loss):
        calls.append(loss.detach())
        loss.backward()
    return method.training_step(batch, 0, backward), calls


def test_model_a_step_keeps_adaptsegnets_adversarial_loss_while_learning_revealed_pixels(tmp_path):
    params, method = _model_a(tmp_path)
    assert {"d_main", "d_aux"} <= set(method.modules) and {"d_main", "d_aux"} <= set(method.optimizers)
    sparse = torch.full((2, 32, 64), IGNORE_INDEX, dtype=torch.long)
    sparse[:, 3, 5] = 13
    logs, calls = _model_a_step(method, sparse)
    w_main, w_aux = params.inter.adv_weight_main, params.inter.adv_weight_aux
    assert w_main > 0 and {"adv_main", "adv_aux", "d_main", "d_aux", "target"} <= set(logs)
    seg = logs["seg_main"] + params.inter.aux_weight * logs["seg_aux0"]
    assert logs["loss"] == pytest.approx((seg + logs["target"] + w_main * logs["adv_main"]
                                          + w_aux * logs["adv_aux"]).item(), rel=1e-6)
    # the adversarial term is the generator's side of AdaptSegNet: BCE of the discriminator's
    # verdict on the target softmax maps against the source label
    assert logs["adv_main"] > 0
    # the discriminators learn (their own step), the segmenter gets gradients
    assert all(p.grad is not None for p in method.modules["d_main"].parameters())
    assert all(p.grad is not None for p in method.segmenter.parameters() if p.requires_grad)
    assert len(calls) == 2 + 2 * 2                        # source, target (+adv), real/fake per level


def test_model_a_adversarial_alone_adapts_when_nothing_is_revealed_and_can_be_switched_off(tmp_path):
    blank = torch.full((2, 32, 64), IGNORE_INDEX, dtype=torch.long)
    params, method = _model_a(tmp_path)
    logs, _ = _model_a_step(method, blank)
    assert logs["target"] == 0 and logs["adv_main"] > 0   # the warm-up round: AdaptSegNet itself
    # the earlier model A: no discriminator, source + revealed pixels only
    _, plain = _model_a(tmp_path, adversarial=False)
    assert not any(name.startswith("d_") for name in plain.modules)
    sparse = blank.clone()
    sparse[:, 3, 5] = 13
    logs, calls = _model_a_step(plain, sparse)
    assert not any(name.startswith("adv") for name in logs) and len(calls) == 2
    assert logs["loss"] == pytest.approx((logs["seg_main"] + params.inter.aux_weight * logs["seg_aux0"]
                                          + logs["target"]).item(), rel=1e-6)
    # zero stage weights switch it off as well
    (tmp_path / "zero").mkdir()
    _, zero = _model_a(tmp_path / "zero", **{"inter.adv_weight_main": 0.0, "inter.adv_weight_aux": 0.0})
    assert not any(name.startswith("d_") for name in zero.modules)


def test_budgets_split_over_stages_as_the_paper_counts_them():
    from segshift.components.methods.labor import points_per_stage, spl_stage_share
    assert points_per_stage(40, 3) == [14, 13, 13] and sum(points_per_stage(40, 7)) == 40
    assert points_per_stage(2, 3) == [1, 1, 0]
    pixels, total, asked = 100 * 200, 0.022, 0
    allowance = math.floor(total * pixels + 1e-9)
    for left in (3, 2, 1):                                # masks that always exceed the cap
        share = spl_stage_share(total, pixels, asked, left)
        asked += math.floor(share * pixels + 1e-9)
    assert asked == allowance
    assert spl_stage_share(total, pixels, allowance, 1) == 0.0
    # a small mask in stage 1 leaves its unused allowance to the later stages
    assert spl_stage_share(total, pixels, 10, 2) == pytest.approx(math.ceil((allowance - 10) / 2) / pixels)
    with pytest.raises(ValueError):
        points_per_stage(0, 3)
