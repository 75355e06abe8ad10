"""Router statistics: which experts each MoE layer's router chooses, recorded as a model runs.

The router is replicated, so any rank sees the whole routing; rank 0
records it. :func:`record_routing` hands every MoE layer call's routing to a
sink (``sink(layer, inds)``, ``inds`` ``[T, k]`` global expert ids) while it
is open; :class:`RoutingStats` is the usual sink: per layer, the
``(token, slot)`` count of every expert and how often two experts are chosen
for the same token (co-activation). It is saved as JSON in a documented,
versioned format (``docs/balance.md``) that ``moe-mpi balance``, ``--mode
auto`` and ``moe-mpi info`` read.

A file also carries the identity of the model it was recorded on (a digest
of its routers' weights, :func:`moe_mpi.shard.model_identity`), so
that statistics of another model of the same shape are refused
(:meth:`RoutingStats.check_model`) instead of balancing this one by
another's routing. Version 1 files, written before, have none: they are
read and checked by shape only, with a warning.

Recording reads the routing back to numpy (a sync per layer), so it is for
profiling runs, not timed ones.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from .shard import find_moe_blocks

FORMAT = "moe_mpi.routing"
VERSION = 2
#: The versions this moe_mpi reads (1: no "identity").
READABLE_VERSIONS = (1, 2)

Sink = Callable[[int, np.ndarray], None]


class RoutingStats:
    """Per-layer routing counts.

    Attributes:
        counts: Per MoE layer, ``[E]`` (token, slot) pairs routed to each expert.
        coactivation: Per layer, ``[E, E]``: tokens that chose both experts
            (the diagonal is ``counts``).
        tokens: Per layer, the tokens routed.
        top_k: Per layer, the experts chosen per token.
        identity: Of the model the statistics were recorded on
            (:func:`moe_mpi.shard.model_identity`); empty if unknown.
        model: What the file says of that model (``path``, ...), for messages.
        source: The file they were read from, or None.
    """

    def __init__(self, num_experts: Sequence[int]):
        self.counts = [np.zeros(e, dtype=np.int64) for e in num_experts]
        self.coactivation = [np.zeros((e, e), dtype=np.int64) for e in num_experts]
        self.tokens = [0] * len(num_experts)
        self.top_k: List[Optional[int]] = [None] * len(num_experts)
        self.identity: Dict[str, str] = {}
        self.model: Dict[str, Any] = {}
        self.source: Optional[str] = None

    @classmethod
    def for_model(cls, model) -> "RoutingStats":
        """Empty statistics shaped for ``model``'s MoE layers."""
        return cls([moe.num_experts_total for moe in find_moe_blocks(model)])

    @property
    def num_layers(self) -> int:
        return len(self.counts)

    def __call__(self, layer: int, inds: np.ndarray) -> None:
        """Adds one call's routing: ``inds`` ``[T, k]`` global expert ids."""
        inds = np.asarray(inds, dtype=np.int64).reshape(-1, np.shape(inds)[-1])  # [T, k]
        e = self.counts[layer].size
        self.counts[layer] += np.bincount(inds.reshape(-1), minlength=e)
        onehot = np.zeros((inds.shape[0], e), dtype=np.int64)  # [T, E]
        np.put_along_axis(onehot, inds, 1, axis=1)
        self.coactivation[layer] += onehot.T @ onehot
        self.tokens[layer] += inds.shape[0]
        self.top_k[layer] = inds.shape[1]

    def frequencies(self, layer: int) -> np.ndarray:
        """``[E]``: the share of the layer's slots each expert got (sums to 1; uniform if none yet)."""
        counts = self.counts[layer].astype(np.float64)
        total = counts.sum()
        return counts / total if total else np.full(counts.size, 1.0 / counts.size)

    def to_dict(self, model: Optional[Dict[str, Any]] = None, identity: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": model or self.model or {},
            "identity": identity or self.identity or None,
            "layers": [
                {
                    "layer": i,
                    "num_experts": int(c.size),
                    "top_k": k,
                    "tokens": int(t),
                    "counts": c.tolist(),
                    "coactivation": co.tolist(),
                }
                for i, (c, co, t, k) in enumerate(zip(self.counts, self.coactivation, self.tokens, self.top_k))
            ],
        }

    def save(self, path, model: Optional[Dict[str, Any]] = None, identity: Optional[Dict[str, str]] = None) -> None:
        """Writes the statistics as JSON (:data:`FORMAT`, :data:`VERSION`).

        ``model`` describes the model recorded on; ``identity`` identifies it
        (:func:`moe_mpi.shard.model_identity`). Without one the file
        can be checked by shape only.

        Atomically (a temporary file, then a rename): a server that saves
        between requests and is then killed leaves the last whole file.

        Raises:
            UserError: The file could not be written; the statistics were
                saved to another file, which the message names.
        """
        from .results import save_text

        save_text(path, json.dumps(self.to_dict(model, identity)) + "\n", "the router statistics file")

    @classmethod
    def load(cls, path) -> "RoutingStats":
        """Reads a statistics file.

        Raises:
            ValueError: Not a routing statistics file, a version this moe_mpi
                does not read, or inconsistent.
        """
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a moe_mpi routing statistics file (no \"format\": \"{FORMAT}\")")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{path}: routing statistics version {version!r}; this moe_mpi reads "
                + ", ".join(map(str, READABLE_VERSIONS))
            )
        identity = data.get("identity") if version >= 2 else None
        if identity is not None and not (
            isinstance(identity, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in identity.items())
        ):
            raise ValueError(f'{path}: "identity" must be an object of strings (or null)')
        layers = data.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"{path}: no layers")
        try:
            stats = cls([int(layer["num_experts"]) for layer in layers])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: every layer needs a positive integer \"num_experts\"") from None
        for i, layer in enumerate(layers):
            try:
                counts = np.asarray(layer["counts"], dtype=np.int64)
                if counts.shape != stats.counts[i].shape or (counts < 0).any():
                    raise ValueError
                stats.counts[i] = counts
                co = layer.get("coactivation")
                if co is not None:
                    stats.coactivation[i] = np.asarray(co, dtype=np.int64).reshape(counts.size, counts.size)
                stats.tokens[i] = int(layer.get("tokens", 0))
            except (KeyError, TypeError, ValueError, OverflowError):
                raise ValueError(
                    f"{path}: layer {i}: expected \"counts\" ({stats.counts[i].size} non-negative integers), "
                    f"an optional {stats.counts[i].size}x{stats.counts[i].size} \"coactivation\" and an integer \"tokens\""
                ) from None
            stats.top_k[i] = layer.get("top_k")
        stats.identity = dict(identity or {})
        stats.model = data["model"] if isinstance(data.get("model"), dict) else {}
        stats.source = str(path)
        return stats

    def check_fits(self, num_experts: Sequence[int], where: str = "the statistics") -> None:
        """Raises ``ValueError`` unless the statistics are for a model with these MoE layers."""
        mine = [c.size for c in self.counts]
        if list(mine) != list(num_experts):
            raise ValueError(
                f"{where} are for {len(mine)} MoE layers of {sorted(set(mine))} experts; the model has "
                f"{len(num_experts)} MoE layers of {sorted(set(num_experts))} experts"
            )

    def check_model(self, identity: Dict[str, str]) -> Optional[str]:
        """Checks that the statistics were recorded on the model ``identity`` identifies.

        Args:
            identity: The model's (:func:`moe_mpi.shard.model_identity`).

        Returns:
            None, or a warning when the statistics cannot tell (a version 1
            file, or one written without a model): they are then checked by
            shape only (:meth:`check_fits`).

        Raises:
            ValueError: They were recorded on another model, naming it.
        """
        name = f"the router statistics {self.source}" if self.source else "the router statistics"
        common = sorted(k for k in identity if k in self.identity)
        if not common:
            return (
                f"{name} carry no identity of the model they were recorded on (written by an older moe_mpi "
                "or without a model): they are checked against this model's shape only; record them "
                "again (moe-mpi profile) to have them checked"
            )
        for key in common:
            if identity[key] != self.identity[key]:
                on = f" ({self.model['path']})" if self.model.get("path") else ""
                raise ValueError(
                    f"{name} were recorded on another model{on}: its {key} differ from this model's "
                    f"(digest {self.identity[key]} in the file, {identity[key]} here); record statistics on "
                    "this model (moe-mpi profile --model ...)"
                )
        return None


