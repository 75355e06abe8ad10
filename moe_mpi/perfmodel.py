"""The performance model: decode and prefill time of an MoE model per mode, machine, link and ranks.

A forward call of ``T`` tokens (decode: ``T = B`` sequences, one token each;
prefill: ``T = L`` prompt tokens of one sequence) costs, on N ranks::

    T_call = sum over layers of  T_layer  +  T_head  +  step_fixed
    T_layer = max over ranks r of (dense_r + experts_r)  +  comm  +  layer_fixed

* ``dense_r``: the weights of the dense part this rank holds for the layer
  (attention projections, router; a dense MLP in non-MoE layers; its share of
  the shared experts), each put through ``T`` rows:
  ``machine.kernel_seconds(format, bytes, T)``; plus the attention itself:
  reading ``B * context`` cached keys and values (decode) or
  ``2 * L^2 * heads * head_dim`` FLOP (causal prefill).
* ``experts_r``: for every expert this rank reads, its weight through the
  rows routed to it: ``kernel_seconds(format, expert_bytes / s, rows_e)``,
  ``s`` = 1 for whole experts (``ep``, ``central``) and N for slices
  (``sliced``, tensor parallel). The rows per expert are drawn from the
  routing (uniform top-k, or a router-statistics file), and the layer pays
  the expectation of the busiest rank's time: each layer's collective waits
  for it. A mode whose placement gives a known busiest-rank load per layer
  (a balancing mode) passes it as ``imbalance``.
* ``comm``: the link's cost. ``ep``/``sliced``: one all-reduce of
  ``T * D`` float32 values per MoE layer; tensor parallel: two all-reduces
  of ``T * D`` activations per layer; ``central``: one exchange per worker
  that has routed rows (request, the rows, the reply); ``allgather`` (the
  paper's scheme): each rank sends its experts' outputs to the N - 1 others.
* ``T_head``: the LM head, ``kernel_seconds(format, V * D bytes, T)`` in
  decode and prefill alike (mlx-lm computes every position's logits).
* On a host with more ranks than cores the ``max over ranks`` is the time
  the last rank finishes when the cores are shared among the ranks still
  computing (``shared_makespan``): waiting ranks yield their core; and
  each collective waits a measured rendezvous time for the rank the
  scheduler held back (``rendezvous_wait``, :mod:`moe_mpi.sharing`).
* ``layer_fixed``, ``step_fixed``: measured costs of the code path per layer
  and per call (Python, MLX's scheduler), zero where not measured.

The units are bytes and seconds throughout. The formula of every term, and
which are measured by ``moe-mpi calibrate`` and which come from spec
sheets, are in ``docs/perfmodel.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .balance import auto_layout, draw_routing
from .modelshape import ModelShape, PerfModelError
from .layout import Layout, assign_rows
from .profiles import Link, Machine
from .sharing import host_speeds, rendezvous_wait, shared_makespan

__all__ = [
    "MODES",
    "Mode",
    "ModelShape",
    "PerfModelError",
    "Prediction",
    "Routing",
    "bytes_per_step",
    "default_layouts",
    "expected_experts",
    "layout_experts_read",
    "memory_per_rank",
    "predict",
    "register_mode",
    "route_counts",
]


#: Routing draws per estimate at one token (fewer for many tokens, see route_counts).
N_SAMPLES = 20000
_MAX_DRAWS = 4_000_000  # samples x tokens x experts per estimate


# ---------------------------------------------------------------------------
# Routing: rows per expert
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """Which experts tokens choose: uniform top-k, or measured frequencies per MoE layer.

    ``probs[l][e]``: the share of layer ``l``'s (token, slot) pairs that
    went to expert ``e``. Draws without replacement in proportion to them
    (Gumbel top-k) reproduce the skew, not the exact correlations.
    """

    probs: Optional[Tuple[Tuple[float, ...], ...]] = None
    seed: int = 0

    @classmethod
    def from_counts(cls, layers: Sequence[Sequence[float]], experts: int) -> "Routing":
        """From per-layer counts per expert (a router statistics file).

        Raises:
            PerfModelError: A layer with the wrong number of experts, negative or all-zero counts.
        """
        probs = []
        for i, counts in enumerate(layers):
            c = np.asarray(counts, dtype=np.float64)
            if c.shape != (experts,) or (c < 0).any() or c.sum() <= 0:
                raise PerfModelError(
                    f"router statistics layer {i}: expected {experts} non-negative counts with a positive sum, "
                    f"got {len(c)} values summing to {c.sum():g}"
                )
            probs.append(tuple(float(p) for p in c / c.sum()))
        if not probs:
            raise PerfModelError("router statistics: no layers")
        return cls(tuple(probs))

    def layer_probs(self, layer: int) -> Optional[Tuple[float, ...]]:
        if self.probs is None:
            return None
        return self.probs[layer % len(self.probs)]


def _samples(tokens: int, experts: int) -> int:
    return int(min(N_SAMPLES, max(16, _MAX_DRAWS // max(1, tokens * experts))))


def route_counts(experts: int, top_k: int, tokens: int, probs=None, seed: int = 0, samples: Optional[int] = None) -> np.ndarray:
    """``[S, E]``: (token, slot) pairs routed to each expert, in S draws of ``tokens`` tokens.

    Each token picks ``top_k`` distinct experts: uniformly, or in proportion
    to ``probs`` (``[E]``), by :func:`moe_mpi.balance.draw_routing`, the
    draw the balancing search uses.
    """
    s = samples or _samples(tokens, experts)
    p = np.full(experts, 1.0 / experts) if probs is None else np.asarray(probs, dtype=np.float64)
    picks = draw_routing(p, top_k, tokens, s, np.random.default_rng(seed)).reshape(s, -1)  # [S, T*k]
    counts = np.zeros((s, experts), dtype=np.int32)
    np.add.at(counts, (np.repeat(np.arange(s), picks.shape[1]), picks.reshape(-1)), 1)
    return counts


def expected_experts(num_experts: int, top_k: int, batch: int, owners: Optional[Sequence[int]], seed: int = 0) -> float:
    """Expected distinct experts the busiest reader reads in one step of ``batch`` tokens.

    Args:
        owners: Expert -> rank (whole experts), or None when every rank
            reads every chosen expert (single, sliced, tensor parallel).
    """
    chosen = route_counts(num_experts, top_k, batch, seed=seed) > 0  # [S, E]
    if owners is None:
        return float(chosen.sum(1).mean())
    owners = np.asarray(owners)
    per_rank = np.stack([chosen[:, owners == r].sum(1) for r in range(owners.max() + 1)], 1)
    return float(per_rank.max(1).mean())


def contiguous_owners(experts: int, ranks: int) -> np.ndarray:
    """``[E]`` owner of each expert under moe_mpi's default contiguous placement."""
    if experts < ranks:
        raise PerfModelError(f"{experts} experts cannot be spread over {ranks} ranks: every rank must own at least one")
    sizes = [len(c) for c in np.array_split(np.arange(experts), ranks)]
    return np.repeat(np.arange(ranks), sizes)


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """How a mode splits the model and talks.

    Attributes:
        experts: ``"whole"`` (a rank owns whole experts), ``"sliced"``
            (every rank a 1/N slice of every expert) or ``"balanced"``
            (per layer, the layout :func:`moe_mpi.balance.auto_layout`
            chooses: experts whole, replicated or split).
        dense: ``"replicated"``, ``"split"`` (attention and dense MLPs 1/N,
            tensor parallel), ``"heads"`` (attention and its KV cache 1/N,
            moe_mpi's ``--attention split``) or ``"rank0"`` (central router).
        comm: ``"allreduce"`` (one per MoE layer), ``"allreduce2"`` (two per
            layer), ``"allreduce-heads"`` (one per MoE layer and one per
            attention, on moe_mpi's data path), ``"exchange"`` (central),
            ``"allgather"`` (the paper's) or ``"none"``.
        head: ``"replicated"`` or ``"split"`` (1/N of the LM head's rows,
            one all-gather of the logits per step: ``--lm-head split``).
    """

    name: str
    experts: str
    dense: str
    comm: str
    description: str = ""
    head: str = "replicated"


