"""The pipeline's stages by name, in the order `dvc repro` runs them.

Only names and order live here, because the params schema (components/config.py) validates stage
names and the library never imports the pipelines. What each stage runs, reads and writes is the
stage table, pipelines/stages.py, which the CLI, `segshift seeds`, `segshift compare` and the
generated dvc.yaml all follow.
"""
from __future__ import annotations

PIPELINE = ("prepare", "source", "oracle", "inter", "rank", "intra", "evaluate")
TRAINING = ("source", "oracle", "inter", "intra")   # `segshift train --stage`: a model each
# What one run of `segshift seeds` or `segshift compare` strings together on the prepared data.
ON_PREPARED = tuple(stage for stage in PIPELINE if stage != "prepare")
# The stages a compare entry may list: it reports its last training stage, not a summary.
COMPARABLE = tuple(stage for stage in ON_PREPARED if stage != "evaluate")
