"""The control channel of ``moe-mpi serve``: one broadcast per step, from rank 0.

Rank 0 hears the HTTP clients; the other ranks must apply the same changes
to their batch (requests joining, requests leaving, stop) at the same step.
All of it travels in **one** ``MPI_Ibcast`` per step, never per layer.

A broadcast needs its size known on every rank before it starts, and a
step's news (a prompt of any length) has no fixed size. So each message
carries a fixed header that announces the size of the *next* message's
payload, and its own payload is the one the previous header announced::

    step t:    [header: flags, next = n_t+1] [payload of n_t bytes, announced at t-1]
    step t+1:  [header: flags, next = n_t+2] [payload of n_t+1 bytes]

A request therefore joins one step after rank 0 has it (its bytes are
announced at one step and delivered at the next). When nothing is running
the two broadcasts follow each other at once. Flags (stop, gather the
status) take effect at the step that carries them.

While nothing is running, the ranks other than 0 wait for the next message
sleeping between polls instead of spinning in MPI, so an idle server leaves
the CPU alone. Blocking and non-blocking collectives do not match in MPI,
so every rank always uses ``Ibcast``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import msgpack
import numpy as np

__all__ = ["Control", "ControlChannel", "ControlStats", "GATHER_STATUS", "STOP"]

#: Header flag: every rank leaves its loop after this step's events.
STOP = 1
#: Header flag: every rank takes part in one allgather of its status figures.
GATHER_STATUS = 2

# int64 words of the header: the next payload's size, flags, step number.
_HEADER_WORDS = 3
HEADER_BYTES = 8 * _HEADER_WORDS

#: Seconds an idle rank sleeps between polls of the pending broadcast.
IDLE_POLL_SECONDS = 0.002


@dataclasses.dataclass
class Control:
    """One step's message, as every rank receives it.

    Attributes:
        step: Rank 0's step counter (the same on every rank).
        flags: :data:`STOP`, :data:`GATHER_STATUS`, or 0.
        events: The decoded payload: ``{"join": [...], "cancel": [...]}``,
            or ``{}`` when the step carries no news.
    """

    step: int
    flags: int
    events: dict

    @property
    def stop(self) -> bool:
        """Whether every rank leaves its loop after this step."""
        return bool(self.flags & STOP)

    @property
    def gather_status(self) -> bool:
        """Whether every rank joins the status allgather at this step."""
        return bool(self.flags & GATHER_STATUS)


@dataclasses.dataclass
class ControlStats:
    """Counters of one rank's control broadcasts.

    Attributes:
        broadcasts: Broadcasts taken part in (one per step).
        bytes: Bytes of those broadcasts (headers and payloads).
        seconds: Time in broadcasts while the server was busy (includes
            waiting for rank 0).
        idle_seconds: Time waiting for the next broadcast while idle.
    """

    broadcasts: int = 0
    bytes: int = 0
    seconds: float = 0.0
    idle_seconds: float = 0.0


def encode_events(events: Optional[dict]) -> bytes:
    """msgpack bytes of a step's events (empty when there are none)."""
    if not events:
        return b""
    return msgpack.packb(events, use_bin_type=True)


def decode_events(payload: bytes) -> dict:
    """Inverse of :func:`encode_events`."""
    if not payload:
        return {}
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


class ControlChannel:
    """Rank 0's per-step broadcast of batch changes (see the module docstring).

    Args:
        comm: A :class:`moe_mpi.Communicator` (its mpi4py communicator is used).
        poll_seconds: Sleep between polls of an idle rank.
    """

    def __init__(self, comm, poll_seconds: float = IDLE_POLL_SECONDS):
        self.mpi = comm.comm
        self.rank = comm.rank
        self.poll_seconds = poll_seconds
        self.stats = ControlStats()
        self.step = 0
        # Size of the payload the next message carries; known on every rank.
        self.announced = 0
        # Rank 0: the payload announced for the next message.
        self._next_payload = b""

    @property
    def news_pending(self) -> bool:
        """Whether the next message carries a payload (the same on every rank)."""
        return self.announced > 0

    def exchange(self, flags: int = 0, events: Optional[dict] = None, idle: bool = False) -> Control:
        """Takes part in this step's broadcast; every rank calls it once per step.

        Args:
            flags: Rank 0: flags for this step (ignored elsewhere).
            events: Rank 0: the news for the *next* message (ignored elsewhere).
            idle: Whether nothing is running (the same on every rank): the
                ranks other than 0 then sleep while they wait.

        Returns:
            This step's message, decoded.
        """
        size = HEADER_BYTES + self.announced
        buf = bytearray(size)
        if self.rank == 0:
            following = encode_events(events)
            header = np.array([len(following), flags, self.step], dtype=np.int64)
            buf[:HEADER_BYTES] = header.tobytes()
            buf[HEADER_BYTES:] = self._next_payload
            self._next_payload = following
        start = time.perf_counter()
        request = self.mpi.Ibcast(buf, root=0)
        if idle and self.rank != 0:
            while not request.Test():
                time.sleep(self.poll_seconds)
            self.stats.idle_seconds += time.perf_counter() - start
        else:
            request.Wait()
            self.stats.seconds += time.perf_counter() - start
        self.stats.broadcasts += 1
        self.stats.bytes += size
        following, flags, step = np.frombuffer(bytes(buf[:HEADER_BYTES]), dtype=np.int64).tolist()
        self.announced = following
        self.step = step + 1
        return Control(step, flags, decode_events(bytes(buf[HEADER_BYTES:])))

    def snapshot(self) -> dict[str, Any]:
        """The counters as a JSON-serialisable dict."""
        return dataclasses.asdict(self.stats)
