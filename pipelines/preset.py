"""`segshift preset`: switch params.yaml to a named recipe (e.g. GTA5 -> Cityscapes, paper settings).

A preset is an OVERLAY: a YAML file nested like params.yaml holding only the keys it changes
(`presets/gta5-cityscapes.yaml`, `presets/synthia-cityscapes.yaml`). The command deep-merges it
onto the current params file, applies `-S key=value` overrides (values parsed as YAML, as
`dvc exp run -S` does), validates the result with the one typed configuration and writes it
atomically, so the same `dvc.yaml` runs the built-in data or a real benchmark:

    segshift preset gta5-cityscapes -S prepare.source.root=/data/gta5 \\
        -S prepare.target.root=/data/cityscapes -S model.pretrained=weights/resnet101.pth
    dvc repro

Unknown keys (in the preset or in `-S`) are errors naming the file and the key; only the open
mappings of params.yaml (e.g. `profile.models`) accept new keys.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from segshift.components.config import ConfigError, Params, load_yaml_file, parse_yaml, validate_params
from segshift.components.derive import OPEN_MAPPINGS, OverrideError, merge_tree, set_dotted
from segshift.components.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PRESET_DIR = "presets"
PRESET_SUFFIXES = (".yaml", ".yml")


class PresetError(ConfigError):
    """A preset that cannot be applied; the message names the preset file and the key."""


# --- pure merge logic (the rules are components/derive.py's, as for every dotted override) ------

def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` -> (key.path, value parsed as YAML: 3 -> int, [1, 2] -> list, null -> None)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise PresetError(f"override '{text}': expected KEY=VALUE with a dotted key, "
                          "e.g. prepare.source.root=/data/gta5")
    try:
        value = parse_yaml(raw, f"override '{text}'", PresetError) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise PresetError(f"override '{text}': value is not valid YAML ({exc})") from None
    return key, value


def apply_overrides(params: Mapping[str, Any], overrides: Iterable[str | tuple[str, Any]], *,
                    open_paths: Collection[str] = OPEN_MAPPINGS) -> dict[str, Any]:
    """`params` with each override (`"key=value"` text or a (dotted key, value) pair) applied in
    order (`set_dotted`: keys must exist; a section given a mapping is replaced whole); a later
    override of the same key wins."""
    result = copy.deepcopy(dict(params))
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        try:
            set_dotted(result, key, value, name=f"override {key}", open_paths=open_paths)
        except OverrideError as exc:
            raise PresetError(str(exc)) from None
    return result


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{a: {b: 1}} -> {"a.b": 1}; non-mapping values are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def changed_keys(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every leaf whose value differs (absent = None)."""
    old, new = flatten(before), flatten(after)
    return {k: (old.get(k), new.get(k)) for k in [*old, *(k for k in new if k not in old)]
            if old.get(k) != new.get(k)}


# --- files -----------------------------------------------------------------------------------------

def available_presets(search: Iterable[Path]) -> list[str]:
    names = {p.stem for d in search if d.is_dir() for p in d.iterdir() if p.suffix in PRESET_SUFFIXES}
    return sorted(names)


def preset_search_dirs(cwd: Path | None = None) -> list[Path]:
    """Where a preset NAME is looked up: ./presets of the project, then the package's presets/."""
    dirs = [Path(cwd or Path.cwd()) / PRESET_DIR, REPO / PRESET_DIR]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def resolve_preset(preset: str, cwd: Path | None = None) -> Path:
    """A path to an existing file, or a NAME looked up as presets/NAME.yaml (see preset_search_dirs)."""
    as_path = Path(preset).expanduser()
    if as_path.is_file():
        return as_path
    looks_like_path = "/" in preset or as_path.suffix in PRESET_SUFFIXES
    search = preset_search_dirs(cwd)
    if not looks_like_path:
        for directory in search:
            for suffix in PRESET_SUFFIXES:
                candidate = directory / f"{preset}{suffix}"
                if candidate.is_file():
                    return candidate
    names = available_presets(search)
    listed = ", ".join(names) if names else "none found"
    where = " or ".join(str(d) for d in search)
    raise PresetError(f"preset '{preset}' not found: not a file, and no {preset}.yaml in {where} "
                      f"(available: {listed})")


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = load_yaml_file(path, what, PresetError)
    except FileNotFoundError:
        raise PresetError(f"{path}: {what} not found") from None
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise PresetError(f"{path}: expected a non-empty mapping nested like params.yaml, "
                          f"got {type(raw).__name__}")
    return raw


