"""How much memory each rank of a run needs, planned without reading weights.

Reads only ``config.json`` and the safetensors headers: no tensor data, no
MPI. The byte counts are not a formula. The model is built with mlx-lm's own
classes (lazily: no parameter is ever evaluated, so nothing is allocated),
quantized like :mod:`moe_mpi.loading` does it, and put through the real
sharding pass (:func:`moe_mpi.shard.shard_structure`) once per rank with a
stand-in communicator (:class:`PlanningComm`). Each rank's parameters are
then filled with placeholders of the checkpoint's dtypes and the exact
slices that :func:`moe_mpi.load` would read, and their ``nbytes`` are
summed. So the weights are exactly what ``load`` holds on that rank; the KV
cache and activations are estimates, and :class:`MemoryPlan` says what they
include.

``moe-mpi info`` (:mod:`moe_mpi.info`) prints a :class:`MemoryPlan`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .attention import kv_share
from .loading import LoadPlan, plan_load, read_config, read_parameters, resolve_model_path
from .layout import Layout
from .placement import ExpertPlacement
from .safetensors_io import CheckpointIndex, ShapeOnlyIndex, dtype_name
from .shard import find_moe_blocks, shared_children
from .slicing import Plan, StackOf, TakeSplit

__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_PREFILL_STEP",
    "MemoryPlan",
    "PlanningComm",
    "PlanningError",
    "RankMemory",
    "human_bytes",
    "plan_memory",
]

#: mlx-lm's generate_step feeds the prompt in chunks of this many tokens.
DEFAULT_PREFILL_STEP = 2048
DEFAULT_CONTEXT = 4096


class PlanningError(ValueError):
    """Input that cannot be planned for (the message says why)."""


class PlanningComm:
    """Stands in for a :class:`moe_mpi.Communicator` while planning.

    ``shard_structure`` only reads ``rank`` and ``size`` and keeps the object
    for the forward pass, which planning never runs.
    """

    def __init__(self, rank: int, size: int):
        self.rank = rank
        self.size = size

    def all_sum(self, x):
        raise RuntimeError("a memory plan never runs the model")


@dataclass
class RankMemory:
    """Bytes one rank holds (weights exactly; KV cache and activations estimated)."""

    rank: int
    num_experts: int
    replicated_bytes: int
    expert_bytes: int
    shared_expert_bytes: int
    kv_cache_bytes: Optional[int]
    activation_bytes: int
    load_buffer_bytes: int

    @property
    def weight_bytes(self) -> int:
        return self.replicated_bytes + self.expert_bytes + self.shared_expert_bytes

    @property
    def peak_bytes(self) -> int:
        # Read buffers exist only while loading, before any KV cache does.
        runtime = (self.kv_cache_bytes or 0) + self.activation_bytes
        return self.weight_bytes + max(runtime, self.load_buffer_bytes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(weight_bytes=self.weight_bytes, peak_bytes=self.peak_bytes)
        return d


@dataclass
class MemoryPlan:
    """Everything ``moe-mpi info`` prints."""

    model_path: str
    model_type: str
    architecture: Optional[str]
    num_layers: int
    num_moe_layers: int
    num_experts: Tuple[int, ...]
    top_k: Optional[int]
    quantization: Optional[dict]
    checkpoint_dtypes: Dict[str, int]
    checkpoint_files: int
    checkpoint_bytes: int
    num_ranks: int
    placement_strategy: str
    placements: Tuple[ExpertPlacement, ...]
    layouts: Tuple[Layout, ...]
    context: int
    prefill_step: int
    kv_bytes_per_token: Optional[int]
    kv_description: str
    activation_description: str
    ranks: List[RankMemory] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("placements", "ranks", "layouts")}
        d["layouts"] = [layout.to_dict() for layout in self.layouts]
        d["placements"] = [
            {"num_experts": p.num_experts, "experts_per_rank": [list(p.local_experts(r)) for r in range(p.num_ranks)]}
            for p in self.placements
        ]
        d["ranks"] = [r.to_dict() for r in self.ranks]
        return d


# ---------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------


def human_bytes(n: Optional[int]) -> str:
    """Bytes in binary units, e.g. ``1.50 GiB``."""
    if n is None:
        return "n/a"
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exp:.2f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exp]}"


def _read_buffer_bytes(plan: Plan, model_params: Dict[str, mx.array], tensors: dict, raw: dict) -> int:
    """The largest extra buffer ``load`` holds while reading one sharded tensor.

    Rows read in place cost one copy of the slice (the numpy read buffer);
    stacks and slices along other axes read whole tensors first, then copy.
    """
    largest = 0
    for path, src in plan.items():
        held = model_params[path].nbytes
        if isinstance(src, StackOf) or (not isinstance(src, TakeSplit) and src.axis == 0):
            extra = held
        elif isinstance(src, TakeSplit):  # the experts' rows, then their slice
            whole = (tensors.get(src.key) if src.key in tensors else raw[src.key])
            extra = 2 * whole.nbytes * len(src.experts) // whole.shape[0]
        else:
            whole = (tensors.get(src.key) if src.key in tensors else raw[src.key]).nbytes
            extra = 2 * whole
        largest = max(largest, extra)
    return largest


def _first(obj, config: dict, *names):
    """The first of ``names`` set on ``obj`` (model args) or in ``config``."""
    for name in names:
        for value in (getattr(obj, name, None), config.get(name)):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return int(value)
    return None


def _top_k(blocks, config: dict) -> Optional[int]:
    names = ("num_experts_per_tok", "top_k", "moe_top_k", "n_activated_experts", "num_activated_experts")
    for moe in blocks:
        for module in [moe.block, *moe.block.children().values()]:
            value = _first(module, {}, *names)
            if value:
                return value
    ffn = config.get("ffn_config") or {}
    return _first(None, {**ffn, **config}, *names)


def _activation_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype of the hidden states: what the token embedding outputs."""
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedEmbedding):
            return m.scales.dtype
        if isinstance(m, nn.Embedding):
            return m.weight.dtype
    floats = [a.dtype for _, a in tree_flatten(model.parameters()) if mx.issubdtype(a.dtype, mx.floating)]
    return max(set(floats), key=floats.count) if floats else mx.float16