MODES: Dict[str, Mode] = {}


def register_mode(mode: Mode) -> None:
    """Adds a mode (e.g. another placement: whole experts, its per-layer
    layouts or imbalance passed to :func:`predict`)."""
    MODES[mode.name] = mode


for _m in (
    Mode("ep", "whole", "replicated", "allreduce", "moe_mpi expert parallel: whole experts, one all-reduce per MoE layer"),
    Mode("sliced", "sliced", "replicated", "allreduce", "moe_mpi sliced: 1/N of every expert, one all-reduce per MoE layer"),
    Mode("auto", "balanced", "replicated", "allreduce",
         "moe_mpi auto: per layer, experts whole, replicated or split by the balancing search, one all-reduce"),
    *(
        Mode(f"{name}+heads", experts, "heads", "allreduce-heads",
             f"moe_mpi {name} with the attention split by heads (--attention split): two all-reduces per layer")
        for name, experts in (("ep", "whole"), ("sliced", "sliced"), ("auto", "balanced"))
    ),
    *(
        Mode(f"{name}{heads}+vocab", experts, "heads" if heads else "replicated",
             "allreduce-heads" if heads else "allreduce",
             f"moe_mpi {name}{heads} with the LM head split by vocabulary rows (--lm-head split)", head="split")
        for name, experts in (("ep", "whole"), ("sliced", "sliced"), ("auto", "balanced")) for heads in ("", "+heads")
    ),
    Mode("central", "whole", "rank0", "exchange", "central router: rank 0 scatters rows to expert owners, gathers"),
    Mode("mlx-lm-tp", "sliced", "split", "allreduce2", "mlx-lm tensor parallel: attention and experts split, two all-reduces per layer"),
    Mode("single", "whole", "replicated", "none", "one process, the whole model"),
    Mode("allgather", "whole", "replicated", "allgather", "the paper's scheme: every rank sends its experts' outputs to all others"),
):
    register_mode(_m)


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise PerfModelError(f"unknown mode {name!r}; known: {', '.join(MODES)}")
    return MODES[name]


