"""Machines and links for the performance model: built-in figures and calibrated profiles.

A :class:`Machine` says how fast one rank reads and computes; a
:class:`Link` how long an all-reduce and a point-to-point exchange take
between ranks. Both come either from a table of published figures
(:data:`MACHINES`, :data:`LINKS`; each figure's source is in
``docs/perfmodel.md``) or from a profile that ``moe-mpi calibrate``
measured on the cluster itself (:func:`read_profile`).

A built-in machine has only its spec-sheet memory bandwidth and an
estimate of its GPU's float rate, so its kernel time is the roofline::

    t(bytes, rows) = max(bytes / (efficiency * bandwidth), 2 * rows * params / flops)

A calibrated machine has, per weight format, the measured seconds per
weight byte at several row counts (:class:`KernelTable`), which covers
what the roofline does not: a CPU whose quantized kernels are bound by
arithmetic, BLAS that is slow for one row and fast for many.

This module holds data and small formulas only; :mod:`moe_mpi.perfmodel`
predicts with them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "LINKS",
    "MACHINES",
    "PROFILE_VERSION",
    "AllReduceFit",
    "KernelTable",
    "Link",
    "Machine",
    "ProfileError",
    "describe_machines",
    "find_link",
    "find_machine",
    "parse_machines",
    "read_profile",
    "write_profile",
]

#: Version of the profile JSON that ``moe-mpi calibrate`` writes.
PROFILE_VERSION = 1

GB = 1e9


class ProfileError(ValueError):
    """A machine, link or profile that cannot be used (the message says why)."""


# ---------------------------------------------------------------------------
# Machines
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelTable:
    """Measured seconds per weight byte of one weight format, against rows.

    ``rows[i]`` rows (tokens) through a weight matrix took
    ``seconds_per_byte[i] * weight bytes``. Between measured row counts the
    time is interpolated linearly in the rows: exact where the kernel is
    arithmetic-bound (time in proportion to the rows) or memory-bound (flat);
    interpolating in ``log(rows)`` instead put 32 rows 25% too dear between
    measurements at 16 and 64 (docs/perfmodel.md). Beyond the last, the time
    grows in proportion to the rows (arithmetic-bound), and below the first
    it is the first's (a read costs at least one pass).
    """

    rows: Tuple[int, ...]
    seconds_per_byte: Tuple[float, ...]

    def __post_init__(self):
        if len(self.rows) != len(self.seconds_per_byte) or not self.rows:
            raise ProfileError(
                f"kernel table: {len(self.rows)} row counts but {len(self.seconds_per_byte)} timings"
            )
        if list(self.rows) != sorted(set(self.rows)) or self.rows[0] < 1:
            raise ProfileError(f"kernel table: row counts must rise from 1 or more, got {list(self.rows)}")
        if any(not (s > 0 and math.isfinite(s)) for s in self.seconds_per_byte):
            raise ProfileError(f"kernel table: timings must be positive, got {list(self.seconds_per_byte)}")

    def per_byte(self, rows):
        """Seconds per weight byte at ``rows`` (a number or numpy array)."""
        import numpy as np

        m = np.maximum(np.asarray(rows, dtype=np.float64), 1.0)
        xs = np.asarray(self.rows, dtype=np.float64)
        ys = np.asarray(self.seconds_per_byte, dtype=np.float64)
        inside = np.interp(m, xs, ys)
        beyond = ys[-1] * m / self.rows[-1]
        return np.where(m > self.rows[-1], beyond, inside)


@dataclass(frozen=True)
class Machine:
    """One rank's machine.

    Attributes:
        name: Built-in name (``m2-ultra-192``) or the profile's.
        memory_bytes: Memory of the machine.
        bandwidth: Memory bandwidth in bytes/s (spec sheet, or measured:
            a read-only pass with every rank of the host reading).
        flops: Float rate in FLOP/s for large matrices (estimated for
            built-ins, measured for profiles).
        efficiency: Share of ``bandwidth`` a decode's weight reads get
            (1.0: the roofline, an upper bound on speed).
        usable_fraction: Share of ``memory_bytes`` the model may use (macOS
            lets the GPU wire about three quarters by default).
        layer_seconds: Fixed cost per layer per forward call (kernel
            launches, Python), by code path: ``"numpy"`` (moe_mpi's numpy
            decode step) and ``"mlx"`` (MLX's model code); measured only.
        step_seconds: Fixed cost per forward call (embedding, head, sampling),
            by code path.
        kernels: Measured :class:`KernelTable` per weight format
            (``float32``, ``q4``, ...); formats without one use the roofline.
        numpy_decode: Decode of float32 ep/sliced/tensor-parallel runs
            moe_mpi's numpy decode step (Linux CPUs), not MLX's code.
        cores: Cores of the machine, and ``ranks_per_host`` how many ranks
            shared them when it was calibrated (rates are per rank, measured
            with those ranks running at once).
        rendezvous: Where ``ranks_per_host`` exceeds ``cores``: measured
            ``(compute seconds between collectives, extra wait per
            collective)`` pairs, by compute (:mod:`moe_mpi.sharing`);
            empty elsewhere.
        price: Purchase price (for cost per token), if known.
        source: Where the figures come from.
    """

    name: str
    memory_bytes: float
    bandwidth: float
    flops: float
    efficiency: float = 1.0
    usable_fraction: float = 0.75
    layer_seconds: Dict[str, float] = field(default_factory=dict)
    step_seconds: Dict[str, float] = field(default_factory=dict)
    kernels: Dict[str, KernelTable] = field(default_factory=dict)
    numpy_decode: bool = False
    cores: int = 0
    ranks_per_host: int = 1
    rendezvous: Tuple[Tuple[float, float], ...] = ()
    price: Optional[float] = None
    source: str = ""

    def __post_init__(self):
        for label, value in (("memory", self.memory_bytes), ("bandwidth", self.bandwidth), ("flops", self.flops)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ProfileError(f"machine {self.name!r}: {label} must be a positive number, got {value!r}")
        if not 0 < self.efficiency <= 1:
            raise ProfileError(f"machine {self.name!r}: efficiency must be in (0, 1], got {self.efficiency}")
        if not 0 < self.usable_fraction <= 1:
            raise ProfileError(f"machine {self.name!r}: usable_fraction must be in (0, 1], got {self.usable_fraction}")
        pairs = tuple(tuple(float(v) for v in p) for p in self.rendezvous)
        if any(len(p) != 2 or not all(math.isfinite(v) and v >= 0 for v in p) for p in pairs):
            raise ProfileError(f"machine {self.name!r}: rendezvous must be (seconds, seconds) pairs >= 0, "
                               f"got {self.rendezvous!r}")
        object.__setattr__(self, "rendezvous", tuple(sorted(pairs)))

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * self.usable_fraction

    def kernel_seconds(self, fmt: str, nbytes, rows, bits: float, kind: str = "linear"):
        """Seconds to put ``rows`` rows through a weight of ``nbytes`` bytes.

        Args:
            fmt: The weight format (``float32``, ``bfloat16``, ``q4``, ...).
            kind: ``"linear"`` (one projection) or ``"expert"`` (a routed
                expert: its table ``<fmt>/expert`` if measured, else the
                format's).
            nbytes: Weight bytes (number or numpy array).
            rows: Rows (tokens) through it (number or numpy array).
            bits: Bits per weight of ``fmt`` (for the FLOP count: each
                weight is a multiply and an add per row).

        A calibrated format: ``nbytes * table.per_byte(rows)``. Otherwise
        the roofline ``max(nbytes / (efficiency * bandwidth), 2 * rows *
        params / flops)`` with ``params = 8 * nbytes / bits``.
        """
        import numpy as np

        table = (self.kernels.get(f"{fmt}/{kind}") if kind != "linear" else None) or self.kernels.get(fmt)
        if table is not None:
            return np.asarray(nbytes, dtype=np.float64) * table.per_byte(rows)
        read = np.asarray(nbytes, dtype=np.float64) / (self.efficiency * self.bandwidth)
        compute = 2.0 * np.asarray(rows, dtype=np.float64) * (8.0 * np.asarray(nbytes) / bits) / self.flops
        return np.maximum(read, compute)

    def rendezvous_seconds(self, compute):
        """Extra wait per collective after ``compute`` seconds of even work (0 without a measurement).

        Linear between the measured pairs and from (0, 0); beyond the
        largest measured compute, that pair's wait.
        """
        import numpy as np

        if not self.rendezvous:
            return np.zeros_like(np.asarray(compute, dtype=np.float64))
        xs, ys = zip((0.0, 0.0), *self.rendezvous)
        return np.interp(compute, xs, ys)

    def fixed_seconds(self, path: str) -> Tuple[float, float]:
        """``(per layer, per step)`` fixed costs of code path ``path`` (0 when unmeasured)."""
        return self.layer_seconds.get(path, 0.0), self.step_seconds.get(path, 0.0)

    def with_price(self, price: Optional[float]) -> "Machine":
        return Machine(**{**self.__dict__, "price": price})

    def with_efficiency(self, efficiency: float) -> "Machine":
        return Machine(**{**self.__dict__, "efficiency": efficiency})


def _apple(chip: str, memory_gb: int, bandwidth_gbs: float, tflops: float, gpu: str) -> Machine:
    return Machine(
        name=f"{chip}-{memory_gb}",
        memory_bytes=memory_gb * 2**30,
        bandwidth=bandwidth_gbs * GB,
        flops=tflops * 1e12,
        source=f"Apple spec sheet: {bandwidth_gbs:g} GB/s, {memory_gb} GB ({gpu}); "
        f"{tflops:g} TFLOPS is derived (GPU cores x 128 FP32 lanes x 2 x clock), not published",
    )


def _builtin_machines() -> Dict[str, Machine]:
    # (chip, memory sizes in GB, GB/s, derived FP32 TFLOPS, GPU variant).
    # Bandwidth and memory are Apple's published figures; the TFLOPS are an
    # estimate (docs/perfmodel.md says how, and that they are unsure).
    table = [
        ("m2-max", (32, 64, 96), 400, 13.6, "38-core GPU"),
        ("m2-ultra", (64, 128, 192), 800, 27.2, "76-core GPU"),
        ("m3-max", (36, 96), 300, 10.6, "14-core CPU, 30-core GPU"),
        ("m3-max", (48, 64, 128), 400, 14.1, "16-core CPU, 40-core GPU"),
        ("m3-ultra", (96, 256, 512), 819, 28.2, "80-core GPU"),
        ("m4-max", (36,), 410, 13.0, "14-core CPU, 32-core GPU"),
        ("m4-max", (48, 64, 128), 546, 16.2, "16-core CPU, 40-core GPU"),
    ]
    machines = {}
    for chip, sizes, gbs, tflops, gpu in table:
        for gb in sizes:
            m = _apple(chip, gb, gbs, tflops, gpu)
            machines[m.name] = m
    return machines


#: Built-in Macs by name: ``<chip>-<memory GB>``, e.g. ``m2-ultra-192``.
MACHINES: Dict[str, Machine] = _builtin_machines()


def find_machine(name: str, profile_machine: Optional[Machine] = None) -> Machine:
    """A built-in machine, or ``profile`` for the calibrated one.

    Raises:
        ProfileError: Unknown name (the message lists the known ones).
    """
    if name == "profile":
        if profile_machine is None:
            raise ProfileError("machine 'profile' needs --profile FILE (a moe-mpi calibrate result)")
        return profile_machine
    if name in MACHINES:
        return MACHINES[name]
    hint = ""
    if name.startswith("m4-ultra"):
        hint = " (Apple has released no M4 Ultra; the M4 generation's Mac Studio has the M4 Max, and the M3 Ultra)"
    raise ProfileError(f"unknown machine {name!r}{hint}; known: {', '.join(sorted(MACHINES))}, or 'profile'")


def parse_machines(text: str, profile_machine: Optional[Machine] = None) -> List[Machine]:
    """``"m2-ultra-192:4"`` or ``"m2-ultra-192:2,m3-ultra-512:1"`` -> one Machine per rank.

    Raises:
        ProfileError: Unknown machine or malformed count.
    """
    ranks: List[Machine] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, count = item.partition(":")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ProfileError(f"--machines {item!r}: the count after ':' must be an integer, got {count!r}") from None
        if n < 1:
            raise ProfileError(f"--machines {item!r}: the count must be at least 1, got {n}")
        ranks += [find_machine(name.strip(), profile_machine)] * n
    if not ranks:
        raise ProfileError(f"--machines {text!r}: no machines given (example: m2-ultra-192:4)")
    return ranks


# ---------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AllReduceFit:
    """A measured cost against message size at ``ranks`` ranks.

    With measured points (``sizes``, ``seconds``: medians) the cost is
    interpolated linearly between them, held at the first below it and
    extended along the last segment above; without, ``latency + bytes /
    bandwidth`` (the least-squares line, also kept for reports).
    """

    latency: float  # seconds
    bandwidth: float  # bytes/s
    ranks: int
    sizes: Tuple[float, ...] = ()
    seconds_at: Tuple[float, ...] = ()

    def __post_init__(self):
        if len(self.sizes) != len(self.seconds_at) or len(self.sizes) == 1:
            raise ProfileError(f"cost curve: {len(self.sizes)} sizes but {len(self.seconds_at)} timings (need 0 or 2+ of each)")
        if self.bandwidth <= 0 or self.latency < 0 or self.ranks < 1:
            raise ProfileError(f"cost curve: latency {self.latency}, bandwidth {self.bandwidth}, ranks {self.ranks} out of range")

    def seconds(self, nbytes):
        """Seconds for ``nbytes`` (a number or numpy array)."""
        if not self.sizes:
            return self.latency + nbytes / self.bandwidth
        import numpy as np

        xs, ys = np.asarray(self.sizes, dtype=np.float64), np.asarray(self.seconds_at, dtype=np.float64)
        m = np.asarray(nbytes, dtype=np.float64)
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        out = np.where(m > xs[-1], ys[-1] + (m - xs[-1]) * slope, np.interp(m, xs, ys))
        return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class Link:
    """The connection between ranks.

    Attributes:
        name: Built-in name (``10gbe``) or the profile's.
        latency: One-way small-message latency in seconds (point to point).
        bandwidth: Bytes/s of one message stream.
        allreduce: Measured all-reduce fits by data path (``mpi4py-numpy``,
            ``mlx-mpi4py``, ``mlx-distributed``, or ``default`` for a
            figure that holds for all); absent: built from ``latency`` and
            ``bandwidth`` by :meth:`allreduce_seconds`'s algorithm rule.
        exchange: Measured central-router exchange per worker
            (``moe_mpi.central``: request, rows and reply), if calibrated.
        mesh: Every pair of ranks has its own link (Thunderbolt meshes):
            a small all-reduce is one round whatever the ranks.
        source: Where the figures come from.
    """

    name: str
    latency: float
    bandwidth: float
    allreduce: Dict[str, AllReduceFit] = field(default_factory=dict)
    exchange: Optional[AllReduceFit] = None
    mesh: bool = False
    source: str = ""

    def __post_init__(self):
        for label, value in (("latency", self.latency), ("bandwidth", self.bandwidth)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ProfileError(f"link {self.name!r}: {label} must be a number >= 0, got {value!r}")
        if self.bandwidth <= 0:
            raise ProfileError(f"link {self.name!r}: bandwidth must be positive, got {self.bandwidth}")

    def rounds(self, ranks: int) -> int:
        """Latency rounds of a small all-reduce: 1 on a mesh or 2 ranks,
        else ``ceil(log2 ranks)`` (recursive doubling)."""
        if ranks <= 2 or self.mesh:
            return 1
        return math.ceil(math.log2(ranks))

    def allreduce_seconds(self, nbytes: float, ranks: int, path: str = "default") -> float:
        """Seconds of one sum all-reduce of ``nbytes`` over ``ranks`` ranks.

        Measured (a fit for ``path``, else ``default``) at ``r0`` ranks:
        ``latency * rounds(ranks) / rounds(r0) + bytes / bandwidth * rounds(ranks) / rounds(r0)``.
        From the link's figures: the faster of recursive doubling,
        ``rounds * (latency + bytes / bandwidth)``, and a ring,
        ``2 (n-1) latency + 2 (n-1)/n bytes / bandwidth``.
        """
        if ranks <= 1:
            return 0.0
        fit = self.allreduce.get(path) or self.allreduce.get("default")
        if fit is not None:
            scale = self.rounds(ranks) / self.rounds(fit.ranks)
            return fit.seconds(nbytes) * scale
        r = self.rounds(ranks)
        doubling = r * (self.latency + nbytes / self.bandwidth)
        ring = 2 * (ranks - 1) * self.latency + 2 * (ranks - 1) / ranks * nbytes / self.bandwidth
        return min(doubling, ring)

    def exchange_seconds(self, nbytes: float) -> float:
        """One central-router exchange with one worker moving ``nbytes`` both ways in all.

        Measured if calibrated; else two one-way latencies (request, reply)
        plus the bytes over the bandwidth: a lower bound without the
        software's own cost per message.
        """
        if self.exchange is not None:
            return self.exchange.seconds(nbytes)
        return 2 * self.latency + nbytes / self.bandwidth

    def p2p_seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


_TCP_MAC_LATENCY = 0.26e-3  # s one way: half of 0.34-0.70 ms round trip (exo PR #2063), midpoint


#: Built-in links (figures and sources: docs/perfmodel.md, "Built-in links").
LINKS: Dict[str, Link] = {
    "10gbe": Link(
        "10gbe", _TCP_MAC_LATENCY, 10e9 / 8,
        source="10 Gbit/s line rate (IEEE 802.3ae); latency not published for Macs: "
        "assumed that of TCP over Thunderbolt 5 (exo PR #2063), the macOS TCP stack's",
    ),
    "tb4-tcp": Link(
        "tb4-tcp", _TCP_MAC_LATENCY, 40e9 / 8,
        source="40 Gbit/s Thunderbolt 4 link rate (Intel; IP throughput is lower, unsure); "
        "latency assumed that of TCP over Thunderbolt 5 (exo PR #2063)",
    ),
    "tb5-tcp": Link(
        "tb5-tcp", _TCP_MAC_LATENCY, 58e9 / 8,
        source="TCP over Thunderbolt 5: 0.34-0.70 ms round trip, 52-64 Gbit/s iperf3 (exo PR #2063)",
    ),
    "tb5-rdma": Link(
        "tb5-rdma", 4.64e-6, 75e9 / 8,
        allreduce={"default": AllReduceFit(29e-6, 6.3 * GB, 2)},
        mesh=True,
        source="RDMA over Thunderbolt 5: 4.64 us at 4 KB, 75 Gbit/s (hellas-ai/thunderbolt-ibverbs PR #27); "
        "all-reduce 27-31 us, 6.1-6.5 GB/s with JACCL, M3 Ultra + M5 Max (jundot/omlx PR #3118)",
    ),
}


def find_link(name: str, profile_link: Optional[Link] = None) -> Link:
    """A built-in link, or ``profile`` for the calibrated one.

    Raises:
        ProfileError: Unknown name.
    """
    if name == "profile":
        if profile_link is None:
            raise ProfileError("link 'profile' needs --profile FILE (a moe-mpi calibrate result)")
        return profile_link
    if name in LINKS:
        return LINKS[name]
    raise ProfileError(f"unknown link {name!r}; known: {', '.join(LINKS)}, or 'profile'")


# ---------------------------------------------------------------------------
# Profiles (moe-mpi calibrate's JSON)
# ---------------------------------------------------------------------------


def write_profile(path, machine: Machine, link: Link, meta: dict) -> None:
    """Writes a profile: ``{"version", "machine", "link", "meta"}``."""
    data = {
        "version": PROFILE_VERSION,
        "machine": _machine_dict(machine),
        "link": _link_dict(link),
        "meta": meta,
    }
    from .results import save_text

    save_text(path, json.dumps(data, indent=1) + "\n", "the profile")


def _machine_dict(m: Machine) -> dict:
    d = asdict(m)
    d["kernels"] = {k: {"rows": list(t.rows), "seconds_per_byte": list(t.seconds_per_byte)} for k, t in m.kernels.items()}
    return d


def _link_dict(link: Link) -> dict:
    return asdict(link)


def read_profile(path) -> Tuple[Machine, Link, dict]:
    """``(machine, link, meta)`` of a ``moe-mpi calibrate`` profile.

    Raises:
        ProfileError: Unreadable, not JSON, another version, or a field
            missing or of the wrong kind (the message names it).
        FileNotFoundError: No such file.
    """
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"profile {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or "machine" not in data or "link" not in data:
        raise ProfileError(f"profile {path}: expected a JSON object with 'machine' and 'link' (a moe-mpi calibrate result)")
    if data.get("version") != PROFILE_VERSION:
        raise ProfileError(f"profile {path}: version {data.get('version')!r}, this moe_mpi reads {PROFILE_VERSION}")
    try:
        m = dict(data["machine"])
        m["kernels"] = {k: KernelTable(tuple(t["rows"]), tuple(t["seconds_per_byte"])) for k, t in m.get("kernels", {}).items()}
        machine = Machine(**m)
        ln = dict(data["link"])
        ln["allreduce"] = {k: _curve(f) for k, f in ln.get("allreduce", {}).items()}
        ln["exchange"] = _curve(ln["exchange"]) if ln.get("exchange") else None
        link = Link(**ln)
    except ProfileError as e:
        raise ProfileError(f"profile {path}: {e}") from None
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise ProfileError(f"profile {path}: malformed machine or link entry ({type(e).__name__}: {e})") from None
    return machine, link, data.get("meta", {})


def _curve(d: dict) -> AllReduceFit:
    d = dict(d)
    d["sizes"], d["seconds_at"] = tuple(d.get("sizes", ())), tuple(d.get("seconds_at", ()))
    return AllReduceFit(**d)


def describe_machines(ranks: Sequence[Machine]) -> str:
    """``"4 x m2-ultra-192"`` or a list of mixed machines."""
    names = [m.name for m in ranks]
    if len(set(names)) == 1:
        return f"{len(names)} x {names[0]}"
    return ", ".join(names)
