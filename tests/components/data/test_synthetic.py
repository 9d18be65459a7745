"""The built-in generator: determinism, class coverage, the domain gap and graded target conditions."""
import numpy as np
import pytest

from segshift.components.data import synthetic as S
from segshift.components.data.labels import IGNORE_INDEX

H, W = 128, 256


def render(domain: str, index: int, condition: str = "clear", seed: int = 0):
    style = S.source_style() if domain == "source" else S.target_style()
    return S.render_sample(style, H, W, condition, S.sample_rng(seed, domain, "train", index))


@pytest.fixture(scope="module")
def scenes():
    return {d: [render(d, i) for i in range(40)] for d in ("source", "target")}


def test_same_seed_same_pixels_other_seed_other_pixels():
    a_img, a_lab = render("target", 3, "rain")
    b_img, b_lab = render("target", 3, "rain")
    c_img, _ = render("target", 3, "rain", seed=1)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (H, W, 3) and a_img.dtype == np.uint8
    assert a_lab.shape == (H, W) and a_lab.dtype == np.uint8


def test_label_values_are_train_ids_or_ignore(scenes):
    for domain in scenes:
        values = np.unique(np.concatenate([lab.ravel() for _, lab in scenes[domain]]))
        assert set(values.tolist()) <= set(range(19)) | {IGNORE_INDEX}


@pytest.mark.parametrize("domain", ["source", "target"])
def test_at_least_twelve_classes_including_thin_and_rare(scenes, domain):
    present = set()
    for _, lab in scenes[domain]:
        present |= set(np.unique(lab).tolist())
    classes = present - {IGNORE_INDEX}
    assert len(classes) >= 12, sorted(classes)
    thin, rare = {S.POLE, S.LIGHT, S.SIGN}, {S.RIDER, S.BUS, S.MOTORCYCLE}
    assert thin <= classes and rare <= classes


def test_target_has_ignore_hood_source_does_not(scenes):
    bottom = lambda d: np.mean([(lab[-4:] == IGNORE_INDEX).mean() for _, lab in scenes[d]])
    assert bottom("target") > 0.9
    assert bottom("source") < 0.1


def _class_colour(scenes, cls):
    pixels = [img[lab == cls] for img, lab in scenes if (lab == cls).any()]
    return np.concatenate(pixels).astype(np.float64).mean(axis=0)


@pytest.mark.parametrize("cls", [S.ROAD, S.SIDEWALK, S.VEGETATION, S.SKY, S.PERSON])
def test_class_colours_shift_between_domains(scenes, cls):
    gap = np.linalg.norm(_class_colour(scenes["source"], cls) - _class_colour(scenes["target"], cls))
    assert gap > 12.0


def test_class_colour_shift_is_not_one_global_transform(scenes):
    """Per-image whitening removes a global colour transform; class-specific shifts survive it."""
    def whitened_means(domain):
        means = {}
        for cls in (S.ROAD, S.SIDEWALK, S.VEGETATION, S.TERRAIN):
            vals = []
            for img, lab in scenes[domain]:
                x = img.astype(np.float64)
                x = (x - x.mean((0, 1))) / (x.std((0, 1)) + 1e-6)
                if (lab == cls).any():
                    vals.append(x[lab == cls])
            means[cls] = np.concatenate(vals).mean(0)
        return means
    src, tgt = whitened_means("source"), whitened_means("target")
    distances = [np.linalg.norm(src[c] - tgt[c]) for c in src]
    assert max(distances) > 0.5


def test_layout_statistics_differ(scenes):
    road_share = {d: np.mean([(lab == S.ROAD).mean() for _, lab in scenes[d]]) for d in scenes}
    person_share = {d: np.mean([(lab == S.PERSON).mean() for _, lab in scenes[d]]) for d in scenes}
    assert road_share["source"] > 1.4 * road_share["target"]
    assert person_share["target"] > 1.5 * person_share["source"]


def test_conditions_are_graded_on_the_same_scene():
    clear, label = render("target", 7, "clear")
    night, _ = render("target", 7, "night")
    fog, _ = render("target", 7, "fog")
    overcast, _ = render("target", 7, "overcast")
    scene = label != IGNORE_INDEX   # leave out the ego hood, which fog does not reach
    assert night.mean() < 0.4 * clear.mean()
    assert fog[scene].std() < 0.75 * clear[scene].std()
    saturation = lambda img: (img.max(2).astype(int) - img.min(2)).mean()
    assert saturation(overcast) < saturation(clear)


def test_condition_weights_are_respected():
    rng = np.random.default_rng(0)
    picks = [S.choose_condition({"clear": 3.0, "night": 1.0, "fog": 0.0}, rng) for _ in range(2000)]
    assert "fog" not in picks
    assert 0.7 < picks.count("clear") / len(picks) < 0.8


def test_unknown_condition_is_an_error():
    with pytest.raises(ValueError, match="unknown condition 'snow'"):
        render("target", 0, "snow")