def default_layouts(shape: ModelShape, mode: str, n: int, routing: Optional["Routing"] = None,
                    replicas: float = 0.0, balance: str = "both", row_cost=None) -> List[Layout]:
    """Per MoE layer, where a mode puts the experts on ``n`` ranks, as moe_mpi would.

    Whole experts: moe_mpi's default contiguous placement; sliced (and
    tensor parallel): every expert split; ``auto``:
    :func:`moe_mpi.balance.auto_layout` on the layer's routing frequencies
    (uniform without statistics), as ``load(mode="auto")`` chooses it,
    rows priced by ``row_cost`` (:class:`moe_mpi.rowcost.RowCost`, None: the default).
    """
    m = get_mode(mode)
    e = shape.experts
    if m.experts == "sliced":
        return [Layout.all_split(e, n)] * shape.moe_layers
    if m.experts == "balanced":
        routing = routing or Routing()
        chosen: Dict[Optional[Tuple[float, ...]], Layout] = {}
        out = []
        for layer in range(shape.moe_layers):
            probs = routing.layer_probs(layer)
            if probs not in chosen:
                p = np.full(e, 1.0 / e) if probs is None else np.asarray(probs)
                # The arguments moe_mpi.shard passes, so the layout is the one a run uses.
                chosen[probs] = auto_layout(
                    p, shape.top_k, n, replicas=replicas, can_split=shape.expert_inter >= n,
                    intermediate=shape.expert_inter, quantized=shape.fmt.startswith("q"), balance=balance,
                    row_cost=row_cost,
                )
            out.append(chosen[probs])
        return out
    return [Layout.from_owners(contiguous_owners(e, n), n)] * shape.moe_layers


# ---------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------


@dataclass
class Prediction:
    """One predicted forward call (a decode step or a prefill).

    ``seconds`` per call; ``tokens_per_s`` = tokens / seconds;
    ``comm_seconds`` the link's share (waiting for the busiest rank is
    compute, not communication); ``parts`` the terms, seconds per call.
    """

    mode: str
    ranks: int
    phase: str
    tokens: int
    seconds: float
    comm_seconds: float
    parts: Dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def comm_share(self) -> float:
        return self.comm_seconds / self.seconds

    def to_dict(self) -> dict:
        return dict(mode=self.mode, ranks=self.ranks, phase=self.phase, tokens=self.tokens, seconds=self.seconds,
                    tokens_per_s=self.tokens_per_s, comm_seconds=self.comm_seconds, comm_share=self.comm_share,
                    parts=dict(self.parts))


