"""Attention split by heads across ranks (``attention="split"``, ``--attention split``).

By default the dense part is replicated: every rank computes every head, and
an MoE layer costs one all-reduce. With the split, each rank holds a
contiguous group of query heads and the key/value heads they read
(:func:`head_ranges`): its rows of the query, key and value projections, its
columns of the output projection, and its heads' KV cache. The attention's output is then this
rank's partial sum, and the attention ends in its own all-reduce, so a layer
costs two, as in tensor parallelism.

Whether that pays is a trade (docs/perfmodel.md, ``moe-mpi plan``): it saves
(N-1)/N of the attention weights and KV cache reads, memory and compute per
rank, and costs one all-reduce of ``[tokens, hidden]`` per layer. On one host
or over Thunderbolt RDMA the collective is cheap; at long context the KV
cache is a large share of a step. Over a slow link, replicated wins.

The pass works on any mlx-lm attention with separate (``q_proj``, ``k_proj``,
``v_proj``) or fused (``Wqkv``, ``qkv_proj``) projections, an output
projection, and its head counts as attributes. Because the module's own
``__call__`` runs on fewer heads, :func:`check_head_split` first runs one
module of each class whole and split on a random input: a module whose
output is not the sum of its split parts (a norm over all heads, a width
kept somewhere the pass does not know) is refused, not silently wrong.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .experts import with_mixin
from .unread import Skippable
from .slicing import Plan, Take, apportion, clone_structure, is_quantized, keep_rows, linear_dims, take

ATTENTION_CHOICES = ("replicated", "split")

SEPARATE = (("q_proj", "k_proj", "v_proj"), ("wq", "wk", "wv"))
FUSED = ("Wqkv", "qkv_proj", "query_key_value")
OUTPUT = ("o_proj", "out_proj", "wo", "dense")
HEAD_COUNTS = ("n_heads", "num_heads", "num_attention_heads")
KV_HEAD_COUNTS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads", "kv_n_heads")

#: Tokens of the probe input of :func:`check_head_split`.
PROBE_TOKENS = 7
#: Largest difference between the whole attention and the sum of its parts,
#: relative to the output's largest value (float32 rounding stays far below).
TOLERANCE = 1e-3


@dataclass(frozen=True)
class HeadShard:
    """This rank's heads of one attention module.

    Attributes:
        comm: The communicator whose ``all_sum`` ends the attention.
        heads: This rank's query heads, ``[start, stop)``.
        kv_heads: The key/value heads they read, ``[start, stop)``.
        head_dim: Width of one head.
        total_kv_heads: The module's key/value heads on all ranks (0: not given).
    """

    comm: object
    heads: Tuple[int, int]
    kv_heads: Tuple[int, int]
    head_dim: int
    total_kv_heads: int = 0


class HeadParallelAttention(Skippable):
    """Mixin for an mlx-lm attention module split by heads: its output, summed over ranks.

    In a prompt chunk whose logits nobody reads, the last one writes its KV
    cache and skips its all-reduce (:mod:`moe_mpi.unread`).
    """

    skip_kind = "attention"

    def __call__(self, x, *args, **kwargs):
        partial = super().__call__(x, *args, **kwargs)  # [B, L, D], this rank's heads' share
        if self.output_unread is not None:
            return self.unread(partial)
        return self.head_shard.comm.all_sum(partial)  # the attention's collective


class NoReduce:
    """The communicator of a probe's parts: each returns its partial sum."""

    def all_sum(self, x):
        return x


