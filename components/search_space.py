"""The sweep's search space: checked against the typed configuration, turned into Ray Tune
distributions, and the best values written back as a params overlay.

A dimension is keyed by the dotted params name it sets (`rank.lambda`, `intra.optimizer.lr`).
Only what a trial re-runs may be searched: the ranking's split and pseudo-label selection and the
intra stage. Everything upstream (data, model, inter stage) is fixed by the sweep's inputs, which
is what lets every trial reuse the inter model and the ranking inference.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from segshift.components.config import ConfigError, Params, SearchDimension
from segshift.components.derive import InvalidOverride, OverrideError

SEARCHABLE_SECTIONS = ("rank", "intra")
# set by the sweep itself or by where a trial writes, so not searchable
FIXED_KEYS = frozenset({"rank.out_dir", "rank.batch_size", "rank.concurrency", "rank.cpus_per_actor",
                        "rank.gpus_per_actor", "intra.iterations"})


def _where(key: str) -> str:
    return f"sweep.space['{key}']"


def with_values(params: Params, values: Mapping[str, Any]) -> Params:
    """`params` with dotted keys set to `values`, validated like params.yaml (OverrideError if not)."""
    return params.with_overrides(values, where="", source="sweep values")


def check_search_space(params: Params) -> None:
    """Raise ConfigError, naming the dimension, for a key that cannot be searched or a bound or
    choice that is not a valid value of its parameter (e.g. rank.lambda up to 1.2)."""
    # an empty space never gets here: SweepConfig requires at least one dimension
    for key, dimension in params.sweep.space.items():
        section = key.split(".", 1)[0]
        if section not in SEARCHABLE_SECTIONS or "." not in key:
            raise ConfigError(f"{_where(key)}: only {', '.join(s + '.*' for s in SEARCHABLE_SECTIONS)} "
                              "keys can be searched (a trial reuses the inter model and the ranking "
                              "inference)")
        if key in FIXED_KEYS:
            raise ConfigError(f"{_where(key)}: {key} is fixed by the sweep (trial length is "
                              "sweep.iterations; ranking resources and paths are the sweep's own)")
        for value in dimension.candidates():
            try:
                with_values(params, {key: value})
            except InvalidOverride as exc:
                bound = {"low": dimension.low, "high": dimension.high}
                name = next((b for b, v in bound.items() if v == value), "value")
                raise ConfigError(f"{_where(key)}: {name} = {value!r} is outside what {key} "
                                  f"accepts ({'; '.join(exc.problems)})") from None
            except OverrideError as exc:    # no such key, or a section
                raise ConfigError(f"{_where(key)}: {'; '.join(exc.problems)}") from None


def tune_space(space: Mapping[str, SearchDimension]) -> dict[str, Any]:
    """Ray Tune distributions for Optuna, keyed by the dotted params names."""
    from ray import tune
    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.type == "uniform":
            out[key] = tune.uniform(d.low, d.high)
        elif d.type == "loguniform":
            out[key] = tune.loguniform(d.low, d.high)
        elif d.type == "int":
            out[key] = tune.randint(int(d.low), int(d.high) + 1)    # randint's upper end is open
        else:
            out[key] = tune.choice(list(d.values or []))
    return out


def as_overlay(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted values as a nested params overlay (the format of `segshift preset FILE`)."""
    overlay: dict[str, Any] = {}
    for key, value in sorted(values.items()):
        node = overlay
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return overlay
