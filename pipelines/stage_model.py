"""Loading a network a stage saved (`<paths.models>/<stage>/model.pt`, a run's `best.pt`).

Its own small module because rank and evaluate load models without training anything: their DVC
deps (the files they import) then leave out the engine and the methods.
"""
from __future__ import annotations

from pathlib import Path

import torch

from segshift.components.config import Params
from segshift.components.engine.checkpoint import CheckpointError, load_checkpoint
from segshift.components.models.factory import build_model, check_checkpoint_compatible


def load_stage_model(path: Path, params: Params) -> torch.nn.Module:
    """A saved network (a stage's model.pt or best.pt) in the configured architecture.

    Raises ModelError naming the file when it holds another architecture, width or class count.
    """
    state = load_checkpoint(path)
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: no 'model' entry of weights; expected a segshift model.pt or best.pt")
    # The trained weights replace everything: no need to fetch ImageNet weights again.
    model = build_model(params.model.model_copy(update={"pretrained": None}))
    check_checkpoint_compatible(state["model"], model, str(path))
    model.load_state_dict(state["model"])
    return model