def code_path(mode: Mode, phase: str, shape: ModelShape, machine: Machine) -> str:
    """Which code runs a call: ``"numpy"`` (moe_mpi's numpy decode step: float32
    decode of ep, sliced and tensor parallel on a CPU-path machine),
    ``"mlx-quantized"`` (MLX's model code on quantized weights) or ``"mlx"``."""
    numpy_modes = ("ep", "sliced", "auto", "mlx-lm-tp", "single")
    if phase == "decode" and machine.numpy_decode and shape.fmt == "float32" and mode.name in numpy_modes:
        return "numpy"
    return "mlx-quantized" if shape.fmt.startswith("q") else "mlx"


def allreduce_path(mode: Mode, path: str) -> str:
    """The data path of a mode's all-reduce (as ``bench collectives`` names them)."""
    if mode.comm == "allreduce2":
        return "mlx-distributed"
    return "mpi4py-numpy" if path == "numpy" else "mlx-mpi4py"


def _dense_seconds(shape: ModelShape, mode: Mode, m: Machine, n: int, tokens: int, phase: str,
                   context: int, moe: bool) -> float:
    """One rank's dense work in one layer (attention, router, dense MLP, shared experts)."""
    split = n if mode.dense == "split" else 1
    share = head_share(shape, n) if mode.dense in ("split", "heads") else 1.0  # the busiest rank's heads
    kernel = m.kernel_seconds
    t = kernel(shape.fmt, shape.attention_bytes * share, tokens, shape.weight_bits)
    heads = shape.heads * share
    if phase == "decode":
        # Every sequence reads its cached keys and values.
        kv = tokens * context * 2 * shape.kv_heads * share * shape.head_dim * shape.act_bytes
        t += kv / (m.efficiency * m.bandwidth)
    else:
        # Causal attention: scores and weighted values, half the square.
        t += 2 * tokens * tokens * heads * shape.head_dim / m.flops
    if moe:
        t += kernel(shape.fmt, shape.router_bytes, tokens, shape.router_bits)
        if shape.shared_inter:
            share = 1 if mode.dense == "rank0" else n
            t += kernel(shape.fmt, shape.shared_bytes / share, tokens, shape.weight_bits)
    else:
        t += kernel(shape.fmt, shape.dense_mlp_bytes / split, tokens, shape.weight_bits)
    return float(t)


