"""`segshift evaluate` (placeholder: being written)."""
from __future__ import annotations


def build_evaluate_parser(sub, add_params) -> None:
    parser = sub.add_parser("evaluate", help="(not yet implemented)")
    add_params(parser)