@dataclass(frozen=True)
class AttentionShape:
    """Where one attention module keeps what a split by heads changes."""

    heads: int
    kv_heads: int
    head_dim: int
    qkv: Tuple[str, ...]  # three projections, or one fused
    output: str

    def query_rows(self, heads: Tuple[int, int]) -> np.ndarray:
        return np.arange(heads[0] * self.head_dim, heads[1] * self.head_dim)

    def kv_rows(self, kv_heads: Tuple[int, int]) -> np.ndarray:
        return np.arange(kv_heads[0] * self.head_dim, kv_heads[1] * self.head_dim)

    def rows(self, name: str, shard: HeadShard) -> np.ndarray:
        """The output rows of projection ``name`` this rank keeps."""
        q, kv = self.query_rows(shard.heads), self.kv_rows(shard.kv_heads)
        if len(self.qkv) == 1:  # fused: [queries | keys | values]
            width_q, width_kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return np.concatenate([q, width_q + kv, width_q + width_kv + kv])
        return q if name == self.qkv[0] else kv


def attention_shape(module: nn.Module) -> Optional[AttentionShape]:
    """The :class:`AttentionShape` of ``module`` if it looks like a multi-head attention, else None."""
    children = module.children()
    output = next((n for n in OUTPUT if linear_dims(children.get(n)) is not None), None)
    if output is None:
        return None
    qkv = next((names for names in SEPARATE if all(linear_dims(children.get(n)) for n in names)), None)
    if qkv is None:
        qkv = next(((n,) for n in FUSED if linear_dims(children.get(n)) is not None), None)
    heads = next((getattr(module, n) for n in HEAD_COUNTS if _count(getattr(module, n, None))), None)
    if qkv is None or heads is None:
        return None
    kv_heads = next((getattr(module, n) for n in KV_HEAD_COUNTS if _count(getattr(module, n, None))), heads)
    rows = sum(linear_dims(children[n])[1] for n in qkv)  # H*hd + 2*KV*hd
    head_dim, rest = divmod(rows, heads + 2 * kv_heads)
    if rest or heads % kv_heads or linear_dims(children[output])[0] != heads * head_dim:
        return None
    return AttentionShape(heads, kv_heads, head_dim, qkv, output)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def find_attention(model: nn.Module) -> List[Tuple[str, nn.Module, AttentionShape]]:
    """Every multi-head attention module of ``model``, in module order: ``(path, module, shape)``."""
    found = []
    for path, module in model.named_modules():
        shape = attention_shape(module)
        if shape is not None and not any(path.startswith(p + ".") for p, _, _ in found):
            found.append((path, module, shape))
    return found


