"""The one way to derive params from params: dotted-key overrides (a preset's tree is merged as
overrides of its leaves), a run's outputs moved into its own directory, and a config's identity.

The overrides work on the raw tree (a params file as read, or `Params.model_dump(mode="json")`);
`Params.with_overrides` and `Params.relocated` apply them to validated params and validate again.

Every key an override names must exist, except a new entry of an open mapping (a `dict[str, ...]`
field such as `compare.entries`, `compare.set`, `sweep.space`, `profile.models`). Entries of some
open mappings are themselves dotted params names (`compare.set: {source.iterations: 2}`), so inside
an open mapping a dotted key names the longest entry that exists, else one new entry.
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import typing
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from segshift.components.config import (MAX_ERROR_LINE, ConfigError, Params, PathsConfig, shown, truncated,
                                        validation_problems)


class OverrideError(ConfigError):
    """An override the params tree cannot take: its key names no setting or has the wrong shape.

    `problems`: what is wrong, one line each, without the override's name (for a caller that
    words its own sentence around them).
    """

    def __init__(self, message: str, problems: Sequence[str]):
        super().__init__(message)
        self.problems = tuple(problems)


class InvalidOverride(OverrideError):
    """Overrides that fit the tree but whose result the schema refuses; the message blames them."""


# -- where new keys may appear --------------------------------------------------------------------

def _open_in(annotation: Any, path: str) -> set[str]:
    if typing.get_origin(annotation) is dict:
        _, value = typing.get_args(annotation)
        return {path} | _open_in(value, f"{path}.*")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return set(open_mappings(annotation, f"{path}."))
    return set().union(*(_open_in(arg, path) for arg in typing.get_args(annotation)))


def open_mappings(model: type[BaseModel] = Params, prefix: str = "") -> frozenset[str]:
    """Dotted paths of the schema's free-form mappings (`dict[str, ...]` fields), the only places
    where an override may add a key; `*` stands for any entry (`compare.entries.*.set`)."""
    found: set[str] = set()
    for name, field in model.model_fields.items():
        found |= _open_in(field.annotation, f"{prefix}{field.alias or name}")
    return frozenset(found)


OPEN_MAPPINGS = open_mappings()
# Every mapping open: a test writes params files the schema refuses, to see them refused.
ANY_KEY = frozenset({"*"})


def _is_open(path: str, open_paths: Collection[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in open_paths)


def _dotted(keys: Sequence[Any]) -> str:
    return ".".join(map(str, keys))


# -- one override -------------------------------------------------------------------------------

def _keys(tree: Mapping, dotted: str, open_paths: Collection[str]) -> list[str]:
    """The keys `dotted` walks in `tree`: its parts, except inside an open mapping (see above)."""
    parts = dotted.split(".")
    keys: list[str] = []
    node: Any = tree
    start = 0
    while start < len(parts):
        end = start + 1
        if isinstance(node, Mapping) and _is_open(_dotted(keys), open_paths):
            end = next((stop for stop in range(len(parts), start, -1)
                        if ".".join(parts[start:stop]) in node), len(parts))
        key = ".".join(parts[start:end])
        keys.append(key)
        node = node.get(key) if isinstance(node, Mapping) else None
        start = end
    return keys


def _refuse(name: str | None, problem: str) -> OverrideError:
    return OverrideError(f"{name}: {problem}" if name else problem, [problem])


def _check_shape(path: str, current: Any, value: Any) -> str | None:
    """Why `value` cannot replace `current` (a section only by a mapping or null), if it cannot."""
    if isinstance(current, Mapping) and value is not None and not isinstance(value, Mapping):
        keys = truncated(", ".join(sorted(map(str, current))))
        return f"'{path}' is a section ({keys}); give its keys, not the value {shown(value)}"
    if isinstance(value, Mapping) and current is not None and not isinstance(current, Mapping):
        return f"'{path}' is a value ({shown(current)}), not a section"
    return None


def _place(tree: dict, keys: Sequence[Any], value: Any, name: str | None, open_paths: Collection[str]) -> None:
    """Set `tree[k0][k1]...` to a copy of `value`, every key but a new open-mapping entry existing."""
    node: Any = tree
    for depth, key in enumerate(keys):
        here = _dotted(keys[:depth])
        if not isinstance(node, dict):
            raise _refuse(name, f"'{here}' is not a section (it is {shown(node)}); set it as a whole")
        opened = _is_open(here, open_paths)
        last = depth == len(keys) - 1
        if key not in node and not (opened and last):
            allowed = truncated(", ".join(sorted(map(str, node))), MAX_ERROR_LINE)
            level = f"in {here}" if here else "at the top level"
            raise _refuse(name, f"unknown key '{truncated(_dotted(keys[:depth + 1]))}'; allowed {level}: {allowed}")
        if not last:
            node = node[key]
            continue
        problem = None if opened else _check_shape(_dotted(keys), node.get(key), value)
        if problem:
            raise _refuse(name, problem)
        node[key] = copy.deepcopy(value)


def set_dotted(tree: dict, dotted: str, value: Any, *, name: str | None = None,
               open_paths: Collection[str] = OPEN_MAPPINGS) -> None:
    """Set the dotted key in the raw params `tree` to a copy of `value`, in place.

    OverrideError (prefixed with `name`, the override as its author knows it) for a key that does
    not exist (listing the keys allowed at that level), one that runs through a value, a section
    given a value, or a value given a mapping. A section given a mapping is replaced whole.
    """
    _place(tree, _keys(tree, dotted, open_paths), value, name, open_paths)


def merge_tree(base: Mapping[str, Any], overlay: Mapping[str, Any], *,
               open_paths: Collection[str] = OPEN_MAPPINGS) -> dict[str, Any]:
    """`base` with `overlay` (a tree nested like it) merged in; neither is modified.

    A mapping merges key by key into the mapping it meets; every other value (and a mapping that
    meets no mapping, e.g. a new `profile.models` entry or a section that was null) is set at its
    path with `set_dotted`'s rules.
    """
    merged = copy.deepcopy(dict(base))
    for keys, value in list(_leaves(base, overlay, ())):
        _place(merged, keys, value, None, open_paths)
    return merged


def _leaves(base: Any, overlay: Mapping, keys: tuple) -> Iterator[tuple[tuple, Any]]:
    for key, value in overlay.items():
        current = base.get(key) if isinstance(base, Mapping) else None
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            yield from _leaves(current, value, (*keys, key))
        else:
            yield (*keys, key), value


# -- overrides on validated params --------------------------------------------------------------

def _concerns(dotted: str, path: str) -> bool:
    return path == dotted or path.startswith(dotted + ".") or dotted.startswith(path + ".")


def validate_overridden(raw: dict, names: Mapping[str, str], source: str) -> Params:
    """`raw` validated; InvalidOverride blames the overrides (dotted key -> name) whose keys the
    problems concern, or all of them when none does (a rule that ties several settings together)."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
        paths = [_dotted(err["loc"]) for err in exc.errors()]
        blamed = list(dict.fromkeys(name for path in paths for dotted, name in names.items()
                                    if _concerns(dotted, path))) or list(names.values())
        message = f"{source}: invalid configuration\n" + "\n".join("  " + line for line in problems)
        raise InvalidOverride(f"{', '.join(blamed)}: {message}" if blamed else message, problems) from None


