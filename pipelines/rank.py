"""`segshift rank` (placeholder: being written)."""
from __future__ import annotations


def build_rank_parser(sub, add_params) -> None:
    parser = sub.add_parser("rank", help="(not yet implemented)")
    add_params(parser)
