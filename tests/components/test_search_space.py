import pytest
import yaml

from segshift.components.config import ConfigError, load_params
from segshift.components.search_space import as_overlay, check_search_space, tune_space, with_values
from tests.conftest import write_params


def params_with_space(tmp_path, space):
    return load_params(write_params(tmp_path, {"sweep.space": space}))


def test_the_default_space_is_valid_and_becomes_tune_distributions(tiny_params):
    params = load_params(tiny_params)
    check_search_space(params)
    space = tune_space(params.sweep.space)
    assert set(space) == set(params.sweep.space)
    assert 0.3 <= space["rank.lambda"].sample() <= 0.8
    assert space["rank.entropy_normalisation"].sample() in (False, True)
    lr = params.sweep.space["intra.optimizer.lr"]
    assert all(lr.low <= space["intra.optimizer.lr"].sample() <= lr.high for _ in range(20))


def test_an_int_range_includes_its_upper_end(tmp_path):
    params = params_with_space(tmp_path, {"intra.batch_size": {"type": "int", "low": 1, "high": 2}})
    check_search_space(params)
    assert {tune_space(params.sweep.space)["intra.batch_size"].sample() for _ in range(50)} == {1, 2}


@pytest.mark.parametrize("space, message", [
    ({"rank.lambda": {"type": "uniform", "low": 0.3, "high": 1.2}},
     "sweep.space['rank.lambda']: high = 1.2 is outside what rank.lambda accepts (rank.lambda: Input should be less than 1 (got 1.2))"),
    ({"intra.optimizer.lr": {"type": "loguniform", "low": -1, "high": 0.1}}, "needs low > 0"),
    ({"rank.confidence_threshold": {"type": "choice", "values": [0.5, 1.5]}}, "value = 1.5 is outside what rank.confidence_threshold accepts"),
    ({"model.width": {"type": "uniform", "low": 0.1, "high": 0.5}}, "only rank.*, intra.* keys can be searched"),
    ({"intra.iterations": {"type": "int", "low": 10, "high": 20}}, "intra.iterations is fixed by the sweep"),
    ({"rank.lamda": {"type": "uniform", "low": 0.3, "high": 0.5}}, "sweep.space['rank.lamda']: unknown key 'rank.lamda'; allowed in rank: batch_size"),
    ({"intra.method": {"type": "choice", "values": ["advent", "cycada"]}}, "value = 'cycada' is outside"),
])
def test_bad_dimensions_are_named_with_the_value_and_the_rule(tmp_path, space, message):
    try:
        params = params_with_space(tmp_path, space)
    except ConfigError as exc:            # malformed dimensions fail when params.yaml is read
        assert message in str(exc)
        return
    with pytest.raises(ConfigError) as info:
        check_search_space(params)
    assert message in str(info.value)


def test_an_empty_space_is_refused_when_params_are_read(tmp_path):
    with pytest.raises(ConfigError, match="sweep.space"):
        params_with_space(tmp_path, {})


def test_a_range_with_low_above_high_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="low = 0.8 must be below high = 0.3"):
        params_with_space(tmp_path, {"rank.lambda": {"type": "uniform", "low": 0.8, "high": 0.3}})


def test_best_values_become_a_nested_overlay_that_validates(tiny_params):
    params = load_params(tiny_params)
    values = {"rank.lambda": 0.41, "intra.optimizer.lr": 1e-4, "rank.class_balanced_share": None}
    overlay = as_overlay(values)
    assert overlay == {"intra": {"optimizer": {"lr": 1e-4}},
                       "rank": {"class_balanced_share": None, "lambda": 0.41}}
    assert yaml.safe_load(yaml.safe_dump(overlay)) == overlay
    applied = with_values(params, values)
    assert (applied.rank.lambda_, applied.intra.optimizer.lr, applied.rank.class_balanced_share) == (0.41, 1e-4, None)