def _kv_per_token(model: nn.Module, config: dict, context: int, dtype: mx.Dtype):
    """KV-cache bytes per token and for ``context`` tokens, from the config.

    Returns:
        ``(bytes_per_token, bytes_at_context, description)``; the byte counts
        are None where the attention layout is not known.
    """
    from mlx_lm.models import cache as mlx_cache

    args = getattr(model, "args", None)
    attn = config.get("attn_config") or {}
    try:
        caches = mlx_cache.make_prompt_cache(model)
    except Exception as e:  # a model's make_cache may need things we don't have
        return None, None, f"KV cache not estimated (make_prompt_cache failed: {type(e).__name__})"
    full, windows, recurrent, other = 0, [], 0, {}
    growing = tuple(
        getattr(mlx_cache, n) for n in ("KVCache", "ConcatenateKVCache", "ChunkedKVCache") if hasattr(mlx_cache, n)
    )
    for c in caches:
        if isinstance(c, mlx_cache.RotatingKVCache):
            windows.append(c.max_size)
        elif isinstance(c, growing):
            full += 1
        elif isinstance(c, getattr(mlx_cache, "ArraysCache", ())):
            recurrent += 1  # linear attention / SSM state: fixed size, small
        else:
            other[type(c).__name__] = other.get(type(c).__name__, 0) + 1
    step = getattr(mlx_cache.KVCache, "step", 1)

    if _first(args, config, "kv_lora_rank"):
        # mlx-lm's MLA caches the compressed latent and the rope key, one "head".
        latent = _first(args, config, "kv_lora_rank")
        rope = _first(args, config, "qk_rope_head_dim") or 0
        per_layer = latent + rope
        layout = f"(MLA latent {latent} + rope key {rope})"
    else:
        heads = _first(args, config, "num_attention_heads", "n_heads", "num_heads", "n_head")
        kv_heads = _first(args, {**attn, **config}, "num_key_value_heads", "n_kv_heads", "num_kv_heads", "kv_n_heads")
        kv_heads = kv_heads or heads
        head_dim = _first(args, config, "head_dim")
        hidden = _first(args, config, "hidden_size", "d_model", "dim")
        if head_dim is None and heads and hidden:
            head_dim = hidden // heads
        if not (kv_heads and head_dim):
            model_type = config.get("model_type")
            return None, None, f"KV cache not estimated (unknown attention layout for model_type={model_type!r})"
        per_layer = 2 * kv_heads * head_dim
        layout = f"(K and V: 2 x {kv_heads} KV heads x {head_dim} dims)"
    size = dtype.size
    per_token = (full + len(windows)) * per_layer * size
    # mlx-lm's KVCache grows in steps of KVCache.step (256) tokens.
    allocated = -(-context // step) * step
    at_context = size * per_layer * (full * allocated + sum(min(allocated, w) for w in windows))
    parts = [f"{full} full-attention layers"]
    if windows:
        parts.append(f"{len(windows)} sliding-window layers (which stop growing at {max(windows)} tokens)")
    text = (
        f"{' + '.join(parts)} x {per_layer} values {layout} x {size} bytes ({dtype_name(dtype)}) "
        f"= {human_bytes(per_token)} per token"
    )
    if allocated != context and full:
        text += f"; mlx-lm allocates the cache in {step}-token steps, so {context} tokens take {allocated}"
    if recurrent:
        text += f"; {recurrent} layers with a fixed-size recurrent state (not included)"
    for name, count in other.items():
        text += f"; {count} layers with a {name} (not included)"
    return per_token, at_context, text


def _activations(model: nn.Module, config: dict, blocks, top_k, tokens: int, dtype: mx.Dtype):
    """A stated estimate of transient activations for one prefill chunk."""
    args = getattr(model, "args", None)
    hidden = _first(args, config, "hidden_size", "d_model", "dim")
    heads = _first(args, config, "num_attention_heads", "n_heads", "num_heads") or 0
    head_dim = _first(args, config, "head_dim") or (hidden // heads if hidden and heads else 0)
    switch = blocks[0].switch
    first_proj = next(iter(switch.children().values()))
    inter = first_proj.output_dims
    hidden = hidden or first_proj.input_dims
    k = top_k or 1
    size = dtype.size
    # Per token: residual stream, normed input, attention output and MoE output
    # (4 x D); q/k/v/o projections (~4 x H x head_dim); the routed copies of
    # the input and expert outputs (2k x D) and gate/up/activation
    # intermediates (3k x I); plus float32 all-reduce send/receive buffers.
    per_token = (4 * hidden + 4 * heads * head_dim + 2 * k * hidden + 3 * k * inter) * size + 2 * 4 * hidden
    text = (
        f"one {tokens}-token prefill chunk through one layer: hidden states, attention "
        f"projections, top-{k} expert intermediates ({inter} wide) and float32 all-reduce "
        "buffers; attention score matrices are not included (MLX's fused attention does "
        "not materialise them on Apple GPUs), nor MLX's buffer cache or the Python runtime"
    )
    return tokens * per_token, text


def _quantization(config: dict) -> Optional[dict]:
    q = config.get("quantization")
    if not isinstance(q, dict):
        return None
    out = {k: q[k] for k in ("bits", "group_size", "mode") if k in q}
    out.setdefault("mode", "affine")
    overrides = [k for k, v in q.items() if isinstance(v, dict)]
    if overrides:
        out["per_layer_overrides"] = len(overrides)
    return out


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------


def _plan_rank(model_path: Path, rank: int, num_ranks: int, placement, weights, mode: str, options: dict) -> LoadPlan:
    """One rank's load plan, its model filled with shape-only placeholders."""
    # The real loader's plan, with reads that return shapes, not data. No block runs, so the
    # partial-sum check (which computes, allocating the routers) is left to the load itself.
    lp = plan_load(model_path, PlanningComm(rank, num_ranks), placement, weights, None, mode, **options,
                   check_contract=False)
    params = read_parameters(lp, ShapeOnlyIndex(lp.index), evaluate=False)
    # strict: the shapes are checked exactly as they are by a real load.
    lp.model.load_weights(params, strict=True)
    return lp


def _bytes_by_kind(flat: Dict[str, mx.array], blocks) -> Dict[str, int]:
    """Bytes of the replicated part, the routed experts and the shared experts."""
    switch = tuple(f"{b.path}.{b.switch_name}." if b.path else f"{b.switch_name}." for b in blocks)
    shared = tuple(
        f"{b.path}.{n}." if b.path else f"{n}." for b in blocks for n in shared_children(b.block)
    )
    sizes = {"replicated": 0, "experts": 0, "shared": 0}
    for path, a in flat.items():
        kind = "experts" if path.startswith(switch) else "shared" if path.startswith(shared) else "replicated"
        sizes[kind] += a.nbytes  # shape x itemsize: nothing is evaluated
    return sizes


def _model_facts(model: nn.Module, config: dict, blocks, context: int, prefill_step: int):
    """What every rank shares: the model's shape and the per-rank estimates.

    Returns:
        ``(fields, kv_bytes, activation_bytes)``: ``fields`` are
        :class:`MemoryPlan` fields; the byte counts are each rank's KV cache
        at ``context`` tokens (None if unknown) and activations.
    """
    dtype = _activation_dtype(model)
    top_k = _top_k(blocks, config)
    per_token, kv_bytes, kv_text = _kv_per_token(model, config, context, dtype)
    tokens = min(context, prefill_step)
    act_bytes, act_text = _activations(model, config, blocks, top_k, tokens, dtype)
    fields = dict(
        model_type=str(config.get("model_type")),
        architecture=(config.get("architectures") or [None])[0],
        num_layers=len(getattr(model, "layers", [])) or len(blocks),
        num_moe_layers=model.ep_info.num_moe_layers,
        num_experts=tuple(sorted({b.num_experts_total for b in blocks})),
        placements=model.ep_info.placements,
        layouts=model.ep_info.layouts,
        top_k=top_k,
        kv_bytes_per_token=per_token,
        kv_description=kv_text,
        activation_description=act_text,
    )
    return fields, kv_bytes, act_bytes


def _placement_strategy(placement, weights: Optional[Sequence[float]], mode: str = "ep", stats=None,
                        balance: str = "both", replicas: float = 0.0) -> str:
    if mode != "ep" or stats is not None:
        text = f"mode {mode}"
        if mode == "auto":
            text += f", balance {balance}" + (f", replicas {replicas:g}" if balance != "split" else "")
        return text + (", by router statistics" if stats is not None else "")
    if isinstance(placement, ExpertPlacement):
        return "explicit"
    if weights is not None:
        return f"contiguous, weights {','.join(f'{w:g}' for w in weights)}"
    return str(placement or "contiguous")


def _checkpoint_dtypes(index: CheckpointIndex) -> Dict[str, int]:
    """Bytes of the checkpoint per safetensors dtype."""
    dtypes: Dict[str, int] = {}
    for t in index.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
    return dtypes


def plan_memory(
    path_or_repo: Union[str, Path],
    num_ranks: int,
    placement: Union[ExpertPlacement, str, None] = None,
    weights: Optional[Sequence[float]] = None,
    context: int = DEFAULT_CONTEXT,
    prefill_step: int = DEFAULT_PREFILL_STEP,
    mode: str = "ep",
    stats=None,
    layouts=None,
    replicas: float = 0.0,
    balance: str = "both",
    profile=None,
    attention: str = "replicated",
    lm_head: str = "replicated",
) -> MemoryPlan:
    """Computes, without reading tensor data, what each of ``num_ranks`` ranks holds.

    Args:
        path_or_repo: A local model directory (or a Hugging Face repo that is
            already in the local cache: nothing is downloaded).
        num_ranks: Number of ranks (``mpirun -np``).
        placement: As for :func:`moe_mpi.load`: ``"contiguous"`` (default),
            ``"round-robin"``, a JSON file or an ``ExpertPlacement``.
        weights: Optional relative share of experts per rank.
        context: Tokens of context the KV-cache estimate is for.
        prefill_step: Prompt tokens per forward pass while prefilling.
        mode, stats, layouts, replicas, balance, profile, attention, lm_head: As
            for :func:`moe_mpi.load` (with ``attention="split"`` each rank's KV
            cache is its heads' share).

    Returns:
        The plan, one :class:`RankMemory` per rank.

    Raises:
        PlanningError, CheckpointError, ModelNotFoundError, ValueError: With
        a message that says what is wrong with the input.
    """
    if num_ranks < 1:
        raise PlanningError(f"--np must be at least 1, got {num_ranks}")
    if context < 1 or prefill_step < 1:
        raise PlanningError(
            f"--context and --prefill-step must be positive, got {context} and {prefill_step}"
        )
    model_path = resolve_model_path(path_or_repo, download=False)
    config = read_config(model_path)

    ranks: List[RankMemory] = []
    facts = None
    for rank in range(num_ranks):
        lp = _plan_rank(model_path, rank, num_ranks, placement, weights, mode,
                        dict(stats=stats, layouts=layouts, replicas=replicas, balance=balance, profile=profile,
                             attention=attention, lm_head=lm_head))
        model = lp.model
        blocks = find_moe_blocks(model)
        flat = dict(tree_flatten(model.parameters()))
        sizes = _bytes_by_kind(flat, blocks)
        if facts is None:
            facts = _model_facts(model, config, blocks, context, prefill_step)
        fields, kv_bytes, act_bytes = facts
        ranks.append(
            RankMemory(
                rank=rank,
                num_experts=max(len(layout.whole_on(rank)) for layout in model.ep_info.layouts),
                replicated_bytes=sizes["replicated"],
                expert_bytes=sizes["experts"],
                shared_expert_bytes=sizes["shared"],
                kv_cache_bytes=None if kv_bytes is None else int(round(kv_bytes * kv_share(model))),
                activation_bytes=act_bytes,
                load_buffer_bytes=_read_buffer_bytes(lp.plan, flat, lp.tensors, lp.raw),
            )
        )

    index = lp.index
    return MemoryPlan(
        model_path=str(model_path),
        quantization=_quantization(config),
        checkpoint_dtypes=_checkpoint_dtypes(index),
        checkpoint_files=len(index.files),
        checkpoint_bytes=sum(t.nbytes for t in index.tensors.values()),
        num_ranks=num_ranks,
        placement_strategy=_placement_strategy(placement, weights, mode, stats, balance, replicas)
        + (", attention split by heads" if attention == "split" else "")
        + (", LM head split by vocabulary rows" if lm_head == "split" else ""),
        context=context,
        prefill_step=prefill_step,
        ranks=ranks,
        **fields,
    )
