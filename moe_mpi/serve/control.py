"""The control channel of ``moe-mpi serve``: one broadcast per step, from rank 0.

Rank 0 hears the HTTP clients; the other ranks must apply the same changes
to their batch (requests joining, requests leaving, stop) at the same step.
All of it travels in **one** ``MPI_Ibcast`` per step, never per layer.

A broadcast needs its size known on every rank before it starts, and a
step's news (a prompt of any length) has no fixed size. So every message
has three parts::

    [header, 32 B] [inline area, INLINE_BYTES] [overflow, the size the previous header announced]

The header holds the flags, the step number, how much of the inline area
is used, and the size of the *next* message's overflow. News that fits the
inline area (a few requests with prompts of up to some hundreds of tokens)
arrives with the next step's message, so such a request joins the batch at
the next step. News that does not fit is announced in one message and
carried in the overflow of the following one, so it joins a step later;
nothing ever needs a second collective. Overflow (older) is applied before
the inline news (newer). Flags (stop, gather the status) act at once.

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

from ..mpi_activity import ACTIVITY
from ..mpi_turn import settle

__all__ = ["Control", "ControlChannel", "ControlStats", "GATHER_STATUS", "INLINE_BYTES", "STOP", "split_events"]

#: Header flag: every rank leaves its loop after this step's events.
STOP = 1
#: Header flag: every rank takes part in one allgather of its status figures.
GATHER_STATUS = 2

# int64 words of the header: next overflow's size, flags, step, inline bytes used.
_HEADER_WORDS = 4
HEADER_BYTES = 8 * _HEADER_WORDS
#: Bytes of every message kept for news delivered at once: room for a couple
#: of dozen short greedy requests (token ids, and parameters only where they
#: differ from the defaults), little against a decode step's all-reduces.
INLINE_BYTES = 4096

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


def split_events(events: Optional[dict], limit: int) -> tuple:
    """``(inline, overflow)`` bytes: what of ``events`` fits in ``limit`` bytes, and the rest.

    Cancellations go first (they are small and free slots); joins follow in
    their order as long as they fit.
    """
    whole = encode_events(events)
    if len(whole) <= limit:
        return whole, b""
    now = {"cancel": list(events.get("cancel", ()))} if events.get("cancel") else {}
    joins = list(events.get("join", ()))
    taken = 0
    while taken < len(joins) and len(encode_events({**now, "join": joins[: taken + 1]})) <= limit:
        taken += 1
    if taken:
        now["join"] = joins[:taken]
    inline = encode_events(now)
    if len(inline) > limit:  # not even the cancellations fit: all of it later
        return b"", whole
    later = {"join": joins[taken:]} if joins[taken:] else {}
    return inline, encode_events(later)


def _merge(older: dict, newer: dict) -> dict:
    merged = {}
    for key in ("cancel", "join"):
        items = list(older.get(key, ())) + list(newer.get(key, ()))
        if items:
            merged[key] = items
    return merged


class ControlChannel:
    """Rank 0's per-step broadcast of batch changes (see the module docstring).

    Args:
        comm: A :class:`moe_mpi.Communicator` (its mpi4py communicator is used).
        poll_seconds: Sleep between polls of an idle rank.
        inline_bytes: Size of every message's inline area (the same on every rank).
    """

    def __init__(self, comm, poll_seconds: float = IDLE_POLL_SECONDS, inline_bytes: int = INLINE_BYTES):
        self.mpi = comm.comm
        self.rank = comm.rank
        self.poll_seconds = poll_seconds
        self.inline_bytes = inline_bytes
        self.stats = ControlStats()
        self.step = 0
        # Size of the overflow the next message carries; known on every rank.
        self.announced = 0
        # Rank 0: the overflow announced for the next message.
        self._next_overflow = b""

    @property
    def news_pending(self) -> bool:
        """Whether the next message carries overflow (the same on every rank)."""
        return self.announced > 0

    def exchange(self, flags: int = 0, events: Optional[dict] = None, idle: bool = False) -> Control:
        """Takes part in this step's broadcast; every rank calls it once per step.

        Args:
            flags: Rank 0: flags for this step (ignored elsewhere).
            events: Rank 0: the news since the last step (ignored elsewhere).
            idle: Whether nothing is running (the same on every rank): the
                ranks other than 0 then sleep while they wait.

        Returns:
            This step's message, decoded: the overflow announced by the
            previous message, then this one's inline news.
        """
        start_overflow = HEADER_BYTES + self.inline_bytes
        size = start_overflow + self.announced
        buf = bytearray(size)
        if self.rank == 0:
            inline, following = split_events(events, self.inline_bytes)
            header = np.array([len(following), flags, self.step, len(inline)], dtype=np.int64)
            buf[:HEADER_BYTES] = header.tobytes()
            buf[HEADER_BYTES : HEADER_BYTES + len(inline)] = inline
            buf[start_overflow:] = self._next_overflow
            self._next_overflow = following
        start = time.perf_counter()
        # Counted for the watchdog like every collective, also while idle:
        # rank 0 then waits for requests as busy work (moe_mpi.watchdog), so
        # an idle server waits for ever, but a rank frozen between steps is named.
        settle()  # MPI from one thread at a time: MLX's all-reduces and overlap's wire first
        ACTIVITY.enter("control broadcast")
        request = self.mpi.Ibcast(buf, root=0)
        if idle and self.rank != 0:
            while not request.Test():
                time.sleep(self.poll_seconds)
            self.stats.idle_seconds += time.perf_counter() - start
        else:
            request.Wait()
            self.stats.seconds += time.perf_counter() - start
        ACTIVITY.leave()
        self.stats.broadcasts += 1
        self.stats.bytes += size
        following, flags, step, used = np.frombuffer(bytes(buf[:HEADER_BYTES]), dtype=np.int64).tolist()
        self.announced = following
        self.step = step + 1
        older = decode_events(bytes(buf[start_overflow:]))
        newer = decode_events(bytes(buf[HEADER_BYTES : HEADER_BYTES + used]))
        return Control(step, flags, _merge(older, newer))

    def snapshot(self) -> dict[str, Any]:
        """The counters as a JSON-serialisable dict."""
        return dataclasses.asdict(self.stats)