def _recording_class(cls: type, sink: Sink, layer: int) -> type:
    """``cls`` whose calls hand their routing to ``sink`` before computing."""

    class Recording(cls):
        def __call__(self, x, indices, *args, **kwargs):
            sink(layer, np.asarray(indices).reshape(-1, indices.shape[-1]))  # [T, k]
            return super().__call__(x, indices, *args, **kwargs)

    return Recording


def _recording_route(block, sink: Sink, layer: int):
    """A numpy decode step's ``block.route`` that hands its routing to ``sink``."""
    route = type(block).route

    def recording(h, *logits):
        inds, scores = route(block, h, *logits)
        sink(layer, inds)
        return inds, scores

    return recording


@contextlib.contextmanager
def record_routing(model, sink: Sink) -> Iterator[None]:
    """Hands every MoE layer call's routing to ``sink(layer, inds)`` while open.

    Covers the switch layers (any mode, or a plain mlx-lm model) and the
    numpy decode step, which routes without calling them. A no-op for
    ``model`` None (ranks that do not record).
    """
    switches, blocks = [], []
    if model is not None:
        for layer, moe in enumerate(find_moe_blocks(model)):
            switch = moe.switch
            switches.append((switch, type(switch)))
            switch.__class__ = _recording_class(type(switch), sink, layer)
        path = getattr(model, "cpu_path", None)
        step = path.decode_step if path is not None else None
        moe_layers = [layer.mlp for layer in step.layers if hasattr(layer.mlp, "route")] if step else []
        for layer, block in enumerate(moe_layers):
            block.route = _recording_route(block, sink, layer)
            blocks.append(block)
    try:
        yield
    finally:
        for switch, cls in switches:
            switch.__class__ = cls
        for block in blocks:
            del block.route  # the class's own again
