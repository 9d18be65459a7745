"""`segshift preset`: the real-data recipes merge into valid params, keep everything they do not set,
let `-S` win, refuse unknown keys by name, and carry the reference (ADVENT / IntraDA) values."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from segshift.components.config import ConfigError, Params, load_params, validate_params
from segshift.components.derive import merge_tree
from segshift.pipelines.cli import main
from segshift.pipelines.preset import (
    OPEN_MAPPINGS,
    PresetError,
    apply_overrides,
    changed_keys,
    flatten,
    merge_preset,
    parse_override,
    resolve_preset,
)
from tests.conftest import REPO

PRESETS = ("gta5-cityscapes", "synthia-cityscapes")


def _base() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _overlay(name: str) -> dict:
    return yaml.safe_load((REPO / "presets" / f"{name}.yaml").read_text())


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- the presets --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRESETS)
def test_preset_merges_into_valid_params_and_keeps_every_value_it_does_not_set(name: str):
    base, overlay = _base(), _overlay(name)
    merged, params = merge_preset(base, overlay, preset_name=name)
    assert isinstance(params, Params)
    flat_base, flat_merged, flat_overlay = flatten(base), flatten(merged), flatten(overlay)
    assert set(flat_merged) == set(flat_base)          # an overlay adds no key
    for key, value in flat_base.items():
        expected = flat_overlay.get(key, value)
        assert flat_merged[key] == expected, key
    assert set(changed_keys(base, merged)) <= set(flat_overlay)


@pytest.mark.parametrize("name, kind, size", [("gta5-cityscapes", "gta5", (1280, 720)),
                                              ("synthia-cityscapes", "synthia", (1280, 760))])
def test_preset_values_match_the_reference_recipe(name: str, kind: str, size: tuple[int, int]):
    _, p = merge_preset(_base(), _overlay(name), preset_name=name)
    # Data: ADVENT input sizes; Cityscapes val is the test split, train cities held out for selection.
    assert (p.prepare.source.kind, p.prepare.source.resize, p.prepare.source.val_fraction) == (kind, size, 0.0)
    assert (p.prepare.target.kind, p.prepare.target.resize, p.prepare.target.val_fraction) == (
        "cityscapes", (1024, 512), 0.1)
    assert p.prepare.source.root and p.prepare.target.root
    # DeepLab-v2 ResNet-101, multi-level, ADVENT's BatchNorm and dilations, ImageNet weights.
    assert (p.model.name, p.model.backbone, p.model.width, p.model.rates) == (
        "deeplabv2", "resnet101", 1.0, [6, 12, 18, 24])
    assert p.model.aux_head and p.model.pretrained
    assert (p.model.frozen_bn, p.model.batchnorm_mode, p.model.dilation) == (False, "reference", "reference")
    # Segmentation network: SGD 2.5e-4, momentum 0.9, wd 5e-4, heads 10x, poly 0.9; 120k steps, batch 1.
    for stage in (p.source, p.oracle, p.inter, p.intra):
        assert (stage.iterations, stage.batch_size, stage.crop, stage.aux_weight) == (120000, 1, None, 0.1)
        opt = stage.optimizer
        assert (opt.name, opt.lr, opt.momentum, opt.weight_decay, opt.head_lr_mult, opt.poly_power) == (
            "sgd", 2.5e-4, 0.9, 5e-4, 10, 0.9)
    # Adaptation: ADVENT weights, discriminators ndf 64 with Adam 1e-4 (0.9, 0.99); ImageNet init.
    for stage in (p.inter, p.intra):
        assert (stage.method, stage.init) == ("advent", "imagenet")
        assert (stage.adv_weight_main, stage.adv_weight_aux) == (0.001, 0.0002)
        assert (stage.entropy_weight_main, stage.entropy_weight_aux) == (0.001, 0.0002)
        d = stage.discriminator
        assert (d.ndf, d.optimizer.name, d.optimizer.lr, d.optimizer.betas) == (64, "adam", 1e-4, (0.9, 0.99))
    # Ranking: lambda 0.67, no normalisation by default; pseudo-labels the plain argmax (IntraDA
    # entropy.py): no confidence threshold, no class-balanced selection.
    assert (p.rank.lambda_, p.rank.entropy_normalisation, p.rank.confidence_threshold) == (0.67, False, None)
    assert p.rank.class_balanced_share is None
    # One GPU worker for training and ranking.
    w = p.engine.workers
    assert (w.num_workers, w.use_gpu, w.gpus_per_worker, p.rank.gpus_per_actor) == (1, True, 1, 1)
    assert (p.engine.amp, p.engine.cache_images, p.engine.device) == ("none", False, "auto")


def test_presets_differ_only_in_the_source_dataset():
    gta5, synthia = (flatten(merge_preset(_base(), _overlay(n))[0]) for n in PRESETS)
    differing = {k for k in gta5 if gta5[k] != synthia[k]}
    assert differing <= {"prepare.source.kind", "prepare.source.root", "prepare.source.resize",
                         "prepare.strict", "model.classes"}    # SYNTHIA's 16 classes come with its labels
    assert {"prepare.source.kind", "prepare.source.resize", "model.classes"} <= differing


# --- the command -------------------------------------------------------------------------------

def test_cli_writes_params_that_load_and_name_the_preset(project: Path, capsys):
    assert main(["preset", "gta5-cityscapes", "-S", "prepare.source.root=/mnt/gta5"]) == 0
    text = (project / "params.yaml").read_text()
    assert text.startswith("# segshift parameters: preset ") and "gta5-cityscapes.yaml" in text.splitlines()[0]
    assert "-S prepare.source.root=/mnt/gta5" in text.splitlines()[1]
    params = load_params(project / "params.yaml")
    assert (params.prepare.source.kind, params.prepare.source.root) == ("gta5", "/mnt/gta5")
    assert "resize: [1280, 720]" in text        # lists inline, as in the hand-written file
    out = capsys.readouterr()
    assert "preset gta5-cityscapes applied" in out.out
    assert "prepare.source.kind: 'builtin' -> 'gta5'" in out.out
    assert "model.pretrained: weights/resnet101-imagenet.pth does not exist" in out.err  # a warning only


def test_cli_overrides_win_and_are_parsed_as_yaml(project: Path):
    args = ["preset", "synthia-cityscapes", "--quiet",
            "-S", "model.backbone=resnet18", "-S", "model.rates=[1, 2]", "-S", "model.pretrained=null",
            "-S", "inter.init=source", "-S", "intra.init=inter", "-S", "rank.lambda=0.5",
            "-S", "source.iterations=7", "-S", "source.iterations=9", "-S", "engine.workers.use_gpu=false"]
    assert main(args) == 0
    p = load_params(project / "params.yaml")
    assert (p.model.backbone, p.model.rates, p.model.pretrained) == ("resnet18", [1, 2], None)
    assert (p.inter.init, p.intra.init, p.rank.lambda_) == ("source", "inter", 0.5)
    assert p.source.iterations == 9                     # the last -S wins
    assert p.engine.workers.use_gpu is False
    assert p.oracle.iterations == 120000                # the preset's value where not overridden


def test_cli_output_leaves_the_params_file_alone_and_reapplying_is_stable(project: Path):
    before = (project / "params.yaml").read_text()
    assert main(["preset", "gta5-cityscapes", "--quiet", "--output", "real.yaml"]) == 0
    assert (project / "params.yaml").read_text() == before
    first = load_params(project / "real.yaml")
    assert main(["preset", "gta5-cityscapes", "--quiet", "--params", "real.yaml"]) == 0
    assert load_params(project / "real.yaml") == first


def test_unknown_key_in_a_preset_exits_2_naming_the_file_and_the_key(project: Path, capsys):
    bad = project / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet101\n  widht: 1.0\n")
    assert main(["preset", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "model.widht" in err and "unknown key" in err
    assert "allowed in model:" in err and "width" in err


def test_invalid_value_in_a_preset_exits_2_naming_the_file_and_the_key(project: Path, capsys):
    bad = project / "presets" / "broken.yaml"
    bad.parent.mkdir()
    bad.write_text("rank:\n  lambda: 1.5\n")
    before = (project / "params.yaml").read_text()
    assert main(["preset", "broken"]) == 2          # found by name in ./presets
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "rank.lambda" in err
    assert (project / "params.yaml").read_text() == before   # nothing written


def test_bad_overrides_and_unknown_presets_exit_2(project: Path, capsys):
    assert main(["preset", "gta5-cityscapes", "-S", "model.depth=50"]) == 2
    assert "model.depth" in capsys.readouterr().err
    assert main(["preset", "gta5-cityscapes", "-S", "model.width"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["preset", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "no-such-preset" in err and "gta5-cityscapes" in err and "synthia-cityscapes" in err


# --- the merge logic --------------------------------------------------------------------------

def test_merge_tree_merges_sections_replaces_values_and_refuses_unknown_keys():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": None}
    merged = merge_tree(base, {"a": {"c": [3]}, "d": {"x": 1}}, open_paths=())
    assert merged == {"a": {"b": 1, "c": [3]}, "d": {"x": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": None}     # inputs untouched
    with pytest.raises(ConfigError, match=r"unknown key 'a\.z'; allowed in a: b, c"):
        merge_tree(base, {"a": {"z": 0}}, open_paths=())
    with pytest.raises(ConfigError, match="'a' is a section"):
        merge_tree(base, {"a": 3}, open_paths=())
    with pytest.raises(ConfigError, match=r"'a\.b' is a value"):
        merge_tree(base, {"a": {"b": {"x": 1}}}, open_paths=())
    assert merge_tree(base, {"a": {"z": 0}}, open_paths=("a",))["a"]["z"] == 0


def test_open_mappings_of_params_accept_new_entries():
    assert {"profile.models", "prepare.builtin.conditions"} <= OPEN_MAPPINGS
    entry = {"name": "deeplabv2", "backbone": "resnet50", "width": 1.0, "rates": [6, 12, 18, 24],
             "aux_head": False, "frozen_bn": False, "pretrained": None}
    merged = apply_overrides(_base(), [("profile.models.deeplabv2_r50", entry)])
    assert validate_params(merged).profile.models["deeplabv2_r50"].backbone == "resnet50"


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=[1280, 720]") == ("a.b", [1280, 720])
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=") == ("a", None)
    assert parse_override("root=s3://bucket/gta5") == ("root", "s3://bucket/gta5")
    assert parse_override("x=a=b") == ("x", "a=b")
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(PresetError):
            parse_override(bad)


def test_resolve_preset_takes_a_path_or_a_name(project: Path):
    assert resolve_preset("gta5-cityscapes") == (REPO / "presets" / "gta5-cityscapes.yaml").resolve()
    own = project / "presets" / "gta5-cityscapes.yaml"     # the project's own copy comes first
    own.parent.mkdir()
    own.write_text("engine:\n  seed: 3\n")
    assert resolve_preset("gta5-cityscapes") == own.resolve()
    assert resolve_preset(str(REPO / "presets" / "synthia-cityscapes.yaml")).name == "synthia-cityscapes.yaml"
    with pytest.raises(PresetError, match="not found"):
        resolve_preset("missing/file.yaml")


# --- every key the reference fixes, read from each preset as `segshift preset` applies it ---------

@pytest.mark.parametrize("name", PRESETS)
def test_preset_fixes_the_reference_network_pseudo_label_rule_and_class_protocol(name: str):
    from torch import nn

    from segshift.components.models.factory import AffineFrozenBatchNorm2d, build_model

    merged, p = merge_preset(_base(), _overlay(name), preset_name=name)
    flat, overlay = flatten(merged), flatten(_overlay(name))
    fixed = {"model.frozen_bn": False, "model.batchnorm": "reference", "model.dilation": "reference",
             "model.classes": REFERENCE_CLASSES[name],
             "rank.confidence_threshold": None, "rank.class_balanced_share": None,
             "prepare.target.full_resolution_labels": True}
    for key, value in fixed.items():
        assert key in overlay, f"{name} does not pin {key}"     # pinned, not inherited from params.yaml
        assert flat[key] == value, key
    # The network these settings build: every layer3 (layer4) block dilated 2 (4), BN affine frozen.
    small = p.model.model_copy(update={"backbone": "resnet50", "width": 0.125, "pretrained": None})
    model = build_model(small)
    assert model.num_classes == p.model.num_classes == {"cityscapes19": 19, "synthia16": 16}[p.model.classes]
    assert [b.conv2.dilation[0] for b in model.backbone.layer3] == [2] * 6
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [4] * 3
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(isinstance(bn, AffineFrozenBatchNorm2d) and not bn.weight.requires_grad for bn in bns)


def test_the_built_in_job_keeps_its_network():
    p = validate_params(_base())
    assert (p.model.batchnorm_mode, p.model.dilation, p.model.classes, p.model.num_classes) == (
        "train", "torchvision", "cityscapes19", 19)
    assert p.rank.class_balanced_share == 0.5


def test_synthia16_with_a_source_that_labels_19_classes_fails_naming_both_keys():
    from segshift.components.config import ConfigError

    for kind in ("gta5", "cityscapes"):
        raw = apply_overrides(_base(), [("model.classes", "synthia16"), ("prepare.source.kind", kind),
                                        ("prepare.source.root", "/data/x")])
        with pytest.raises(ConfigError, match=rf"model\.classes: synthia16 .* prepare\.source\.kind is {kind}"):
            validate_params(raw)
    raw = apply_overrides(_base(), [("model.classes", "synthia16"), ("prepare.source.kind", "synthia"),
                                    ("prepare.source.root", "/data/synthia")])
    assert validate_params(raw).model.num_classes == 16


def test_reference_batchnorm_with_frozen_bn_fails_naming_both_keys():
    from segshift.components.config import ConfigError

    raw = apply_overrides(_base(), [("model.frozen_bn", True), ("model.batchnorm", "reference")])
    with pytest.raises(ConfigError, match=r"model\.frozen_bn: true contradicts model\.batchnorm: reference"):
        validate_params(raw)


# The reference's class protocol of each preset: GTA5 labels all 19 Cityscapes classes; SYNTHIA
# lacks terrain, truck and train, and the reference trains and scores a 16-class head.
REFERENCE_CLASSES = {"gta5-cityscapes": "cityscapes19", "synthia-cityscapes": "synthia16"}


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_sets_the_reference_class_protocol_itself(name: str):
    overlay = flatten(_overlay(name))
    assert overlay["model.classes"] == REFERENCE_CLASSES[name]      # pinned in the preset itself
    _, p = merge_preset(_base(), _overlay(name), preset_name=name)
    assert p.model.classes == REFERENCE_CLASSES[name]
    assert p.model.num_classes == {"gta5-cityscapes": 19, "synthia-cityscapes": 16}[name]
