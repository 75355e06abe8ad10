"""Central-router mode: the design moe_mpi improves on, as a real mode.

This is how the HTTP "main node plus expert workers" prototypes work, done
over MPI. Rank 0 (the driver) holds the dense model and computes attention
and routing. For each MoE layer it sends each expert owner only the tokens
routed to that owner's experts (raw buffers; the metadata as msgpack), runs
its own experts meanwhile, receives the owners' outputs and combines them in
the block's own router-weighted sum. The other ranks hold only their experts
and serve requests until the driver stops them.

That is two communication steps per MoE layer (scatter, gather), both
through rank 0, against one all-reduce in expert-parallel mode. The router
scores stay on rank 0, which applies them in the block's own weighted sum;
owners return one output row per routed (token, slot) pair.

Usage, on every rank::

    model, tok = load(path, comm=comm, mode="central")
    result = drive(model, lambda m: m(tokens))  # rank 0: the result; others: None
"""

import functools
from typing import Callable, Optional, Tuple, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .experts import LocalExperts, with_mixin
from .safetensors_io import dtype_name

# Tags keep requests and replies apart; there is one outstanding exchange
# per worker at a time, so no sequence numbers are needed.
TAG_REQUEST, TAG_ROWS, TAG_REPLY = 11, 12, 13
STOP = "stop"

T = TypeVar("T")


def to_buffer(x: mx.array) -> np.ndarray:
    """A numpy copy of an mlx array (what MPI sends); bfloat16 (which numpy lacks) as its bits."""
    return np.asarray(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)


def from_buffer(a: np.ndarray, dtype: str) -> mx.array:
    """Inverse of :func:`to_buffer` for an array that was ``dtype`` in mlx."""
    return mx.array(a).view(mx.bfloat16) if dtype == "bfloat16" else mx.array(a)


class CentralExperts(LocalExperts):
    """Rank 0's switch layer: local experts here, the others' over the network."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """Fills every slot: local experts here, remote ones by scatter/gather.

        Args:
            x: ``[..., D]`` activations.
            indices: ``[..., k]`` global expert ids from rank 0's router.

        Returns:
            ``[..., k, D]`` expert outputs for every slot.
        """
        shard = self.expert_shard
        comm = shard.comm
        k, d = indices.shape[-1], x.shape[-1]
        x_flat = x.reshape(-1, d)  # [T, D]
        flat = np.asarray(indices.reshape(-1))  # [T*k]
        owners, positions = _routes(shard.layout)
        owner = owners[flat]  # [T*k]
        index = positions[flat]  # [T*k] expert's index on its owner
        x_buffer = None
        pending = []
        # Step 1, scatter: each owner gets its tokens (each token once) and,
        # per slot, which of its rows and which of its experts.
        for r in np.unique(owner):
            if r == comm.rank:
                continue
            slots = np.flatnonzero(owner == r)  # [M_r]
            tokens, rows = np.unique(slots // k, return_inverse=True)  # [U_r], [M_r]
            if x_buffer is None:
                x_buffer = to_buffer(x_flat)
            meta = {
                "layer": shard.layer,
                "dtype": dtype_name(x.dtype),
                "tokens": int(tokens.size),
                "rows": rows.tolist(),
                "experts": index[slots].tolist(),
            }
            comm.send_obj(meta, int(r), TAG_REQUEST)
            comm.send_array(np.ascontiguousarray(x_buffer[tokens]), int(r), TAG_ROWS)
            pending.append((int(r), slots))
        out = mx.zeros((flat.size, d), dtype=x.dtype)  # [T*k, D]
        mine = np.flatnonzero(owner == comm.rank)
        if mine.size:
            rows = x_flat[mx.array(mine // k)]
            out[mx.array(mine)] = self.compute(rows, index[mine]).astype(x.dtype)
            # Evaluate now, while the owners compute theirs: left lazy, it
            # would run only after the receives below, serially.
            mx.eval(out)
        # Step 2, gather: each owner's outputs, one row per slot.
        for r, slots in pending:
            y = comm.recv_array((slots.size, d), x_buffer.dtype, r, TAG_REPLY)
            out[mx.array(slots)] = from_buffer(y, dtype_name(x.dtype))
        return out.reshape(*indices.shape, d)  # [..., k, D]


@functools.lru_cache(maxsize=None)
def _routes(layout) -> Tuple[np.ndarray, np.ndarray]:
    """``[num_experts]`` each: every expert's owner, and its row in the owner's stacked weights."""
    owners = np.asarray(layout.owners(), dtype=np.int64)
    positions = np.array([layout.whole_on(int(r)).index(e) for e, r in enumerate(owners)], dtype=np.int64)
    return owners, positions


def make_central(switch: nn.Module) -> None:
    """Rank 0's switch layer (already sliced to its local experts) sends the
    other experts' slots to their owners; workers' switch layers stay as they are."""
    if switch.expert_shard.comm.rank == 0:
        switch.__class__ = with_mixin(CentralExperts, type(switch))


def serve(model: nn.Module) -> int:
    """Worker loop: computes this rank's experts for rank 0 until it stops us.

    Returns:
        The number of requests served.
    """
    switches = model.ep_info.switches
    comm = switches[0].expert_shard.comm
    served = 0
    while True:
        meta = comm.recv_obj(0, TAG_REQUEST)
        if meta == STOP:
            return served
        switch = switches[meta["layer"]]
        dtype = meta["dtype"]
        wire = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
        x = comm.recv_array((meta["tokens"], switch_input_dims(switch)), wire, 0, TAG_ROWS)
        x = from_buffer(x, dtype)  # [U, D] this rank's tokens, each once
        rows = mx.array(np.asarray(meta["rows"], dtype=np.int64))  # [M] slot -> token
        y = switch.compute(x[rows], np.asarray(meta["experts"], dtype=np.int64))  # [M, D]
        comm.send_array(to_buffer(y.astype(x.dtype)), 0, TAG_REPLY)
        served += 1


def switch_input_dims(switch: nn.Module) -> int:
    """Model dimension D that a switch layer takes as input."""
    first = switch.gate_proj if "gate_proj" in switch else switch.fc1
    return first.input_dims


def stop(model: nn.Module) -> None:
    """Rank 0: releases the workers from :func:`serve`."""
    comm = model.ep_info.switches[0].expert_shard.comm
    for r in range(1, comm.size):
        comm.send_obj(STOP, r, TAG_REQUEST)


def drive(model: nn.Module, fn: Callable[[nn.Module], T]) -> Optional[T]:
    """Runs ``fn(model)`` on rank 0 while the other ranks serve their experts.

    Call it on every rank. Rank 0 stops the workers when ``fn`` returns (or
    raises).

    Returns:
        ``fn``'s result on rank 0, None elsewhere.
    """
    comm = model.ep_info.switches[0].expert_shard.comm
    if comm.rank != 0:
        serve(model)
        return None
    try:
        return fn(model)
    finally:
        stop(model)
