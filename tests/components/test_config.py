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


# --- a params file from a careless user or an attacker: bounded before anything is built ---------

def alias_bomb(width: int = 360, levels: int = 6, indent: str = "") -> str:
    """A "billion laughs" document of ~9 KB: each level lists the previous one `width` times, so it
    expands to width**levels (~9e15) strings while PyYAML itself only builds shared lists."""
    lines = [f"{indent}l0: &l0 [" + ",".join(['"x"'] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"{indent}l{level}: &l{level} [" + ",".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    import time
    import tracemalloc
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert 8_000 < path.stat().st_size < 10_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match="aliases expand to more than") as err:
            load_params(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 5 and peak < 20 * 2**20
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_an_alias_refering_to_itself_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("prepare: &p {workers: 1, again: *p}\n")
    with pytest.raises(ConfigError, match="refers to its own anchor"):
        load_params(path)


def test_small_shared_blocks_still_load_but_nesting_is_bounded(tmp_path):
    from segshift.components.config import load_yaml_file
    # An anchored optimizer block reused by a second stage is fine; 100 levels of lists are not.
    path = tmp_path / "anchors.yaml"
    path.write_text("source: {optimizer: &adam {name: adam, lr: 0.002}}\noracle: {optimizer: *adam}\n")
    assert load_yaml_file(path)["oracle"]["optimizer"]["lr"] == 0.002
    path.write_text("a: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        load_yaml_file(path)


def test_a_params_file_over_the_size_limit_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text((REPO / "params.yaml").read_text() + "#" * (2 << 20) + "\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert f"{path}: the params file is 2.0 MiB, over the 1.0 MiB limit" in str(err.value)


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    text = (REPO / "params.yaml").read_text()
    first = text.splitlines().index("source:                 # segshift train --stage source: source labels only") + 1
    lines = text.count("\n")
    path = tmp_path / "dup.yaml"
    path.write_text(text + "source:\n  iterations: 5\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == (f"{path}: duplicate key 'source' at lines {first} and {lines + 1} (YAML "
                              "would silently keep the second); remove one")


def test_duplicate_keys_inside_a_flow_mapping_and_merged_keys(tmp_path):
    from segshift.components.config import load_yaml_file
    path = tmp_path / "flow.yaml"
    path.write_text("base: &b {lr: 1, lr: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr' twice on line 1"):
        load_yaml_file(path)
    path.write_text("base: &b {lr: 1, name: adam}\nother: {<<: *b, lr: 2}\n")   # overriding a merge is not a duplicate
    assert load_yaml_file(path)["other"] == {"lr": 2, "name": "adam"}


def test_a_file_that_is_not_utf8_is_named_in_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("prepare:\n  out_dir: donn\u00e9es\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: the params file is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"


def test_yaml_syntax_errors_are_one_line_with_the_position(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("prepare:\n  workers: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: not valid YAML: line 3, column 1: ")
    assert "\n" not in str(err.value)


# Each of these was accepted (or crashed torch later) before the schema bounded it.
@pytest.mark.parametrize("override, fragments", [
    ({"source.iterations": True}, ["source.iterations", "valid integer", "True"]),
    ({"prepare.strict": "yes"}, ["prepare.strict", "valid boolean", "'yes'"]),
    ({"prepare.workers": 2.0}, ["prepare.workers", "valid integer"]),
    ({"source.optimizer.lr": "0.1"}, ["source.optimizer.lr", "valid number"]),
    ({"source.optimizer.lr": float("inf")}, ["source.optimizer.lr", "finite number"]),
    ({"inter.adv_weight_main": float("nan")}, ["inter.adv_weight_main", "finite number"]),
    ({"prepare.builtin.conditions": {"clear": float("inf")}}, ["conditions.clear", "finite number"]),
    ({"sweep.space": {"rank.lambda": {"type": "uniform", "low": float("-inf"), "high": 0.5}}},
     ["sweep.space.rank.lambda.low", "finite number"]),
    ({"source.crop": [-64, 64]}, ["source.crop.0", "greater than or equal to 16"]),
    ({"inter.crop": [512, 10**9]}, ["inter.crop.1", "less than or equal to 8192"]),
    ({"oracle.crop": [0, 0]}, ["oracle.crop.0", "oracle.crop.1"]),
    ({"intra.crop": [64.0, 64]}, ["intra.crop.0", "valid integer"]),
    ({"prepare.source.resize": [10**6, 720]}, ["prepare.source.resize.0", "less than or equal to 8192"]),
    ({"model.rates": [0, 6]}, ["model.rates.0", "greater than or equal to 1"]),
    ({"model.rates": [6, 100000]}, ["model.rates.1", "less than or equal to 64"]),
    ({"model.rates": [1] * 1000}, ["model.rates", "at most 8 items"]),
    ({"model.rates": [True]}, ["model.rates.0", "valid integer"]),
    ({"profile.models.deeplabv2_r101.rates": [-6]}, ["profile.models.deeplabv2_r101.rates.0"]),
    ({"source.batch_size": 10**9}, ["source.batch_size", "less than or equal to 1024"]),
    ({"engine.seed": 2**70}, ["engine.seed", "less than or equal to 4294967295"]),
    ({"compare.seeds": [0] * 1000}, ["compare.seeds", "at most 100 items"]),
    ({"profile.height": 10**6}, ["profile.height", "less than or equal to 8192"]),
    ({"source.augment": {"scale": [0.5, 1e9], "brightness": 0.2, "contrast": 0.2, "saturation": 0.2,
                         "hue": 0.0, "jitter_p": 0.5, "blur_p": 0.5, "blur_sigma": [0.1, 1.0]}},
     ["source.augment.scale.1", "less than or equal to 8"]),
    ({"methods.lse.share_step": 1e-9}, ["methods.lse", "more than 100 rounds"]),
    ({"methods.lse.crops_per_image": 10**6}, ["methods.lse.crops_per_image"]),
    ({"methods.fda.ensemble_betas": [0.01] * 100}, ["methods.fda.ensemble_betas", "at most 8 items"]),
])
def test_every_number_is_typed_finite_and_bounded(tmp_path, override, fragments):
    from tests.conftest import write_params
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, override))
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_an_int_where_a_float_is_expected_is_fine_but_a_bool_is_not(tmp_path):
    from tests.conftest import write_params
    params = load_params(write_params(tmp_path, {"source.optimizer.lr": 1, "source.crop": [64, 128]}))
    assert params.source.optimizer.lr == 1.0 and params.source.crop == (64, 128)
    with pytest.raises(ConfigError, match="source.optimizer.lr: Input should be a valid number"):
        load_params(write_params(tmp_path, {"source.optimizer.lr": True}))


def test_values_quoted_in_errors_are_truncated(tmp_path):
    from tests.conftest import write_params
    huge = "9" * 500_000                     # within the size limit, far too long to print
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, {"prepare.workers": huge, "model.rates": list(range(10_000))}))
    message = str(err.value)
    assert "prepare.workers: Input should be a valid integer (got '999" in message
    assert "model.rates: List should have at most 8 items" in message
    assert "9" * 1000 not in message and len(message) < 2_000


def test_thousands_of_problems_list_the_first_twenty(tmp_path):
    from tests.conftest import write_params
    path = write_params(tmp_path, {f"prepare.key{i}": i for i in range(1000)})
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert "... and 980 more" in str(err.value) and len(str(err.value).splitlines()) == 22