def with_overrides(params: Params, overrides: Mapping[str, Any], where: str,
                   source: str | None = None) -> Params:
    """`params` with each dotted key of `overrides` set, validated. An override is named
    `<where>.<key>` in errors (its key alone when `where` is empty); `source` names the result in
    a validation error (default: `where`)."""
    raw = params.model_dump(mode="json")
    names = {}
    for dotted, value in overrides.items():
        names[dotted] = f"{where}.{dotted}" if where else dotted
        set_dotted(raw, dotted, value, name=names[dotted])
    return validate_overridden(raw, names, source or where or "params")


# -- a run's own directory ----------------------------------------------------------------------

# Every output of a training run, and where it goes under the run's directory. The inputs stay
# shared (prepared data, cache, weights), and so do the outputs of the commands that relocate runs
# (seeds, compare, sweep) and of the stand-alone ones (calibrate).
RUN_OUTPUTS = {**{f"paths.{name}": name for name in PathsConfig.model_fields},
               "rank.out_dir": "ranking", "evaluate.out": "metrics/summary.json"}


def relocated(params: Params, run_dir: str | Path, seed: int | None = None) -> Params:
    """`params` with every output (RUN_OUTPUTS) inside `run_dir`, and `engine.seed` = `seed` if given."""
    overrides: dict[str, Any] = {key: str(Path(run_dir) / under) for key, under in RUN_OUTPUTS.items()}
    if seed is not None:
        overrides["engine.seed"] = seed
    return with_overrides(params, overrides, where="", source=f"seed {seed}" if seed is not None else str(run_dir))


# -- identity -----------------------------------------------------------------------------------

def identity(tree_or_params: Any, length: int | None = None) -> str:
    """The sha256 of a params tree (or of validated params, or any part of them) as canonical JSON,
    keys sorted, in hex; its first `length` digits if given. Equal trees, in any key order, give
    equal identities, and checkpoints, run records and shared directories are matched by them:
    changing the encoding would make every stored one a stranger."""
    tree = tree_or_params.model_dump(mode="json") if isinstance(tree_or_params, BaseModel) else tree_or_params
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:length]