def head_share(shape: ModelShape, n: int) -> float:
    """The busiest rank's share of the heads when the attention is split over ``n`` ranks.

    Whole key/value groups per rank while there are enough
    (:func:`moe_mpi.attention.head_ranges`), else query heads shared.
    """
    if n <= 1:
        return 1.0
    if shape.kv_heads >= n:
        return -(-shape.kv_heads // n) / shape.kv_heads
    group = shape.heads // shape.kv_heads
    return -(-group // (n // shape.kv_heads)) / shape.heads  # a key/value head with the fewest sharers


#: Routing draws used for a layout with replicated experts (each draw assigns its slots in Python).
REPLICA_SAMPLES = 1000


def rank_rows(layout: Layout, counts: np.ndarray) -> np.ndarray:
    """``[S, E, N]``: the rows of each whole expert each rank computes in each draw (0 for split experts).

    Replicated experts' rows go where :func:`moe_mpi.layout.assign_rows`
    sends them (all to one holder, or shared), draw by draw.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if layout.replicated:
        return np.stack([assign_rows(layout, row) for row in counts])
    out = np.zeros(counts.shape + (layout.num_ranks,), dtype=np.int64)  # [S, E, N]
    for e, holders in enumerate(layout.holders):
        if holders:
            out[:, e, holders[0]] = counts[:, e]
    return out


def _expert_seconds(shape: ModelShape, ranks: Sequence[Machine], counts: np.ndarray, layout: Layout) -> np.ndarray:
    """``[S, N]``: each rank's expert time in each routing draw.

    A whole expert costs its computing rank the expert's bytes through its
    rows; a split one costs every rank 1/N of the bytes through all its rows.
    """
    n = len(ranks)
    out = np.zeros((counts.shape[0], n))
    active = counts > 0
    split = np.array([not h for h in layout.holders])
    rows = rank_rows(layout, counts)  # [S, E, N]
    for r, m in enumerate(ranks):
        t = np.zeros(counts.shape)
        mine = rows[:, :, r]  # [S, E]
        if mine.any():
            t += np.where(mine > 0, m.kernel_seconds(shape.fmt, shape.expert_bytes, mine, shape.weight_bits, "expert"), 0.0)
        if split.any():
            t += m.kernel_seconds(shape.fmt, shape.expert_bytes / n, counts, shape.weight_bits, "expert") * (active & split)
        out[:, r] = t.sum(axis=1)
    return out


def _central_exchange(shape: ModelShape, link: Link, counts: np.ndarray, owners: np.ndarray, tokens: int) -> float:
    """Expected seconds of rank 0's exchanges with the workers in one MoE layer.

    Per worker with routed pairs: its tokens go out (at most ``tokens``
    rows, each once) and one output row per pair comes back.
    """
    total = np.zeros(counts.shape[0])
    for w in range(1, int(owners.max()) + 1):
        pairs = counts[:, owners == w].sum(axis=1)
        rows_out = np.minimum(pairs, tokens)
        nbytes = (rows_out + pairs) * shape.hidden * shape.act_bytes
        total += np.where(pairs > 0, link.exchange_seconds(nbytes), 0.0)
    return float(total.mean())


def predict(
    shape: ModelShape,
    mode: str,
    ranks: Sequence[Machine],
    link: Optional[Link],
    tokens: int,
    phase: str = "decode",
    context: int = 0,
    routing: Optional[Routing] = None,
    layouts: Optional[Sequence[Layout]] = None,
    imbalance: Optional[Sequence[float]] = None,
) -> Prediction:
    """Predicted time of one forward call.

    Args:
        shape: The model (:meth:`ModelShape.from_config`).
        mode: A name of :data:`MODES`.
        ranks: One :class:`Machine` per rank.
        link: Between the ranks (unused on one rank).
        tokens: ``B`` (decode: B sequences, one token each) or ``L``
            (prefill of one sequence).
        phase: ``"decode"`` or ``"prefill"``.
        context: Cached tokens per sequence (decode attention reads them).
        routing: Uniform (None) or measured expert frequencies.
        layouts: Per MoE layer, where the experts are
            (:class:`moe_mpi.layout.Layout`; default: :func:`default_layouts`).
        imbalance: Per MoE layer, the busiest rank's expert time over the
            mean rank's, for a placement no :class:`Layout` describes
            (the paper's round-robin groups); replaces the drawn busiest rank.

    Raises:
        PerfModelError: Unknown mode or phase, or inputs that do not fit
            (more ranks than experts, no link for several ranks, ...).
    """
    m = get_mode(mode)
    n = len(ranks)
    if phase not in ("decode", "prefill"):
        raise PerfModelError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    if tokens < 1 or n < 1:
        raise PerfModelError(f"need at least 1 token and 1 rank, got tokens={tokens}, ranks={n}")
    if m.name == "single" and n != 1:
        raise PerfModelError(f"mode 'single' runs on 1 rank, got {n}")
    if n > 1 and link is None:
        raise PerfModelError(f"{n} ranks need a link")
    if m.dense == "split" and any(x % n for x in (shape.heads, shape.kv_heads, shape.expert_inter)):
        # mlx-lm's shard() divides head counts and intermediate sizes by N and has no remainder case.
        raise PerfModelError(f"tensor parallel splits heads={shape.heads}, kv_heads={shape.kv_heads} and "
                             f"intermediate={shape.expert_inter} evenly: not over {n} ranks")
    if imbalance is not None and len(imbalance) != shape.moe_layers:
        raise PerfModelError(f"imbalance: one value per MoE layer ({shape.moe_layers}), got {len(imbalance)}")
    path = code_path(m, phase, shape, ranks[0])
    ar_path = allreduce_path(m, path)
    layer_fixed, step_fixed = max((r.fixed_seconds(f"{path}/{phase}") for r in ranks), key=sum)
    routing = routing or Routing()
    if layouts is None:
        layouts = default_layouts(shape, m.name, n, routing)
    if len(layouts) != shape.moe_layers or any(x.num_ranks != n or x.num_experts != shape.experts for x in layouts):
        raise PerfModelError(f"layouts: need {shape.moe_layers} (one per MoE layer) of {shape.experts} experts on {n} ranks")
    if m.comm in ("exchange", "allgather") and any(x.owners() is None for x in layouts):
        raise PerfModelError(f"mode {m.name!r} needs one owner per expert (no split or replicated experts)")

    speeds = host_speeds(ranks)
    alone = speeds[0][0]  # rank 0's speed while the others wait (central's dense part)
    parts = {"dense": 0.0, "experts": 0.0, "comm": 0.0, "wait": 0.0, "head": 0.0, "fixed": 0.0}
    shares_cores = n > 1 and any(r.rendezvous for r in ranks)
    drawn: Dict[Tuple, np.ndarray] = {}
    for layer in range(shape.layers):
        moe_index = _moe_index(shape, layer)
        moe = moe_index is not None
        dense = [_dense_seconds(shape, m, r, n, tokens, phase, context, moe) for r in ranks]
        if m.dense == "rank0":
            # The workers wait (and yield their cores) while rank 0 runs the dense part.
            dense = [dense[0]] + [0.0] * (n - 1)
            dense_t = dense[0] / alone
        else:
            dense_t = max(dense)
        comm = 0.0
        experts_t = 0.0
        if moe:
            layout = layouts[moe_index]
            probs = routing.layer_probs(moe_index)
            key = (probs, layout)
            if key not in drawn:
                counts = route_counts(shape.experts, shape.top_k, tokens, probs, routing.seed)
                if layout.replicated:
                    counts = counts[:REPLICA_SAMPLES]
                drawn[key] = (counts, _expert_seconds(shape, ranks, counts, layout))
            counts, per_rank = drawn[key]
            owners = layout.owners()
            lay_owners = None if owners is None else np.asarray(owners)
            if imbalance is not None:
                busiest = per_rank.mean(axis=1) * imbalance[moe_index]
                with_dense = busiest + max(dense)
            else:
                with_dense = shared_makespan(per_rank + np.asarray(dense), speeds)
            if m.dense == "rank0":
                experts_t = float(shared_makespan(per_rank, speeds).mean())
            else:
                experts_t = float(with_dense.mean()) - dense_t
            comm = _moe_comm(shape, m, link, n, tokens, counts, lay_owners, ar_path)
        if m.comm == "allreduce2" and n > 1:
            comm += link.allreduce_seconds(tokens * shape.hidden * shape.act_bytes, n, ar_path)
            if not moe:
                comm += link.allreduce_seconds(tokens * shape.hidden * shape.act_bytes, n, ar_path)
        if m.comm == "allreduce-heads" and n > 1:  # the attention's, on the MoE layer's data path
            comm += link.allreduce_seconds(tokens * shape.hidden * 4, n, ar_path)
        if shares_cores:
            parts["wait"] += _rendezvous(m, np.asarray(dense), per_rank if moe else None, speeds, ranks)
        parts["dense"] += dense_t
        parts["experts"] += experts_t
        parts["comm"] += comm
        parts["fixed"] += layer_fixed
    head_bytes = shape.lm_head_bytes / (n if m.head == "split" else 1)  # the busiest rank's rows (to a row)
    parts["head"] = float(max(r.kernel_seconds(shape.fmt, head_bytes, tokens, shape.weight_bits) for r in ranks))
    if m.head == "split" and n > 1:  # the logits' all-gather: each rank receives (N-1)/N of them, half a ring all-reduce
        parts["comm"] += link.allreduce_seconds(tokens * shape.vocab * shape.act_bytes / 2, n, ar_path)
    if m.dense == "rank0":
        parts["head"] /= alone
    parts["fixed"] += step_fixed
    seconds = sum(parts.values())
    return Prediction(m.name, n, phase, tokens, seconds, parts["comm"], parts)


def _rendezvous(m: Mode, dense: np.ndarray, per_rank: Optional[np.ndarray], speeds, ranks) -> float:
    """Expected extra wait of one layer's collectives where ranks share cores (:func:`rendezvous_wait`).

    Each collective waits on the compute since the one before: in tensor
    parallelism and the ``+heads`` modes the attention, then the experts
    (a dense layer's two halves alike); in the others the whole layer.
    """
    two = m.comm in ("allreduce2", "allreduce-heads")
    if per_rank is None:  # a dense layer: collectives only in tensor parallelism
        return 2 * float(rendezvous_wait(dense[None] / 2, speeds, ranks).mean()) if m.comm == "allreduce2" else 0.0
    if two:
        return float(rendezvous_wait(dense[None], speeds, ranks).mean() + rendezvous_wait(per_rank, speeds, ranks).mean())
    return float(rendezvous_wait(per_rank + dense, speeds, ranks).mean())


def _moe_index(shape: ModelShape, layer: int) -> Optional[int]:
    """The MoE layer index of decoder layer ``layer``, or None for a dense layer.

    The dense layers are taken to come first (DeepSeek's ``first_k_dense``);
    where they sit does not change a sum over layers.
    """
    first = shape.dense_layers
    return None if layer < first else layer - first


def _moe_comm(shape: ModelShape, m: Mode, link: Optional[Link], n: int, tokens: int, counts: np.ndarray,
              owners: Optional[np.ndarray], ar_path: str) -> float:
    """The link's seconds in one MoE layer."""
    if n == 1 or m.comm == "none":
        return 0.0
    values = tokens * shape.hidden
    if m.comm in ("allreduce", "allreduce-heads"):
        # The mpi4py path sums 16-bit activations as float32: 4 bytes a value.
        return link.allreduce_seconds(values * 4, n, ar_path)
    if m.comm == "allreduce2":
        return link.allreduce_seconds(values * shape.act_bytes, n, ar_path)
    if m.comm == "exchange":
        return _central_exchange(shape, link, counts, owners, tokens)
    if m.comm == "allgather":
        # Each rank sends one output row per local pair to each of the others, at once.
        busiest_pairs = max(counts[:, owners == r].sum(axis=1).mean() for r in range(n))
        return link.latency + (n - 1) * busiest_pairs * shape.hidden * shape.act_bytes / link.bandwidth
    raise PerfModelError(f"mode {m.name!r}: unknown communication {m.comm!r}")


# ---------------------------------------------------------------------------
# Bytes read and memory held
# ---------------------------------------------------------------------------


def bytes_per_step(parts: Dict[str, float], mode: str, size: int, batch: int,
                   layouts: Optional[Sequence[Layout]] = None) -> float:
    """Weight bytes the slowest rank reads in one decode step of ``batch`` tokens (uniform routing).

    Args:
        parts: :meth:`ModelShape.parts`.
        layouts: Per MoE layer, where the experts are, as the run placed
            them (``model.ep_info.layouts``); the experts' bytes then come
            from them (:func:`layout_experts_read`). Needed for ``auto``,
            whose layouts are its own; without them ``ep`` and ``central``
            are taken as contiguous whole experts, ``sliced`` as 1/N of each.

    Dense: attention (1/N for tensor parallel), routers and the LM head;
    experts: every distinct chosen expert (single), 1/N of each (sliced,
    tensor parallel), or the busiest rank's whole experts (ep, central, and
    any mode not in :data:`MODES`).

    Raises:
        PerfModelError: ``auto`` without ``layouts`` (its bytes are not ep's).
    """
    m = MODES.get(mode, MODES["ep"])
    e, k = parts["num_experts"], parts["top_k"]
    moe_layers = parts.get("moe_layers", parts["layers"])
    attention = parts["attention_per_layer"] / (size if m.dense in ("split", "heads") else 1)
    head = parts["lm_head"] / (size if m.head == "split" else 1)
    dense = parts["layers"] * attention + moe_layers * parts["router_per_layer"] + head
    if layouts is not None and m.experts != "sliced" and m.name != "single":
        if len(layouts) != moe_layers or any(x.num_ranks != size or x.num_experts != e for x in layouts):
            raise PerfModelError(f"layouts: need {moe_layers} (one per MoE layer) of {e} experts on {size} ranks")
        read: Dict[Layout, float] = {}  # layers often share a layout; each is drawn once
        for x in layouts:
            if x not in read:
                read[x] = layout_experts_read(x, k, batch)
        return dense + sum(read[x] for x in layouts) * parts["expert"]
    if m.experts == "balanced":
        raise PerfModelError(f"mode {mode!r}: the bytes read depend on its layouts; pass them")
    if m.experts == "sliced":
        experts = expected_experts(e, k, batch, None) * parts["expert"] / size
    elif size == 1 or m.name == "single":  # single: one process reads them all
        experts = expected_experts(e, k, batch, None) * parts["expert"]
    else:
        experts = expected_experts(e, k, batch, contiguous_owners(e, size)) * parts["expert"]
    return dense + moe_layers * experts


def layout_experts_read(layout: Layout, top_k: int, batch: int, seed: int = 0) -> float:
    """Expected experts' worth of weights the busiest rank reads in one step of ``batch`` tokens on ``layout``.

    Uniform routing, the draws of :func:`expected_experts` (the same seed,
    so a one-holder contiguous layout gives exactly its figure). A rank
    reads each whole expert it computes rows of (a replicated expert's rows
    go where :func:`rank_rows` sends them, as in a run) and its 1/N slice of
    every chosen split expert.
    """
    e, n = layout.num_experts, layout.num_ranks
    counts = route_counts(e, top_k, batch, seed=seed)  # [S, E]
    whole = (rank_rows(layout, counts) > 0).sum(axis=1)  # [S, N]: whole experts each rank reads
    split = np.array([not h for h in layout.holders])
    sliced = ((counts > 0) & split).sum(axis=1, keepdims=True) / n  # [S, 1]: its slices, on every rank
    return float((whole + sliced).max(axis=1).mean())


def memory_per_rank(shape: ModelShape, mode: str, size: int, kv_tokens: int,
                    layouts: Optional[Sequence[Layout]] = None) -> List[float]:
    """Bytes each rank holds: its weights plus its KV cache of ``kv_tokens`` tokens (all sequences).

    ep / auto / central / allgather: the dense part (rank 0 only in
    central), per layer the rank's whole experts (``layouts``, default
    :func:`default_layouts`) and 1/N of each split one; sliced: the dense
    part and 1/N of every expert; tensor parallel: 1/N of attention, dense
    MLPs, experts and KV heads, the routers, embedding and LM head whole;
    ``+heads``: the busiest rank's share of the attention and KV cache.
    """
    m = get_mode(mode)
    kv = kv_tokens * shape.kv_bytes_per_token
    routers = shape.moe_layers * shape.router_bytes
    head_rows = 1 if m.head != "split" or shape.tied_embeddings else size  # a tied head is the embedding, kept whole
    whole = shape.lm_head_bytes / head_rows + shape.embedding_bytes + shape.norm_bytes
    attention = shape.layers * shape.attention_bytes + shape.dense_layers * shape.dense_mlp_bytes
    experts = shape.moe_layers * (shape.experts * shape.expert_bytes + shape.shared_bytes)
    if m.dense == "split":
        return [whole + routers + (attention + experts + kv) / size] * size
    if m.dense == "heads":  # the busiest rank's heads, and their KV cache
        share = head_share(shape, size)
        dense_mlps = shape.dense_layers * shape.dense_mlp_bytes
        attention = (attention - dense_mlps) * share + dense_mlps
        kv = kv * share
    if m.experts == "sliced":
        return [whole + routers + attention + experts / size + kv] * size
    layouts = layouts if layouts is not None else default_layouts(shape, mode, size)
    out = []
    for r in range(size):
        held = sum(len(x.whole_on(r)) + len(x.split) / size for x in layouts)  # experts' worth, all layers
        own = held * shape.expert_bytes + shape.moe_layers * shape.shared_bytes / size
        dense = whole + routers + attention + kv
        if m.dense == "rank0":
            own += (shape.moe_layers * shape.shared_bytes * (size - 1) / size) if r == 0 else -shape.moe_layers * shape.shared_bytes / size
            dense = dense if r == 0 else 0.0
        out.append(float(dense + own))
    return out
