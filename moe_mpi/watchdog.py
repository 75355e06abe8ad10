"""The watchdog: a rank that stops answering ends the job, named, instead of a hang.

A rank that *dies* is the launcher's business: Open MPI's ``mpirun`` notices
the lost process, ends the job and says which rank it was ("prterun noticed
that process rank 1 with PID ... exited on signal 9"). A rank that
*freezes* (a Mac that hangs, a process stopped with SIGSTOP, a link that
stops carrying packets) is noticed by nobody: every other rank waits in its
next collective for ever. This module is the cure: a thread on every rank
that

* watches this rank's MPI operations (:data:`moe_mpi.mpi_activity.ACTIVITY`,
  two integer increments per operation, nothing else on the hot path): when
  one has not returned within ``timeout`` seconds, the job is over;
* exchanges heartbeats with the other ranks over UDP, one 29-byte datagram
  per peer every ``interval`` seconds, carrying the sender's operation
  counters; so it can name the rank that stopped answering (no heartbeat for
  ``timeout`` seconds) or the rank that is running but has not reached the
  operation the others wait in;
* then the lowest-numbered rank among those waiting prints one line,
  ``moe-mpi: error: rank 2 stopped answering ...``, and exits with code
  :data:`EXIT_CODE` (``os._exit``: MPI cannot be called from this thread,
  and the main thread is stuck inside MPI). ``mpirun`` then ends every other
  rank, the frozen one included. A waiting rank that is still alive
  :data:`GRACE_SECONDS` later (a launcher that did not end it) exits too.

A rank that is *busy* with local work of no fixed length (:meth:`Watchdog.busy`:
loading the model, reading the prompt from stdin, rank 0 of ``moe-mpi serve``
waiting for requests) may keep the others waiting as long as its heartbeats
say it is alive: a slow disk or an idle server is not a fault. Once it leaves
that phase it has a whole timeout to reach the operation the others wait in. If heartbeats cannot pass
between the hosts (a firewall), the timeout still ends the job; the message
then says that it cannot tell which rank is at fault.

The launcher itself can die too (``kill -9`` of ``mpirun``): Open MPI then
leaves its ranks running, and an idle server's ranks would go on answering
requests with nobody able to stop them but by PID. So a rank started by a
launcher notes its parent process (mpirun, or its daemon on another host)
and, once it has another (the launcher is gone and the rank was adopted),
exits with :data:`EXIT_CODE` within ``interval`` seconds; rank 0 says why.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

from .mpi_activity import ACTIVITY, LAZY, Activity
from .errors import UserError
from .runner import PROG, under_launcher

__all__ = ["DEFAULT_TIMEOUT", "EXIT_CODE", "GRACE_SECONDS", "Watchdog", "start_watchdog"]

#: Seconds an MPI operation may wait for the other ranks by default
#: (``--timeout``). Generous: a decode step takes milliseconds, but a long
#: prompt's prefill on a loaded machine can take many seconds per layer.
DEFAULT_TIMEOUT = 60.0

#: Exit status of a rank ended by the watchdog.
EXIT_CODE = 1

#: How long a waiting rank that is not the one reporting gives the launcher
#: to end it before it exits by itself.
GRACE_SECONDS = 5.0

# Heartbeat: job nonce, sender rank, operations entered and left, phase.
_BEAT = struct.Struct("!8sIqqB")
RUNNING, BUSY = 0, 1
_PHASES = {RUNNING: "running", BUSY: "busy"}


@dataclass
class Peer:
    """What this rank knows about another rank."""

    rank: int
    host: str
    targets: List[tuple]  # (address, port) pairs to send heartbeats to
    seen: Optional[float] = None  # monotonic time of the last heartbeat
    entered: int = 0
    left: int = 0
    phase: int = RUNNING


def _local_addresses() -> List[str]:
    """This host's IPv4 addresses (not loopback), best effort, no dependencies."""
    found = set()
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(info[4][0])
    if sys.platform.startswith("linux"):
        import fcntl

        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                with contextlib.suppress(OSError):
                    req = struct.pack("256s", name.encode()[:15])
                    found.add(socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24]))  # SIOCGIFADDR
    else:  # macOS, BSD: ifconfig lists every interface's "inet a.b.c.d"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["ifconfig"], capture_output=True, text=True, timeout=5).stdout
            found.update(w[1] for w in (line.split() for line in out.splitlines()) if len(w) > 1 and w[0] == "inet")
    return sorted(a for a in found if not a.startswith("127."))


