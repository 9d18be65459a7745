"""What every segmentation network returns, so methods and the engine can treat them alike."""
from __future__ import annotations

from typing import NamedTuple

import torch


class SegOutput(NamedTuple):
    """Logits at the network's output stride: the main head, and auxiliary heads (deepest last)."""

    main: torch.Tensor
    aux: tuple[torch.Tensor, ...] = ()
