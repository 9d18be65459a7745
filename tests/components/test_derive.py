"""`components.derive`: the one way to derive params (dotted overrides, a run's relocation, a
config's identity), and the hashes the pipelines build on it kept bit-identical."""
from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from segshift.components.config import Params, load_params
from segshift.components.derive import (OPEN_MAPPINGS, RUN_OUTPUTS, InvalidOverride, OverrideError, identity,
                                        merge_tree, set_dotted)
from segshift.pipelines.preset import flatten
from tests.conftest import REPO


@pytest.fixture(scope="module")
def repo_params():
    return load_params(REPO / "params.yaml")


# -- the identities stored on disk: committed run records, shared source directories, checkpoints,
# round labels. Computed with the hashers as they were before `identity` replaced them; a change
# to params.yaml or to the schema changes them legitimately (and retrains what they name).

def _fake_project(root: Path, stage: str) -> Path:
    """The files a stage's fingerprint reads, with fixed bytes: manifests, its init model, ranking."""
    for domain in ("source", "target"):
        (root / "data" / "prepared" / domain).mkdir(parents=True)
        (root / "data" / "prepared" / domain / "manifest.parquet").write_bytes(domain.encode())
    init = {"inter": "source", "intra": "inter"}.get(stage)
    if init:
        (root / "models" / init).mkdir(parents=True)
        (root / "models" / init / "model.pt").write_bytes(b"weights")
    if stage == "intra":
        (root / "data" / "ranking").mkdir(parents=True)
        (root / "data" / "ranking" / "ranking.parquet").write_bytes(b"ranking")
    return root


def test_compare_identities_are_unchanged(repo_params):
    from segshift.pipelines.compare import build_plan, run_identity, source_key
    assert source_key(repo_params) == "103de67f66"
    runs = {run.entry: run for run in build_plan(repo_params, entries=["dacs", "intrada"], seeds=[0]).runs}
    assert run_identity(runs["dacs"]) == "bdea036651b1a8065938af8c90e47e4af376083c78009021a69a3a0e7fa2edee"
    assert run_identity(runs["intrada"]) == "783759bb8952181b6fa8c632784491a0f22ee65dec3f8321a5be01bde6778556"
    assert runs["dacs"].source.key == runs["intrada"].source.key == source_key(runs["dacs"].params) == "cff4195d6e"


def test_sweep_and_round_identities_are_unchanged(repo_params):
    from segshift.pipelines.rounds import stage_identity
    from segshift.pipelines.sweep import sweep_key
    from segshift.pipelines.runtime import StageJob
    assert sweep_key(repo_params, "m" * 64, "d" * 64) == "b6971df4c5076880"
    job = StageJob(params=repo_params.model_dump(mode="json"), stage="inter", project_dir="/nonexistent")
    assert stage_identity(job) == "33dfac567b0a2592"


@pytest.mark.parametrize("stage, amp, expected", [("source", "bf16", "f640ebd0f7551161"),
                                                  ("inter", "bf16", "ba70e6cf527a84e4"),
                                                  ("intra", "none", "f50b14165b9532c0")])
def test_checkpoint_fingerprints_are_unchanged(repo_params, tmp_path, stage, amp, expected):
    from segshift.pipelines.runtime import StageJob, run_fingerprint
    job = StageJob(params=repo_params.model_dump(mode="json"), stage=stage,
                   project_dir=str(_fake_project(tmp_path, stage)))
    assert run_fingerprint(job, amp) == expected


# -- one override on the raw tree ---------------------------------------------------------------

def _tree() -> dict:
    return {"model": {"width": 0.5, "rates": [6, 12]},
            "source": {"augment": None, "optimizer": {"lr": 0.1, "momentum": 0.9}},
            "compare": {"set": {"source.iterations": 2}, "entries": {"fda-0.01": {"stages": ["source"], "set": {}}}},
            "sweep": {"space": {"rank.lambda": {"type": "uniform", "low": 0.3, "high": 0.8}}},
            "profile": {"models": {"small": {"width": 0.25}}}}


def test_a_dotted_key_sets_a_copy_of_the_value_deep_in_the_tree():
    tree, rates = _tree(), [1, 2]
    set_dotted(tree, "source.optimizer.lr", 0.5)
    set_dotted(tree, "model.rates", rates)
    rates.append(3)                                 # the caller's object stays the caller's
    assert tree["source"]["optimizer"] == {"lr": 0.5, "momentum": 0.9}
    assert tree["model"]["rates"] == [1, 2]


@pytest.mark.parametrize("dotted, message", [
    ("source.optimizer.lrr", "override source.optimizer.lrr: unknown key 'source.optimizer.lrr'; "
                             "allowed in source.optimizer: lr, momentum"),
    ("sourc.iterations", "override sourc.iterations: unknown key 'sourc'; allowed at the top level: "
                         "compare, model, profile, source, sweep"),
    ("profile.models.small.depth", "unknown key 'profile.models.small.depth'; allowed in profile.models.small: width"),
])
def test_an_unknown_key_is_named_with_the_keys_allowed_at_its_level(dotted, message):
    tree = _tree()
    with pytest.raises(OverrideError) as err:
        set_dotted(tree, dotted, 1, name=f"override {dotted}")
    assert message in str(err.value)
    assert tree == _tree()


