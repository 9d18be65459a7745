from pathlib import Path

import pytest

from segshift.components.config import ConfigError, load_params
from tests.conftest import REPO


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.prepare.source.kind == "builtin"
    assert params.prepare.builtin.counts.source_train > 0


@pytest.mark.parametrize("override, fragments", [
    ({"prepare.workers": "many"}, ["prepare.workers", "'many'", "valid integer"]),
    ({"prepare.builtin.height": 16}, ["prepare.builtin.height", "16", "greater than or equal to 32"]),
    ({"prepare.builtin.appearance_gap": 1.5}, ["prepare.builtin.appearance_gap", "1.5", "less than or equal to 1"]),
    ({"prepare.source.kind": "kitti"}, ["prepare.source.kind", "'kitti'", "'builtin'", "'gta5'"]),
    ({"prepare.target.kind": "gta5", "prepare.target.root": "/x"}, ["synthetic source dataset"]),
    ({"prepare.source.root": "/data/gta5"}, ["root must be null"]),
    ({"prepare.source.kind": "gta5"}, ["root is required"]),
    ({"prepare.builtin.conditions": {"snow": 1.0}}, ["unknown condition", "snow", "night"]),
])
def test_bad_values_name_key_value_and_rule(tmp_path, override, fragments):
    from tests.conftest import write_params
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, override))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unknown_key_lists_allowed_keys(tmp_path):
    from tests.conftest import write_params
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, {"prepare.workerz": 3}))
    message = str(err.value)
    assert "prepare.workerz: unknown key" in message
    assert "allowed:" in message and "workers" in message and "out_dir" in message


def test_missing_and_unparsable_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(scalar)


def test_missing_section_is_reported(tmp_path):
    import yaml
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["storage"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="storage: Field required"):
        load_params(path)