class Watchdog:
    """This rank's watchdog thread; see the module's documentation.

    Args:
        comm: The :class:`moe_mpi.Communicator` (rank, size, allgather).
        timeout: Seconds an MPI operation may wait; ``0`` turns the
            watchdog off (the heartbeat addresses are still exchanged, so
            that every rank runs the same collectives).
        activity: The counters to watch (default: the process's).
        exit: Ends the process (``os._exit``); tests pass their own.
        stream: Where the message goes (stderr).
    """

    def __init__(
        self,
        comm,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        activity: Activity = ACTIVITY,
        exit: Callable[[int], None] = os._exit,
        stream=None,
    ):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.timeout = float(timeout)
        self.interval = min(1.0, self.timeout / 4) if self.timeout > 0 else 1.0
        self.activity = activity
        self._exit = exit
        self.stream = stream
        self.phase = RUNNING
        self.peers: Dict[int, Peer] = {}
        self.fired: Optional[str] = None  # the message, once fired
        self._sock: Optional[socket.socket] = None
        self._nonce = b""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._waiting_on = 0  # the operation this rank waits in, 0: none
        self._since = 0.0  # when this rank began to wait in it
        self._excused = 0.0  # when a rank it waits for was last seen busy
        # The launcher (or its daemon) that started this rank; None: not started by one.
        self.launcher: Optional[int] = os.getppid() if under_launcher() else None

    # ------------------------------------------------------------- set-up

    def exchange(self) -> None:
        """Collective: every rank tells the others where its heartbeats go.

        One allgather of ``{host, addresses, port, timeout, nonce}``. A rank
        that cannot open a UDP socket takes part without heartbeats.

        Raises:
            UserError: The ranks were given different timeouts (on every rank).
        """
        port = None
        with contextlib.suppress(OSError):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", 0))
            port = sock.getsockname()[1]
            self._sock = sock
        host = socket.gethostname()
        mine = {
            "host": host,
            "addresses": _local_addresses() if self.size > 1 else [],
            "port": port,
            "timeout": self.timeout,
            "nonce": secrets.token_bytes(8),
        }
        every = self.comm.allgather(mine)
        timeouts = {e["timeout"] for e in every}
        if len(timeouts) > 1:
            raise UserError(
                "the ranks were given different --timeout values: "
                + "; ".join(f"rank {r}: {e['timeout']:g}" for r, e in enumerate(every))
            )
        self._nonce = every[0]["nonce"]
        for r, e in enumerate(every):
            if r == self.rank or e["port"] is None:
                continue
            addresses = ["127.0.0.1"] if e["host"] == host else e["addresses"]
            self.peers[r] = Peer(r, e["host"], [(a, e["port"]) for a in addresses])

    def start(self) -> "Watchdog":
        """Starts the thread (after :meth:`exchange`); nothing on one rank, nor with
        timeout 0 outside a launcher (with it, the thread only watches the launcher)."""
        if self.size > 1 and (self.timeout > 0 or self.launcher is not None):
            self._thread = threading.Thread(target=self._run, name="moe-mpi-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the thread and closes the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._sock is not None:
            self._sock.close()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """While open (loading, reading input, waiting for requests), other ranks wait for this one as long as it answers."""
        self.phase = BUSY
        try:
            yield
        finally:
            self.phase = RUNNING

    # ------------------------------------------------------------- thread

    def orphaned(self) -> Optional[str]:
        """The message to exit with once the launcher that started this rank is gone, else None."""
        if self.launcher is None or os.getppid() == self.launcher:
            return None
        return (f"the launcher that started the job (process {self.launcher}) is gone; "
                f"ending rank {self.rank} and every other rank")

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            orphaned = self.orphaned()
            if orphaned is not None:
                self.fired = orphaned
                if self.rank == 0:
                    self._say(orphaned)
                self._exit(EXIT_CODE)
                return
            if self.timeout <= 0:
                self._stop.wait(self.interval)
                continue
            now = time.monotonic()
            if now >= next_beat:
                self._beat()
                next_beat = now + self.interval
            self._receive(max(0.0, next_beat - time.monotonic()))
            message = self.check(time.monotonic())
            if message is not None:
                self._fire(message)
                return

    def _beat(self) -> None:
        if self._sock is None:
            return
        a = self.activity
        data = _BEAT.pack(self._nonce, self.rank, a.entered, a.left, self.phase)
        for peer in self.peers.values():
            for target in peer.targets:
                with contextlib.suppress(OSError):  # unreachable address: try the next
                    self._sock.sendto(data, target)

    def _receive(self, seconds: float) -> None:
        if self._sock is None:
            self._stop.wait(seconds)
            return
        self._sock.settimeout(seconds if seconds > 0 else 0.001)
        while True:
            try:
                data, source = self._sock.recvfrom(64)
            except (socket.timeout, BlockingIOError):
                return
            except OSError:
                return
            if len(data) != _BEAT.size:
                continue
            nonce, rank, entered, left, phase = _BEAT.unpack(data)
            peer = self.peers.get(rank)
            if nonce != self._nonce or peer is None:
                continue  # another job's datagram
            peer.seen, peer.entered, peer.left, peer.phase = time.monotonic(), entered, left, phase
            if len(peer.targets) > 1 and source in peer.targets:
                peer.targets = [source]  # the address that works
            self._sock.settimeout(0.0)  # drain what is queued, then back to beating

    def check(self, now: float) -> Optional[str]:
        """The message to end the job with, or None while all is well.

        Called by the thread about every ``interval`` seconds. Public so that
        its rules can be tested without freezing a process.
        """
        a = self.activity
        entered, left = a.entered, a.left
        if entered <= left:
            self._waiting_on = 0
            return None
        if entered != self._waiting_on:
            self._waiting_on, self._since, self._excused = entered, now, now
            return None
        silent, behind, unknown = [], [], []
        for r, peer in sorted(self.peers.items()):
            if peer.seen is None:
                unknown.append(r)
            elif now - peer.seen > self.timeout:
                silent.append(r)
            elif peer.entered < entered:
                behind.append(r)
        never = [r for r in range(self.size) if r != self.rank and r not in self.peers]
        unknown += never
        if a.kind == LAZY and not silent:
            # A forward pass with its all-reduces in MLX's graph (--backend mlx):
            # computing, for as long as it takes; only a silent rank is a fault.
            return None
        if not silent and behind and all(self.peers[r].phase == BUSY for r in behind):
            # A rank still loading (or reading input, or waiting for requests),
            # and answering: keep waiting. Its wait excuses ours: when it
            # leaves its busy phase it gets a whole timeout to arrive, so a
            # heartbeat sent between the end of that phase and its next
            # operation (after a wait longer than the timeout) is no fault.
            self._excused = now
            return None
        waited = now - self._since
        if waited < self.timeout:
            return None
        if not silent and behind and now - self._excused < self.timeout:
            return None
        where = f"collective #{entered} ({a.kind})"
        if silent:
            ages = ", ".join(f"{now - self.peers[r].seen:.1f} s" for r in silent)
            what = f"{_ranks(silent)} stopped answering (no heartbeat for {ages})"
        elif behind:
            lasts = ", ".join(
                f"rank {r}: {_PHASES.get(self.peers[r].phase, '?')}, at #{self.peers[r].entered}" for r in behind
            )
            what = f"{_ranks(behind)} did not reach {where} although still running ({lasts})"
        elif unknown:
            what = (
                f"cannot tell which rank: no heartbeats from {_ranks(unknown)} "
                "(UDP between the hosts blocked?)"
            )
        else:
            what = "every rank answers and has reached it: the MPI library or a link is stuck"
        return (
            f"{what}; rank {self.rank} waited {waited:.1f} s in {where}. "
            f"Ending the job (--timeout {self.timeout:g})"
        )

    def _reporter(self) -> bool:
        """Whether this rank is the lowest of those known to wait with it."""
        waiting = [
            r for r, p in self.peers.items()
            if p.seen is not None and p.entered >= self._waiting_on and p.left < p.entered
            and time.monotonic() - p.seen <= self.timeout
        ]
        return self.rank <= min(waiting, default=self.rank)

    def _fire(self, message: str) -> None:
        self.fired = message
        if not self._reporter():
            # A lower rank reports; the launcher should end this one meanwhile.
            self._stop.wait(GRACE_SECONDS)
        self._say(message)
        self._exit(EXIT_CODE)

    def _say(self, message: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        with contextlib.suppress(OSError, ValueError):  # the launcher may have closed it
            stream.write(f"{PROG}: error: {message}\n")
            stream.flush()


def _ranks(ranks: List[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def start_watchdog(comm, timeout: float = DEFAULT_TIMEOUT) -> Watchdog:
    """Collective: exchanges heartbeat addresses and starts this rank's watchdog."""
    watchdog = Watchdog(comm, timeout)
    watchdog.exchange()
    return watchdog.start()
