"""The stage table: what each DVC stage runs, reads and writes, in the pipeline's order.

dvc.yaml is generated from it (`segshift dvc-yaml`, pipelines/dvc_yaml.py): a stage's deps are
the data it `needs` plus every source file its `module` imports, directly or not, so a change to
any code a stage runs makes `dvc status` report the stage. The stage names and their order are
components/stages.py's, which the params schema, `segshift seeds`, `segshift compare` and
`segshift train --stage` use; tests/pipelines/test_stages.py holds the table to them and to the CLI.

Paths use dvc.yaml's `${...}` templating, resolved by DVC from params.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from segshift.components.stages import TRAINING

PARAMS = "--params params.yaml"


@dataclass(frozen=True)
class Stage:
    """One DVC stage."""

    name: str
    command: str                    # the `segshift` command line DVC runs
    module: str                     # the pipelines module whose code the command runs
    params: tuple[str, ...]         # the params.yaml sections (or dotted keys) it reads
    needs: tuple[str, ...] = ()     # the prepared data and earlier stages' outputs it reads
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()   # small JSON files, kept in git rather than the DVC cache
    plots: tuple[tuple[str, dict[str, str]], ...] = field(default=())   # (JSON file, `dvc plots` options)

    @property
    def trains(self) -> bool:
        return self.name in TRAINING


def training_stage(name: str, params: tuple[str, ...], needs: tuple[str, ...]) -> Stage:
    """`segshift train --stage <name>`: a model, its report, its metrics and a per-class plot."""
    return Stage(name, f"segshift train --stage {name} {PARAMS}", "segshift.pipelines.train",
                 params=("model", "engine", name, *params, "storage"),
                 needs=("${prepare.out_dir}", *needs),
                 outs=(f"${{paths.models}}/{name}", f"${{paths.reports}}/{name}"),
                 metrics=(f"${{paths.metrics}}/{name}.json",),
                 plots=((f"${{paths.metrics}}/{name}_per_class.json", {"x": "class", "y": "iou"}),))


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("prepare", f"segshift prepare {PARAMS}", "segshift.pipelines.prepare",
          params=("prepare",), outs=("${prepare.out_dir}",)),
    training_stage("source", (), ()),
    training_stage("oracle", (), ()),
    training_stage("inter", ("methods",), ("${paths.models}/source",)),
    Stage("rank", f"segshift rank {PARAMS}", "segshift.pipelines.rank",
          params=("rank", "model", "engine.device", "engine.eval_batch_size"),
          needs=("${prepare.out_dir}", "${paths.models}/inter"),
          outs=("${rank.out_dir}", "${paths.reports}/rank"), metrics=("${paths.metrics}/rank.json",)),
    training_stage("intra", ("methods",), ("${rank.out_dir}", "${paths.models}/inter")),
    Stage("evaluate", f"segshift evaluate {PARAMS}", "segshift.pipelines.evaluate",
          params=("evaluate", "model", "engine.device", "engine.eval_batch_size"),
          needs=("${prepare.out_dir}", *(f"${{paths.models}}/{s}" for s in ("source", "inter", "intra", "oracle"))),
          outs=("${paths.reports}/evaluate",), metrics=("${evaluate.out}",),
          plots=(("${paths.metrics}/summary_per_class.json",
                  {"template": "bar_horizontal", "x": "iou", "y": "class"}),)),
)}
