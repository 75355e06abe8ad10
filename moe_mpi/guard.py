"""The routing guard: ranks agree on the routing, checked in the layer's own all-reduce.

The router is replicated: every rank computes the routing itself, and the
partial sums add up to the block's output only if every rank chose the same
experts for every token. Ranks on different hardware (an M2 and an M4), or
running different kernels (the numpy decode step against MLX), can round a
near-tie between two experts differently; then one expert's output is
counted twice or not at all, and the output is wrong without an error.

The guard adds ``N`` float32 columns (``N`` ranks) to each MoE layer's one
all-reduce: rank ``r`` writes a hash of each token's chosen experts (an
integer below 2**24, exact in float32, independent of the experts' order)
into column ``r`` and zeros elsewhere, so after the sum every rank holds
every rank's hash of every token, bit for bit, and all ranks reach the same
verdict at the same layer. No extra message: ``N`` values per token ride in
a message of ``D`` (the hidden size, thousands).

On a divergence (every rank sees it at once):

* by default the layer is redone with rank 0's routing: rank 0 computes its
  router logits again (the same input, so the same logits) and broadcasts
  them, every rank routes from them, and the layer's all-reduce runs again,
  guarded. Broadcast and second all-reduce happen on this rare path only;
  :attr:`RoutingGuard.repairs` counts them. If the redone layer still
  diverges (ranks whose softmax or top-k kernels disagree on identical
  logits), it is an error;
* with ``strict`` it is an error at once: a :class:`CollectiveError` raised
  on every rank, naming the layer and the ranks.

Costs on the hot path: the routing's hash in numpy (the switch layer's
routing, kept by :class:`RoutingTap` and already evaluated when the
layer's partial sum is) and a copy of the partial sum into the wider
message. ``moe-mpi bench decode`` measures
the guard (docs/reliability.md). The guard needs the mpi4py all-reduce path
(``backend="mpi4py"``, the default); :func:`guard_routing` refuses others.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import mlx.core as mx
import numpy as np

from .errors import CollectiveError
from .experts import with_mixin
from .shard import find_moe_blocks

__all__ = ["RoutingGuard", "guard_routing", "routing_hash"]

# A fixed odd multiplier and a prime below 2**24: hashes are exact in float32.
_MIX = np.uint64(0x9E3779B1)
_PRIME = np.uint64(16777213)


def routing_hash(inds: np.ndarray) -> np.ndarray:
    """``[T, k]`` expert ids -> ``[T]`` float32 integers in ``[1, 2**24)``, order-independent."""
    mixed = ((inds.astype(np.uint64) + np.uint64(1)) * _MIX) % _PRIME  # [T, k]
    return (mixed.sum(axis=-1) % _PRIME + np.uint64(1)).astype(np.float32)


class RoutingTap:
    """Mixin for a guarded switch layer: keeps the routing of its last call for the guard to hash."""

    def __call__(self, x, indices):
        self.__dict__["last_indices"] = indices
        return super().__call__(x, indices)


class FixedLogits:
    """Mixin for a router layer: returns the logits it was given (a redo with rank 0's routing)."""

    def __call__(self, x):
        return self.__dict__["fixed_logits"]


class RoutingGuard:
    """One model's guard, shared by its MoE layers (:func:`guard_routing` installs it).

    Attributes:
        comm: The communicator of the layers' all-reduce.
        strict: Divergence is an error instead of a repair.
        repairs: Layers redone with rank 0's routing, so far.
        events: ``(layer, ranks that differed from rank 0, tokens)`` per repair (the first 100).
    """

    def __init__(self, comm, strict: bool = False):
        self.comm = comm
        self.strict = strict
        self.repairs = 0
        self.events: List[tuple] = []

    def _extra(self, inds: np.ndarray) -> np.ndarray:
        extra = np.zeros((inds.shape[0], self.comm.size), dtype=np.float32)  # [T, N]
        extra[:, self.comm.rank] = routing_hash(inds)
        return extra

    def _verdict(self, hashes: np.ndarray, layer: int) -> Optional[tuple]:
        """None if every rank routed every token alike, else (ranks that differ from rank 0, tokens)."""
        same = hashes == hashes[:, :1]  # [T, N]
        if same.all():
            return None
        ranks = [int(r) for r in np.flatnonzero(~same.all(axis=0))]
        tokens = int((~same.all(axis=1)).sum())
        if self.strict:
            raise CollectiveError(
                f"MoE layer {layer}: {_ranks(ranks)} routed {tokens} token(s) differently from rank 0 "
                "(--strict-routing; without it the layer is redone with rank 0's routing)"
            )
        return ranks, tokens

    def _record(self, layer: int, ranks: List[int], tokens: int) -> None:
        self.repairs += 1
        if len(self.events) < 100:
            self.events.append((layer, ranks, tokens))

    def _unrepaired(self, layer: int, ranks: List[int]) -> CollectiveError:
        return CollectiveError(
            f"MoE layer {layer}: {_ranks(ranks)} still route differently from rank 0 with rank 0's "
            "router logits: their top-k or softmax kernels disagree; run every rank on the same hardware and software"
        )

    # ------------------------------------------------------------ MLX path

    def block_all_sum(self, block, x, partial, args, kwargs):
        """The guarded all-reduce of an :class:`~moe_mpi.shard.ExpertParallelBlock` call."""
        switch = block[_switch_name(block)]
        inds = np.asarray(switch.__dict__["last_indices"])  # [..., k]: RoutingTap kept it; the partial sum needed it
        k = inds.shape[-1]
        out, hashes = self.comm.all_sum_extra(partial, self._extra(inds.reshape(-1, k)))
        layer = block.expert_shard.layer
        verdict = self._verdict(hashes, layer)
        if verdict is None:
            return out
        ranks, tokens = verdict
        self._record(layer, ranks, tokens)
        router = _router(block)
        if router is None:
            raise CollectiveError(
                f"MoE layer {layer}: {_ranks(ranks)} routed {tokens} token(s) differently from rank 0, and "
                f"this block ({type(block).__name__}) has no router layer to redo it with rank 0's routing"
            )
        logits = self._rank0_logits(router(x) if self.comm.rank == 0 else None)
        with _fixed(router, logits):
            partial = block.partial_sum(x, *args, **kwargs)  # the mlx-lm block, this rank's share
        inds = np.asarray(switch.__dict__["last_indices"])
        out, hashes = self.comm.all_sum_extra(partial, self._extra(inds.reshape(-1, k)))
        if not (hashes == hashes[:, :1]).all():
            raise self._unrepaired(layer, ranks)
        return out

    def _rank0_logits(self, logits: Optional[mx.array]) -> mx.array:
        """Rank 0's router logits on every rank (the rare path's one broadcast)."""
        payload = None
        if logits is not None:
            host = np.asarray(logits.astype(mx.float32))
            payload = {"shape": list(host.shape), "dtype": str(logits.dtype).rsplit(".", 1)[-1], "data": host.tobytes()}
        payload = self.comm.bcast(payload)
        host = np.frombuffer(payload["data"], dtype=np.float32).reshape(payload["shape"])
        return mx.array(host).astype(getattr(mx, payload["dtype"]))  # exact: widened from that dtype

    # ---------------------------------------------------------- numpy path

    def numpy_all_sum(self, moe, h: np.ndarray, inds: np.ndarray, partial: np.ndarray, redo) -> np.ndarray:
        """The guarded all-reduce of the numpy decode step's MoE layer (:class:`moe_mpi.cpu.decode.NumpyMoE`).

        ``redo(gates)`` recomputes the partial sum routed from the given router logits.
        """
        layer = moe.switch.expert_shard.layer
        out, hashes = self.comm.all_sum_extra(partial, self._extra(inds))
        verdict = self._verdict(hashes, layer)
        if verdict is None:
            return out
        ranks, tokens = verdict
        self._record(layer, ranks, tokens)
        gates = moe.logits(h) if self.comm.rank == 0 else None
        payload = self.comm.bcast(None if gates is None else {"shape": list(gates.shape), "data": gates.tobytes()})
        gates = np.frombuffer(payload["data"], dtype=np.float32).reshape(payload["shape"])
        inds, partial = redo(gates)
        out, hashes = self.comm.all_sum_extra(partial, self._extra(inds))
        if not (hashes == hashes[:, :1]).all():
            raise self._unrepaired(layer, ranks)
        return out


def _ranks(ranks: List[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _switch_name(block) -> str:
    return block.__dict__["switch_name"]


def _router(block):
    """The block's router layer: a child named ``gate`` or ``router`` with a weight of ``[E, D]``."""
    for name in ("gate", "router"):
        child = block.get(name) if hasattr(block, "get") else None
        if child is not None and hasattr(child, "weight") and callable(child):
            return child
    return None


@contextlib.contextmanager
def _fixed(router, logits: mx.array) -> Iterator[None]:
    cls = type(router)
    router.__dict__["fixed_logits"] = logits
    router.__class__ = with_mixin(FixedLogits, cls)
    try:
        yield
    finally:
        router.__class__ = cls
        del router.__dict__["fixed_logits"]


def guard_routing(model, comm=None, strict: bool = False) -> RoutingGuard:
    """Installs a routing guard on every MoE layer of a sharded model (both decode paths).

    Raises:
        ValueError: The layers' communicator uses the ``"mlx"`` backend.
    """
    blocks = find_moe_blocks(model)
    comm = comm or blocks[0].block.expert_shard.comm
    if comm.backend != "mpi4py":
        raise ValueError(f"the routing guard needs the mpi4py all-reduce, not backend={comm.backend!r}")
    guard = RoutingGuard(comm, strict)
    for moe in blocks:
        moe.block.__dict__["routing_guard"] = guard
        moe.block.__dict__["switch_name"] = moe.switch_name
        # In front of every other mixin (the CPU kernels answer one token without LocalExperts).
        moe.switch.__class__ = with_mixin(RoutingTap, type(moe.switch))
    path = getattr(model, "cpu_path", None)
    step = path.decode_step if path is not None else None
    if step is not None:
        for layer in step.layers:
            if hasattr(layer.mlp, "route"):
                layer.mlp.guard = guard
    return guard