def test_open_mappings_take_new_entries_whose_names_may_hold_dots():
    tree = _tree()
    set_dotted(tree, "compare.set.inter.iterations", 5)                  # a new dotted entry
    set_dotted(tree, "compare.set.source.iterations", 7)                 # the existing one
    set_dotted(tree, "compare.entries.fda-0.01.set.inter.method", "fda")  # an entry's own set
    set_dotted(tree, "profile.models.big", {"width": 1.0})
    set_dotted(tree, "sweep.space.rank.lambda.low", 0.2)                 # the longest entry first
    assert tree["compare"]["set"] == {"source.iterations": 7, "inter.iterations": 5}
    assert tree["compare"]["entries"]["fda-0.01"]["set"] == {"inter.method": "fda"}
    assert tree["profile"]["models"]["big"] == {"width": 1.0}
    assert tree["sweep"]["space"]["rank.lambda"]["low"] == 0.2
    assert {"compare.entries", "compare.entries.*.set", "compare.set", "compare.literature", "sweep.space",
            "profile.models", "prepare.builtin.conditions"} == OPEN_MAPPINGS


@pytest.mark.parametrize("dotted, value, message", [
    ("model.width.x", 1, "'model.width' is not a section (it is 0.5); set it as a whole"),
    ("source.augment.scale", [1, 2], "'source.augment' is not a section (it is None)"),
    ("source.optimizer", 3, "'source.optimizer' is a section (lr, momentum); give its keys, not the value 3"),
    ("model.width", {"x": 1}, "'model.width' is a value (0.5), not a section"),
])
def test_a_section_and_a_value_do_not_take_each_others_place(dotted, value, message):
    with pytest.raises(OverrideError, match=re.escape(message)):
        set_dotted(_tree(), dotted, value)


def test_null_and_mappings_replace_sections_whole():
    tree = _tree()
    set_dotted(tree, "source.augment", {"scale": [0.5, 2.0]})         # a section that was null
    set_dotted(tree, "source.optimizer", {"lr": 0.2})                 # replaced, not merged
    set_dotted(tree, "model.rates", None)
    assert tree["source"] == {"augment": {"scale": [0.5, 2.0]}, "optimizer": {"lr": 0.2}}
    assert tree["model"]["rates"] is None
    set_dotted(tree, "source.augment", None)
    assert tree["source"]["augment"] is None


def test_a_tree_merges_as_overrides_of_its_leaves():
    base = _tree()
    merged = merge_tree(base, {"source": {"optimizer": {"lr": 0.3}, "augment": {"scale": [1, 2]}},
                               "profile": {"models": {"small": {"width": 0.5}, "big": {"width": 1.0}}},
                               "compare": {"entries": {"fda-0.01": {"set": {"inter.method": "fda"}}}}})
    assert merged["source"] == {"augment": {"scale": [1, 2]}, "optimizer": {"lr": 0.3, "momentum": 0.9}}
    assert merged["profile"]["models"] == {"small": {"width": 0.5}, "big": {"width": 1.0}}
    assert merged["compare"]["entries"]["fda-0.01"] == {"stages": ["source"], "set": {"inter.method": "fda"}}
    assert base == _tree()
    with pytest.raises(OverrideError, match="unknown key 'profile.models.small.depth'"):
        merge_tree(base, {"profile": {"models": {"small": {"depth": 3}}}})


# -- overrides on validated params ----------------------------------------------------------------

def test_with_overrides_returns_new_validated_params(repo_params):
    derived = repo_params.with_overrides({"rank.lambda": 0.4, "source.optimizer.lr": 1}, where="test")
    assert derived.rank.lambda_ == 0.4 and derived.source.optimizer.lr == 1.0
    assert repo_params.rank.lambda_ != 0.4
    assert derived.with_overrides({}, where="test") == derived


def test_a_refused_value_blames_the_override_by_name(repo_params):
    with pytest.raises(InvalidOverride) as err:
        repo_params.with_overrides({"rank.lambda": 1.5, "intra.iterations": 5}, where="compare.set")
    message = str(err.value)
    assert message.startswith("compare.set.rank.lambda: compare.set: invalid configuration\n")
    assert "  rank.lambda: Input should be less than 1 (got 1.5)" in message
    assert "intra.iterations" not in message
    assert err.value.problems == ("rank.lambda: Input should be less than 1 (got 1.5)",)


def test_a_rule_that_ties_settings_together_blames_every_override(repo_params):
    overrides = {"inter.method": "minent", "inter.entropy_weight_aux": 0.1, "model.aux_head": False}
    with pytest.raises(InvalidOverride) as err:
        repo_params.with_overrides(overrides, where="e", source="entry e")
    assert str(err.value).startswith("e.inter.method, e.inter.entropy_weight_aux, e.model.aux_head: entry e: ")
    assert "model.aux_head is false" in str(err.value)


