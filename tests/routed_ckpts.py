"""A checkpoint and its twin whose ranks would disagree on the routing (tests of the routing guard)."""

from pathlib import Path
from typing import Tuple

from moe_mpi import synthetic

#: The router whose weights the twin negates.
NEGATED_KEY = "model.layers.0.mlp.gate.weight"


def negated_router_pair(root: Path, seed: int = 3) -> Tuple[Path, Path]:
    """``(checkpoint, its copy with MoE layer 0's router negated)``, both tiny qwen3_moe of ``seed``.

    A rank that loads the copy routes every token of layer 0 to other
    experts than the ranks that load the original.
    """
    import mlx.core as mx

    real = synthetic.write_checkpoint(root / "model", "qwen3_moe", seed=seed)
    negated = synthetic.write_checkpoint(root / "negated", "qwen3_moe", seed=seed)
    weights = mx.load(str(negated / "model.safetensors"))
    assert NEGATED_KEY in weights, sorted(weights)[:10]
    weights[NEGATED_KEY] = -weights[NEGATED_KEY]
    mx.save_safetensors(str(negated / "model.safetensors"), weights, metadata={"format": "mlx"})
    return real, negated
