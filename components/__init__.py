"""Reusable, side-effect-free parts: data, models, losses, methods, metrics."""
