"""`segshift dvc-yaml [--check]`: write dvc.yaml from the stage table (pipelines/stages.py).

Each stage's deps are the data it needs and the source files of every module its command runs
(pipelines/imports.py: the closure of the stage's module, lazy imports included), so deps
follow the code: a new import is a new dep once dvc.yaml is regenerated, and
tests/pipelines/test_stages.py fails while the committed dvc.yaml differs from this output.
The command line (pipelines/cli.py) is left out: it parses arguments and imports every
command's module, so counting it would make every stage depend on all the code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from segshift.pipelines.imports import REPO, ImportGraph
from segshift.pipelines.stages import STAGES, Stage

HEADER = """\
# The pipeline: prepare -> train(source) -> train(inter) -> rank -> train(intra) -> evaluate.
# Every stage is a `segshift` sub-command reading params.yaml; run all with `dvc repro`.
# Generated from pipelines/stages.py by `segshift dvc-yaml`: edit the table, then run it.
"""


class _IndentedLists(yaml.SafeDumper):
    """Lists indented under their key, as dvc.yaml has always been written."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def code_deps(stage: Stage, graph: ImportGraph) -> list[str]:
    """The source files of every module the stage's module imports, itself included."""
    return graph.files(graph.closure(stage.module))


def stage_entry(stage: Stage, graph: ImportGraph) -> dict:
    entry: dict = {"cmd": stage.command, "params": list(stage.params),
                   "deps": [*stage.needs, *code_deps(stage, graph)]}
    if stage.outs:
        entry["outs"] = list(stage.outs)
    if stage.metrics:
        entry["metrics"] = [{path: {"cache": False}} for path in stage.metrics]
    if stage.plots:
        entry["plots"] = [{path: {"cache": False, **options}} for path, options in stage.plots]
    return entry


def render(root: Path = REPO) -> str:
    """dvc.yaml's text: the header, then each stage of the table, a blank line between them."""
    graph = ImportGraph(root)
    blocks = [yaml.dump({name: stage_entry(stage, graph)}, Dumper=_IndentedLists, sort_keys=False,
                        indent=2, width=120)
              for name, stage in STAGES.items()]
    indented = ["".join(f"  {line}" if line.strip() else line for line in block.splitlines(keepends=True))
                for block in blocks]
    return HEADER + "stages:\n" + "\n".join(indented)


def _cmd_dvc_yaml(args: argparse.Namespace) -> int:
    path = Path(args.output)
    text = render(path.resolve().parent)     # deps are paths relative to dvc.yaml's folder
    if args.check:
        if path.is_file() and path.read_text() == text:
            print(f"{path} is up to date with pipelines/stages.py")
            return 0
        print(f"{path} differs from pipelines/stages.py and the code's imports; run `segshift dvc-yaml`",
              file=sys.stderr)
        return 1
    path.write_text(text)
    print(f"wrote {path} ({len(STAGES)} stages)")
    return 0


def build_dvc_yaml_parser(sub) -> None:
    parser = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage table (pipelines/stages.py)")
    parser.add_argument("--output", default="dvc.yaml", metavar="PATH", help="where to write (default: dvc.yaml)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the file differs from what would be written")
    parser.set_defaults(func=_cmd_dvc_yaml)
