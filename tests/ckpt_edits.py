"""Editing a tiny checkpoint on disk in place (tests that need a model with a given defect)."""

from pathlib import Path

import mlx.core as mx


def edit_tensors(path: Path, change) -> Path:
    """``change(weights)`` applied to ``path``'s one model.safetensors in place."""
    file = path / "model.safetensors"
    weights = mx.load(str(file))
    change(weights)
    mx.save_safetensors(str(file), weights, metadata={"format": "mlx"})
    return path