def test_an_unknown_override_is_named_where_it_was_written(repo_params):
    with pytest.raises(OverrideError, match=r"^compare\.entries\.x\.set\.rank\.lamda: unknown key 'rank\.lamda'; "
                                            r"allowed in rank: batch_size, "):
        repo_params.with_overrides({"rank.lamda": 0.5}, where="compare.entries.x.set")


# -- a run's own directory ------------------------------------------------------------------------

def _string_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    found: set[str] = set()
    for name, field in model.model_fields.items():
        found |= _strings_in(field.annotation, f"{prefix}{field.alias or name}")
    return found


def _strings_in(annotation, path: str) -> set[str]:
    if annotation is str:
        return {path}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _string_fields(annotation, f"{path}.")
    if typing.get_origin(annotation) is dict:
        return _strings_in(typing.get_args(annotation)[1], f"{path}.*")
    if typing.get_origin(annotation) is typing.Literal:
        return set()
    return set().union(*(_strings_in(arg, path) for arg in typing.get_args(annotation)))


# Every text setting of the schema that is not an output of a run, and why. A new path setting
# fails the test below until it is put here or in RUN_OUTPUTS.
NOT_RUN_OUTPUTS = {
    # inputs every run shares
    "prepare.out_dir", "prepare.source.root", "prepare.target.root", "storage.cache_dir",
    "model.pretrained", "profile.models.*.pretrained", "methods.labor.annotations",
    # outputs of the commands that relocate runs, and of stand-alone commands
    "seeds.out_dir", "compare.out_dir", "compare.report", "compare.records", "sweep.out_dir",
    "sweep.storage_path", "calibrate.out",
    # not paths
    "storage.s3_endpoint_url", "ray.address", "tracking.uri", "tracking.experiment", "sweep.name",
}


def test_every_path_setting_is_either_a_run_output_or_known_not_to_be_one():
    assert _string_fields(Params) == set(RUN_OUTPUTS) | NOT_RUN_OUTPUTS
    assert not set(RUN_OUTPUTS) & NOT_RUN_OUTPUTS


@pytest.mark.parametrize("seed", [None, 11])
def test_relocation_moves_every_output_and_nothing_else(repo_params, tmp_path, seed):
    run_dir = tmp_path / "runs" / "x" / "seed-11"
    moved = repo_params.relocated(run_dir, seed=seed)
    before, after = flatten(repo_params.model_dump(mode="json")), flatten(moved.model_dump(mode="json"))
    changed = {key for key in before if before[key] != after[key]}
    assert changed == set(RUN_OUTPUTS) | ({"engine.seed"} if seed is not None else set())
    assert {key: after[key] for key in RUN_OUTPUTS} == {
        "paths.models": f"{run_dir}/models", "paths.metrics": f"{run_dir}/metrics",
        "paths.reports": f"{run_dir}/reports", "paths.checkpoints": f"{run_dir}/checkpoints",
        "rank.out_dir": f"{run_dir}/ranking", "evaluate.out": f"{run_dir}/metrics/summary.json"}
    assert moved.engine.seed == (repo_params.engine.seed if seed is None else seed)


def test_seeds_and_sweep_trials_are_relocated_the_one_way(repo_params, tmp_path):
    from segshift.pipelines.seeds import seed_params
    from segshift.pipelines.sweep import trial_params
    assert seed_params(repo_params, 4, tmp_path / "seed-4") == repo_params.relocated(tmp_path / "seed-4", seed=4)
    trial = trial_params(repo_params, {"rank.lambda": 0.45}, tmp_path / "trial")
    assert trial.rank.lambda_ == 0.45 and trial.intra.iterations == repo_params.sweep.iterations
    assert trial.relocated(tmp_path / "trial") == trial
    assert trial.engine.seed == repo_params.engine.seed and trial.prepare == repo_params.prepare


def test_a_relocated_seed_out_of_bounds_is_named(repo_params, tmp_path):
    with pytest.raises(InvalidOverride, match=r"^engine\.seed: seed -1: invalid configuration"):
        repo_params.relocated(tmp_path, seed=-1)


# -- identity -------------------------------------------------------------------------------------

def test_identity_is_the_sha256_of_canonical_json_whatever_the_key_order(repo_params):
    tree = {"b": 1, "a": [1, 2.5, None], "c": {"y": "x", "x": True}}
    full = "ae41427500eef9aeab08dbf670035bb35e1ad423295c2763a8c9d4c33403bb9a"
    assert identity(tree) == full and identity(tree, 10) == full[:10]
    assert identity({"c": {"x": True, "y": "x"}, "a": [1, 2.5, None], "b": 1}) == full
    assert identity({**tree, "b": 2}) != full
    assert identity(repo_params) == identity(repo_params.model_dump(mode="json"))
    assert identity(repo_params.with_overrides({"rank.lambda": 0.5}, where="t")) != identity(repo_params)