def head_ranges(
    heads: int, kv_heads: int, rank: int, size: int, weights: Optional[Sequence[float]] = None,
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """This rank's query heads and the key/value heads they read, each ``[start, stop)``.

    With at least as many key/value heads as ranks, each rank takes whole
    groups (a key/value head and its queries), in proportion to ``weights``.
    With fewer, each key/value head is held by several ranks (as vLLM does)
    and its query heads are shared among them, evenly; ``weights`` are not
    used then.

    Raises:
        ValueError: Fewer query heads per key/value head than the ranks that share it.
    """
    group = heads // kv_heads  # query heads per key/value head
    if kv_heads >= size:
        counts = apportion(kv_heads, weights if weights is not None else [1.0] * size)
        start = sum(counts[:rank])
        return (start * group, (start + counts[rank]) * group), (start, start + counts[rank])
    sharing = apportion(size, [1.0] * kv_heads)  # ranks per key/value head
    kv = next(j for j in range(kv_heads) if rank < sum(sharing[: j + 1]))
    if group < sharing[kv]:
        raise ValueError(
            f"attention split: num_attention_heads={heads}, num_key_value_heads={kv_heads}: {sharing[kv]} ranks "
            f"would share one key/value head and its {group} query heads; use --attention replicated"
        )
    counts = apportion(group, [1.0] * sharing[kv])
    start = kv * group + sum(counts[: rank - sum(sharing[:kv])])
    return (start, start + counts[rank - sum(sharing[:kv])]), (kv, kv + 1)


def split_heads(path: str, module: nn.Module, shape: AttentionShape, shard: HeadShard, rank: int) -> Plan:
    """Keeps this rank's heads of an attention module (lazily); returns the plan of its parameters.

    Raises:
        ValueError: A parameter the pass does not know how to cut by heads,
            or an output projection whose quantization groups straddle heads.
    """
    prefix = f"{path}." if path else ""
    plan: Plan = {}
    for name in shape.qkv:  # output rows, and their scales, biases and bias
        plan.update(keep_rows(prefix + name, module[name], shape.rows(name, shard)))
    out = module[shape.output]
    lo, hi = (h * shape.head_dim for h in shard.heads)
    for leaf, a in tree_flatten(out.parameters()):
        if leaf == "bias":
            continue
        axis, index = a.ndim - 1, np.arange(lo, hi)
        if is_quantized(out):
            unit = out.group_size if leaf != "weight" else 32 // out.bits
            if lo % out.group_size or hi % out.group_size:
                raise ValueError(
                    f"attention split: {prefix}{shape.output} has quantization groups of {out.group_size} "
                    f"columns; heads {shard.heads} are columns {lo}..{hi}, not whole groups"
                )
            index = np.arange(lo // unit, hi // unit)
        plan[f"{prefix}{shape.output}.{leaf}"] = Take(f"{prefix}{shape.output}.{leaf}", axis, index)
        out[leaf] = take(a, axis, index)
    if "bias" in out and rank != 0:
        out.pop("bias")  # added once, by rank 0
    plan.update(_cut_others(prefix, module, shape, shard))
    _set_counts(module, shape, shard)
    object.__setattr__(module, "head_shard", shard)
    module.__class__ = with_mixin(HeadParallelAttention, type(module))
    return plan


def _cut_others(prefix: str, module: nn.Module, shape: AttentionShape, shard: HeadShard) -> Plan:
    """The module's other parameters: linears with an output per head or per query
    channel (an output gate) keep those rows; per-head vectors (gpt_oss's sinks)
    this rank's heads; per-head-width ones (a q_norm over one head) stay whole."""
    projections = set(shape.qkv) | {shape.output}
    plan: Plan = {}
    sizes = {
        shape.heads: np.arange(*shard.heads),
        shape.kv_heads: np.arange(*shard.kv_heads),
        shape.heads * shape.head_dim: shape.query_rows(shard.heads),
        shape.kv_heads * shape.head_dim: shape.kv_rows(shard.kv_heads),
    }
    for name, child in module.children().items():
        dims = linear_dims(child) if name not in projections else None
        if dims is not None and dims[1] in sizes:  # a gate per head or per query channel: its rows
            plan.update(keep_rows(prefix + name, child, sizes[dims[1]]))
            projections.add(name)
    for leaf, a in tree_flatten(module.parameters()):
        if leaf.split(".", 1)[0] in projections or (a.ndim == 1 and a.shape[0] == shape.head_dim):
            continue
        if a.ndim != 1 or a.shape[0] not in sizes:
            raise ValueError(
                f"attention split: {prefix}{leaf} of shape {list(a.shape)} is not per head "
                f"({shape.heads} heads of {shape.head_dim}); use --attention replicated"
            )
        index = sizes[a.shape[0]]
        plan[prefix + leaf] = Take(prefix + leaf, 0, index)
        module.update(tree_unflatten([(leaf, take(a, 0, index))]))
    return plan


def _set_counts(module: nn.Module, shape: AttentionShape, shard: HeadShard) -> None:
    """The module's head counts, and widths of all heads (dbrx's ``d_model``), become this rank's."""
    heads, kv_heads = shard.heads[1] - shard.heads[0], shard.kv_heads[1] - shard.kv_heads[0]
    widths = {shape.heads * shape.head_dim: heads * shape.head_dim, shape.kv_heads * shape.head_dim: kv_heads * shape.head_dim}
    for name, value in list(vars(module).items()):
        if not _count(value):
            continue
        if name in HEAD_COUNTS:
            setattr(module, name, heads)
        elif name in KV_HEAD_COUNTS:
            setattr(module, name, kv_heads)
        elif value in widths and "head" not in name:
            setattr(module, name, widths[value])


def check_head_split(model_type: str, module: nn.Module, shape: AttentionShape, size: int) -> None:
    """Runs ``module`` whole and split in ``size`` parts on a random input; refuses it if they differ.

    Raises:
        ValueError: The parts do not add up to the whole, or the module cannot be cut.
    """
    dims = linear_dims(module[shape.output])[1]
    x = mx.array(np.random.default_rng(0).standard_normal((1, PROBE_TOKENS, dims)).astype(np.float32))
    mask = None  # some modules (linear attention) take no "causal"; any mask tests the sum
    try:
        whole = np.array(module(x, mask=mask), dtype=np.float32)
        parts = []
        for rank in range(size):
            part = clone_structure(module)
            heads, kv_heads = head_ranges(shape.heads, shape.kv_heads, rank, size)
            split_heads("", part, shape, HeadShard(NoReduce(), heads, kv_heads, shape.head_dim), rank)
            parts.append(np.array(part(x, mask=mask), dtype=np.float32))
    except Exception as e:  # noqa: BLE001 - any failure of the module's own code means "cannot split"
        if str(e).startswith("attention split:"):
            raise
        raise ValueError(f"attention split: {model_type}'s {type(module).__name__} failed on its heads alone: {e}") from e
    error = float(np.abs(sum(parts) - whole).max() / max(float(np.abs(whole).max()), 1e-30))
    if not error < TOLERANCE:
        raise ValueError(
            f"attention split: {model_type}'s {type(module).__name__} is not a sum over its heads "
            f"(split in {size}, the parts differ from the whole by {error:.2g} of its largest value); "
            "use --attention replicated"
        )


def kv_share(model: nn.Module) -> float:
    """This rank's share of the model's KV cache: its key/value heads over all (1.0 if not split)."""
    shards = [m.head_shard for _, m in model.named_modules() if "head_shard" in vars(m)]
    total = sum(s.total_kv_heads for s in shards)
    if not shards or not total:
        return 1.0
    return sum(s.kv_heads[1] - s.kv_heads[0] for s in shards) / total


def split_attention(
    model: nn.Module, comm, model_type: str, weights: Optional[Sequence[float]] = None,
) -> Tuple[Plan, int, Tuple[str, ...]]:
    """Splits the attention modules of ``model`` by heads across ``comm``'s ranks.

    A kind of module (class and head counts) that fails :func:`check_head_split`
    stays whole on every rank, as without the split (a hybrid model's linear
    attention, say): still exact, just not split.

    Returns:
        ``(plan, count, kept)``: the sources of the sliced parameters, how
        many attention modules now end in an all-reduce, and why each kind
        kept whole was kept (one line each).

    Raises:
        ValueError: No attention module is recognised, or none can be split
            (the first kind's reason).
    """
    found = find_attention(model)
    if not found:
        raise ValueError(
            f"attention split: model_type={model_type!r} has no attention moe_mpi can split by heads (it knows "
            "q/k/v_proj or a fused Wqkv/qkv_proj, with an o_proj/out_proj/wo/dense and head counts); use "
            "--attention replicated"
        )
    verdicts: Dict[tuple, Optional[str]] = {}  # kind -> why it stays whole, or None
    plan: Plan = {}
    count = 0
    for path, module, shape in found:
        kind = (type(module), shape)  # layers of one class may differ in heads
        if kind not in verdicts:
            try:
                check_head_split(model_type, module, shape, comm.size)
                verdicts[kind] = None
            except ValueError as e:
                verdicts[kind] = str(e)
        if verdicts[kind] is not None:
            continue
        heads, kv_heads = head_ranges(shape.heads, shape.kv_heads, comm.rank, comm.size, weights)
        shard = HeadShard(comm, heads, kv_heads, shape.head_dim, shape.kv_heads)
        plan.update(split_heads(path, module, shape, shard, comm.rank))
        count += 1
    kept = tuple(why for why in verdicts.values() if why is not None)
    if not count:
        raise ValueError(kept[0])
    return plan, count, kept