def merge_preset(params: Mapping[str, Any], overlay: Mapping[str, Any], overrides: Iterable[str] = (),
                 preset_name: str = "preset") -> tuple[dict[str, Any], Params]:
    """(merged raw mapping, validated Params); PresetError/ConfigError name `preset_name` and the key."""
    overrides = list(overrides)
    try:
        merged = merge_tree(params, overlay)
    except OverrideError as exc:
        raise PresetError(f"{preset_name}: {exc}") from None
    merged = apply_overrides(merged, overrides)
    with_overrides = f" with {len(overrides)} -S override(s)" if overrides else ""
    try:
        validated = validate_params(merged, source=f"{preset_name}{with_overrides}")
    except ConfigError as exc:
        raise PresetError(str(exc)) from None
    return merged, validated


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class _ParamsDumper(yaml.SafeDumper):
    """Sections in block style, lists of scalars inline (`resize: [1280, 720]`), as params.yaml."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(item, (dict, list, tuple)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ParamsDumper.add_representer(list, _represent_list)
_ParamsDumper.add_representer(tuple, _represent_list)


def render_params(merged: Mapping[str, Any], preset_path: Path, command: str) -> str:
    header = (
        f"# segshift parameters: preset {_display(preset_path)} merged onto the previous params file by\n"
        f"#   {command}\n"
        "# Every key is documented in the repository's params.yaml (built-in defaults) and in the preset.\n"
        "# Vary with `dvc exp run -S key=value`; switch recipe with `segshift preset NAME`.\n\n")
    body = yaml.dump(dict(merged), Dumper=_ParamsDumper, sort_keys=False, width=100, allow_unicode=True)
    # A blank line between top-level sections, as in the hand-written params.yaml.
    lines = body.splitlines()
    spaced = [("\n" + line) if i and line[:1].isalpha() else line for i, line in enumerate(lines)]
    return header + "\n".join(spaced) + "\n"


def missing_local_inputs(params: Params, base_dir: Path) -> list[str]:
    """Local dataset roots and weights named by `params` that do not exist (yet), as 'key: path'.

    Not an error: the data may be mounted later or on another machine; s3:// URIs are not checked.
    """
    wanted = [(f"prepare.{role}.root", getattr(params.prepare, role).root) for role in ("source", "target")]
    wanted.append(("model.pretrained", params.model.pretrained))
    missing = []
    for key, value in wanted:
        if not value or "://" in value:
            continue
        path = Path(value).expanduser()
        if not (path if path.is_absolute() else base_dir / path).exists():
            missing.append(f"{key}: {value}")
    return missing


def apply_preset(preset: str, params_path: str | Path = "params.yaml", output: str | Path | None = None,
                 overrides: Sequence[str] = (), command: str | None = None) -> tuple[Path, Params, dict]:
    """Merge `preset` (+ overrides) onto `params_path`, validate, write `output` (default: in place).

    Returns (written path, validated Params, {dotted key: (old, new)} of what changed).
    """
    params_path = Path(params_path)
    preset_path = resolve_preset(preset)
    base = read_yaml_mapping(params_path, "params file")
    overlay = read_yaml_mapping(preset_path, "preset")
    merged, validated = merge_preset(base, overlay, overrides, preset_name=str(preset_path))
    out = Path(output) if output is not None else params_path
    shown = command or "segshift preset " + " ".join(
        shlex.quote(a) for a in [preset, *(x for o in overrides for x in ("-S", o))])
    atomic_write_text(out, render_params(merged, preset_path, shown))
    return out, validated, changed_keys(base, merged)


# --- command line ----------------------------------------------------------------------------------

def _cmd_preset(args: argparse.Namespace) -> int:
    command = "segshift preset " + " ".join(
        shlex.quote(a) for a in [args.preset, *(x for o in args.set for x in ("-S", o))])
    out, params, changes = apply_preset(args.preset, args.params, args.output, args.set, command)
    print(f"{out}: preset {args.preset} applied ({len(changes)} value(s) changed; "
          f"source {params.prepare.source.kind}, target {params.prepare.target.kind}, "
          f"model {params.model.name}/{params.model.backbone})")
    if not args.quiet:
        for key, (old, new) in changes.items():
            print(f"  {key}: {old!r} -> {new!r}")
    for item in missing_local_inputs(params, Path(out).resolve().parent):
        print(f"segshift preset: warning: {item} does not exist (yet); set it with -S before `dvc repro`",
              file=sys.stderr)
    return 0


def build_preset_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "preset", help="switch params.yaml to a recipe (e.g. gta5-cityscapes, synthia-cityscapes)",
        description="Deep-merge a preset overlay (presets/NAME.yaml or a path) and -S overrides onto "
                    "the params file, validate the result and write it.")
    parser.add_argument("preset", help="preset name (looked up in ./presets and the package's presets/) "
                                       "or a path to an overlay YAML file")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted key after the preset (value parsed as YAML); repeatable")
    parser.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="params file to start from (default: params.yaml)")
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="where to write the result (default: the --params file, in place)")
    parser.add_argument("--quiet", action="store_true", help="do not list the changed values")
    parser.set_defaults(func=_cmd_preset)
    return parser
