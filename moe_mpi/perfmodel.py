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

from .profiles import Link, Machine

__all__ = [
    "MODES",
    "Mode",
    "ModelShape",
    "PerfModelError",
    "Prediction",
    "Routing",
    "bytes_per_step",
    "expected_experts",
    "memory_per_rank",
    "predict",
    "register_mode",
    "route_counts",
]

#: Routing draws per estimate at one token (fewer for many tokens, see route_counts).
N_SAMPLES = 20000
_MAX_DRAWS = 4_000_000  # samples x tokens x experts per estimate

_ACT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PerfModelError(ValueError):
    """A model, mode or input the performance model cannot use (the message says why)."""


# ---------------------------------------------------------------------------
# The model's shape and bytes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the performance model needs of an MoE model: sizes and weight format.

    Bytes per weight: ``weight_bits / 8``; a quantized format's bits include
    its per-group scale and bias (``bits + 2 * 8 * scale_bytes / group_size``).
    """

    name: str
    layers: int
    moe_layers: int
    hidden: int  # D
    vocab: int  # V
    heads: int
    kv_heads: int
    head_dim: int
    experts: int  # E routed experts per MoE layer
    top_k: int
    expert_inter: int  # I: a routed expert's intermediate size
    shared_inter: int = 0  # the shared experts' intermediate size in all
    dense_inter: int = 0  # intermediate size of the dense MLP of non-MoE layers
    fmt: str = "float32"  # weight format: float32, bfloat16, float16, q4, q8, ...
    weight_bits: float = 32.0
    router_bits: float = 32.0
    act_bytes: int = 4  # activations and KV cache
    tied_embeddings: bool = False

    def __post_init__(self):
        if self.experts < 1 or self.moe_layers < 1:
            raise PerfModelError(f"model {self.name!r} has no MoE layers (experts={self.experts}, MoE layers={self.moe_layers})")
        if not 1 <= self.top_k <= self.experts:
            raise PerfModelError(f"model {self.name!r}: top_k={self.top_k} must be in 1..experts={self.experts}")

    def _bytes(self, params: float, bits: Optional[float] = None) -> float:
        return params * (self.weight_bits if bits is None else bits) / 8

    @property
    def attention_bytes(self) -> float:
        """q, k, v and o projections of one layer."""
        d, hd = self.hidden, self.head_dim
        return self._bytes(2 * d * self.heads * hd + 2 * d * self.kv_heads * hd)

    @property
    def router_bytes(self) -> float:
        return self._bytes(self.hidden * self.experts, self.router_bits)

    @property
    def expert_bytes(self) -> float:
        """One routed expert of one layer: gate, up and down projections."""
        return self._bytes(3 * self.hidden * self.expert_inter)

    @property
    def shared_bytes(self) -> float:
        return self._bytes(3 * self.hidden * self.shared_inter)

    @property
    def dense_mlp_bytes(self) -> float:
        return self._bytes(3 * self.hidden * self.dense_inter)

    @property
    def lm_head_bytes(self) -> float:
        return self._bytes(self.vocab * self.hidden)

    @property
    def embedding_bytes(self) -> float:
        return 0.0 if self.tied_embeddings else self.lm_head_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """KV cache of one token of one sequence, all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * self.act_bytes

    @property
    def norm_bytes(self) -> float:
        return (self.layers * 2 + 1) * self.hidden * self.act_bytes

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def weight_bytes(self) -> float:
        """All weights of the model."""
        per_layer = self.attention_bytes
        moe = self.router_bytes + self.experts * self.expert_bytes + self.shared_bytes
        return (self.layers * per_layer + self.moe_layers * moe + self.dense_layers * self.dense_mlp_bytes
                + self.lm_head_bytes + self.embedding_bytes + self.norm_bytes)

    def parts(self) -> Dict[str, float]:
        """The byte counts by part, as ``moe-mpi bench roofline`` prints them."""
        return {
            "attention_per_layer": self.attention_bytes,
            "router_per_layer": self.router_bytes,
            "expert": self.expert_bytes,
            "lm_head": self.lm_head_bytes,
            "layers": self.layers,
            "moe_layers": self.moe_layers,
            "num_experts": self.experts,
            "top_k": self.top_k,
        }

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> "ModelShape":
        """The shape of an mlx-lm / Hugging Face ``config.json`` dict.

        Reads qwen3_moe, qwen2_moe, mixtral and dbrx key names (and the
        ``quantization`` entry mlx-lm writes).

        Raises:
            PerfModelError: No MoE layers, or a layout the byte model does
                not cover (DeepSeek's MLA attention), naming the key.
        """
        flat = {**(config.get("attn_config") or {}), **(config.get("ffn_config") or {}), **config}
        name = name or str(config.get("_name_or_path") or config.get("model_type") or "model")

        def get(*keys, default=None):
            for k in keys:
                v = flat.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    return v
            return default

        if "kv_lora_rank" in flat:
            raise PerfModelError(f"model {name!r}: multi-head latent attention (kv_lora_rank) is not in the byte model")
        experts = get("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", default=0)
        if not experts:
            raise PerfModelError(
                f"model {name!r} ({config.get('model_type')}) has no MoE layers: its config has no "
                "num_experts / num_local_experts / n_routed_experts / moe_num_experts"
            )
        hidden = get("hidden_size", "d_model", "dim")
        layers = get("num_hidden_layers", "n_layers")
        heads = get("num_attention_heads", "n_heads")
        if not (hidden and layers and heads):
            raise PerfModelError(f"model {name!r}: config lacks hidden_size, num_hidden_layers or num_attention_heads")
        kv = get("num_key_value_heads", "kv_n_heads", "n_kv_heads", default=heads)
        inter = get("moe_intermediate_size", "ffn_hidden_size", "intermediate_size")
        if not inter:
            raise PerfModelError(f"model {name!r}: config gives no expert intermediate size (moe_intermediate_size)")
        step = get("decoder_sparse_step", default=1) or 1
        dense_only = set(config.get("mlp_only_layers") or [])
        first_dense = get("first_k_dense_replace", default=0)
        moe_layers = sum(1 for i in range(int(layers)) if (i + 1) % step == 0 and i not in dense_only and i >= first_dense)
        shared = get("shared_expert_intermediate_size", default=0)
        if not shared and get("n_shared_experts"):
            shared = get("n_shared_experts") * inter
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
        act = _ACT_BYTES.get(dtype, 2)
        fmt, bits, router_bits = dtype, 8.0 * act, 8.0 * act
        q = config.get("quantization") or config.get("quantization_config")
        if isinstance(q, dict) and q.get("bits"):
            group = q.get("group_size", 64)
            fmt = f"q{q['bits']}"
            bits = q["bits"] + 2 * 8 * act / group
            gates = [v for k, v in q.items() if isinstance(v, dict) and k.endswith(("mlp.gate", "router"))]
            router_bits = (gates[0]["bits"] + 2 * 8 * act / gates[0].get("group_size", group)) if gates else bits
        return cls(
            name=name, layers=int(layers), moe_layers=moe_layers, hidden=int(hidden), vocab=int(get("vocab_size")),
            heads=int(heads), kv_heads=int(kv), head_dim=int(get("head_dim", default=hidden // heads)),
            experts=int(experts), top_k=int(get("num_experts_per_tok", "moe_top_k", "top_k")),
            expert_inter=int(inter), shared_inter=int(shared),
            dense_inter=int(get("intermediate_size", default=0) if moe_layers < layers else 0),
            fmt=fmt, weight_bits=bits, router_bits=router_bits, act_bytes=act,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


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
    return int(min(N_SAMPLES, max(64, _MAX_DRAWS // max(1, tokens * experts))))


def route_counts(experts: int, top_k: int, tokens: int, probs=None, seed: int = 0, samples: Optional[int] = None) -> np.ndarray:
    """``[S, E]``: (token, slot) pairs routed to each expert, in S draws of ``tokens`` tokens.

    Each token picks ``top_k`` distinct experts: uniformly, or in proportion
    to ``probs`` (``[E]``, Gumbel top-k).
    """
    rng = np.random.default_rng(seed)
    s = samples or _samples(tokens, experts)
    keys = rng.random((s, tokens, experts), dtype=np.float32)
    if probs is not None:
        # Gumbel top-k: log p + Gumbel noise, largest k = weighted draws without replacement.
        keys = np.log(np.maximum(np.asarray(probs, dtype=np.float32), 1e-30)) - np.log(-np.log(np.maximum(keys, 1e-12)))
    picks = np.argpartition(-keys, top_k - 1, axis=-1)[..., :top_k].reshape(s, -1)  # [S, T*k]
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
        experts: ``"whole"`` (a rank owns whole experts) or ``"sliced"``
            (every rank a 1/N slice of every expert).
        dense: ``"replicated"``, ``"split"`` (attention and dense MLPs 1/N,
            tensor parallel) or ``"rank0"`` (central router).
        comm: ``"allreduce"`` (one per MoE layer), ``"allreduce2"`` (two per
            layer), ``"exchange"`` (central), ``"allgather"`` (the paper's)
            or ``"none"``.
    """

    name: str
    experts: str
    dense: str
    comm: str
    description: str = ""


MODES: Dict[str, Mode] = {}


def register_mode(mode: Mode) -> None:
    """Adds a mode (e.g. a balancing mode: whole experts, its per-layer
    imbalance passed to :func:`predict`)."""
    MODES[mode.name] = mode


for _m in (
    Mode("ep", "whole", "replicated", "allreduce", "moe_mpi expert parallel: whole experts, one all-reduce per MoE layer"),
    Mode("sliced", "sliced", "replicated", "allreduce", "moe_mpi sliced: 1/N of every expert, one all-reduce per MoE layer"),
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
    numpy_modes = ("ep", "sliced", "mlx-lm-tp", "single")
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
    kernel = m.kernel_seconds
    t = kernel(shape.fmt, shape.attention_bytes / split, tokens, shape.weight_bits)
    heads = shape.heads / split
    if phase == "decode":
        # Every sequence reads its cached keys and values.
        kv = tokens * context * 2 * shape.kv_heads / split * shape.head_dim * shape.act_bytes
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


def _expert_seconds(shape: ModelShape, mode: Mode, ranks: Sequence[Machine], counts: np.ndarray,
                    owners: np.ndarray) -> np.ndarray:
    """``[S, N]``: each rank's expert time in each routing draw."""
    n = len(ranks)
    out = np.zeros((counts.shape[0], n))
    active = counts > 0
    for r, m in enumerate(ranks):
        if mode.experts == "sliced":
            t = m.kernel_seconds(shape.fmt, shape.expert_bytes / n, counts, shape.weight_bits, "expert") * active
        else:
            mine = owners == r
            t = m.kernel_seconds(shape.fmt, shape.expert_bytes, counts[:, mine], shape.weight_bits, "expert") * active[:, mine]
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
    owners: Optional[Sequence[Sequence[int]]] = None,
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
        owners: Per MoE layer, expert -> rank (default: contiguous).
        imbalance: Per MoE layer, the busiest rank's expert time over the
            mean rank's, for a mode that knows it (a balancing placement);
            replaces the drawn busiest rank.

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
    if imbalance is not None and len(imbalance) != shape.moe_layers:
        raise PerfModelError(f"imbalance: one value per MoE layer ({shape.moe_layers}), got {len(imbalance)}")
    path = code_path(m, phase, shape, ranks[0])
    ar_path = allreduce_path(m, path)
    layer_fixed, step_fixed = max((r.fixed_seconds(f"{path}/{phase}") for r in ranks), key=sum)
    routing = routing or Routing()
    default_owners = contiguous_owners(shape.experts, n) if m.experts == "whole" else None

    parts = {"dense": 0.0, "experts": 0.0, "comm": 0.0, "head": 0.0, "fixed": 0.0}
    drawn: Dict[Tuple, np.ndarray] = {}
    for layer in range(shape.layers):
        moe_index = _moe_index(shape, layer)
        moe = moe_index is not None
        dense = [_dense_seconds(shape, m, r, n, tokens, phase, context, moe) for r in ranks]
        if m.dense == "rank0":
            dense = [dense[0]] + [0.0] * (n - 1)
        comm = 0.0
        if not moe:
            experts_t = 0.0
            layer_t = max(dense)
        else:
            lay_owners = np.asarray(owners[moe_index]) if owners is not None else default_owners
            probs = routing.layer_probs(moe_index)
            key = (probs, None if lay_owners is None else tuple(lay_owners))
            if key not in drawn:
                counts = route_counts(shape.experts, shape.top_k, tokens, probs, routing.seed)
                drawn[key] = (counts, _expert_seconds(shape, m, ranks, counts, lay_owners))
            counts, per_rank = drawn[key]
            if imbalance is not None:
                busiest = per_rank.mean(axis=1) * imbalance[moe_index]
                with_dense = busiest + max(dense)
            else:
                with_dense = (per_rank + np.asarray(dense)).max(axis=1)
            if m.dense == "rank0":
                layer_t = dense[0] + float(per_rank.max(axis=1).mean())
            else:
                layer_t = float(with_dense.mean())
            experts_t = layer_t - max(dense)
            comm = _moe_comm(shape, m, link, n, tokens, counts, lay_owners, ar_path)
        if m.comm == "allreduce2" and n > 1:
            comm += link.allreduce_seconds(tokens * shape.hidden * shape.act_bytes, n, ar_path)
            if not moe:
                comm += link.allreduce_seconds(tokens * shape.hidden * shape.act_bytes, n, ar_path)
        parts["dense"] += max(dense)
        parts["experts"] += experts_t
        parts["comm"] += comm
        parts["fixed"] += layer_fixed
    parts["head"] = float(max(r.kernel_seconds(shape.fmt, shape.lm_head_bytes, tokens, shape.weight_bits) for r in ranks))
    parts["fixed"] += step_fixed
    seconds = sum(parts.values())
    return Prediction(m.name, n, phase, tokens, seconds, parts["comm"], parts)


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
    if m.comm == "allreduce":
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


def bytes_per_step(parts: Dict[str, float], mode: str, size: int, batch: int) -> float:
    """Weight bytes the slowest rank reads in one decode step of ``batch`` tokens (uniform routing).

    Args:
        parts: :meth:`ModelShape.parts`.

    Dense: attention (1/N for tensor parallel), routers and the LM head;
    experts: every distinct chosen expert (single), 1/N of each (sliced,
    tensor parallel), or the busiest rank's whole experts (ep, central, and
    any mode not in :data:`MODES`).
    """
    m = MODES.get(mode, MODES["ep"])
    e, k = parts["num_experts"], parts["top_k"]
    moe_layers = parts.get("moe_layers", parts["layers"])
    attention = parts["attention_per_layer"] / (size if m.dense == "split" else 1)
    dense = parts["layers"] * attention + moe_layers * parts["router_per_layer"] + parts["lm_head"]
    if m.experts == "sliced":
        experts = expected_experts(e, k, batch, None) * parts["expert"] / size
    elif size == 1 or m.name == "single":  # single: one process reads them all
        experts = expected_experts(e, k, batch, None) * parts["expert"]
    else:
        experts = expected_experts(e, k, batch, contiguous_owners(e, size)) * parts["expert"]
    return dense + moe_layers * experts


def memory_per_rank(shape: ModelShape, mode: str, size: int, kv_tokens: int) -> List[float]:
    """Bytes each rank holds: its weights plus its KV cache of ``kv_tokens`` tokens (all sequences).

    ep / central / allgather: the dense part (rank 0 only in central) and
    its whole experts (contiguous placement); sliced: the dense part and
    1/N of every expert; tensor parallel: 1/N of attention, dense MLPs,
    experts and KV heads, the routers, embedding and LM head whole.
    """
    m = get_mode(mode)
    kv = kv_tokens * shape.kv_bytes_per_token
    routers = shape.moe_layers * shape.router_bytes
    whole = shape.lm_head_bytes + shape.embedding_bytes + shape.norm_bytes
    attention = shape.layers * shape.attention_bytes + shape.dense_layers * shape.dense_mlp_bytes
    experts = shape.moe_layers * (shape.experts * shape.expert_bytes + shape.shared_bytes)
    if m.dense == "split":
        return [whole + routers + (attention + experts + kv) / size] * size
    if m.experts == "sliced":
        return [whole + routers + attention + experts / size + kv] * size
    owners = contiguous_owners(shape.experts, size)
    out = []
    for r in range(size):
        own = shape.moe_layers * (np.sum(owners == r) * shape.expert_bytes + shape.shared_bytes / size)
        dense = whole + routers + attention + kv
        if m.dense == "rank0":
            own += (shape.moe_layers * shape.shared_bytes * (size - 1) / size) if r == 0 else -shape.moe_layers * shape.shared_bytes / size
            dense = dense if r == 0 else 0.0
        out.append(float(dense + own))
    return out

