"""Loading a checkpoint so that each rank reads only what it keeps.

The model is built with mlx-lm's own classes (lazily: nothing is allocated
until evaluated), sharded with :func:`moe_mpi.shard.shard_structure`, and then
filled from disk: replicated tensors in full, expert tensors only in this
rank's slices (:mod:`moe_mpi.safetensors_io`).

Both expert layouts are read in place:

* stacked ``...switch_mlp.gate_proj.weight`` ``[E, out, in]`` tensors
  (mlx-community): only the rows of local experts are read;
* per-expert ``...experts.{e}.gate_proj.weight`` tensors (Hugging Face): only
  local experts' tensors are read. Which per-expert key goes where in the
  stacked parameter is learnt from the model's own ``sanitize()``, run on
  one-number placeholders instead of the expert tensors, so no per-model
  name tables are needed.
"""

import glob
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, infer_quant_config, load_config, load_tokenizer

from . import cpu
from .errors import CheckpointError, ModelNotFoundError
from .placement import ExpertPlacement
from .routing import RoutingStats
from .runner import under_launcher
from .warmup import use_warm_experts
from .safetensors_io import CheckpointIndex, ShapeOnlyIndex, dtype_name
from .shard import check_stats_model, drop_dense, find_moe_blocks, shard_structure
from .slicing import Plan, Take, TakeSplit, per_expert_source, take

PER_EXPERT_KEY = re.compile(r"\.experts\.\d+\.")


#: Files of a Hugging Face repo that loading needs (as mlx-lm fetches them).
HF_ALLOW_PATTERNS = ["*.json", "model*.safetensors", "*.py", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def demo_model_path() -> Path:
    """Where the bundled demo model lives (it may not be installed)."""
    return Path(__file__).resolve().parent / "demo_model"


def resolve_model_path(
    path_or_hf_repo: Union[str, Path, None] = None, download: bool = True
) -> Path:
    """The local directory of a model argument; the one place that resolves one.

    Args:
        path_or_hf_repo: A local model directory, a Hugging Face repo id
            (``org/name``), or None for the bundled demo model.
        download: Fetch a repo that is not in the local Hugging Face cache.
            With False only local files are used (``moe-mpi info`` plans
            without the weights it exists to avoid reading).

    Returns:
        The model directory.

    Raises:
        ModelNotFoundError: The path is not a directory, the demo model is
            not installed, or the repo is neither cached nor (with
            ``download``) fetchable.
    """
    if path_or_hf_repo is None:
        path = demo_model_path()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"no model given and the bundled demo model is not installed "
                f"(expected at {path}); pass --model PATH_OR_HF_REPO"
            )
        return path
    path = Path(path_or_hf_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hf_repo)
    if path.exists():
        raise ModelNotFoundError(f"model path {name!r} is not a directory")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(name, allow_patterns=HF_ALLOW_PATTERNS, local_files_only=not download)
        )
    except Exception as e:  # the hub raises many types: offline, 404, auth, not cached
        if not download:
            raise ModelNotFoundError(
                f"{name!r} is not a local directory nor in the Hugging Face cache; "
                "only local files are read here (download the model first)"
            ) from None
        raise ModelNotFoundError(
            f"{name!r} is not a local directory and could not be fetched from "
            f"Hugging Face ({type(e).__name__}). Download it on a machine with "
            "network access and pass the local path."
        ) from None


def _check_groups(router: nn.Module, experts: int) -> None:
    """DeepSeek-style group routing: ``n_group`` groups of the experts, the best ``topk_group`` of them searched."""
    n_group, topk_group, k = (getattr(router, n, None) for n in ("n_group", "topk_group", "top_k"))
    if not isinstance(n_group, int) or not isinstance(topk_group, int) or n_group <= 1:
        return
    if experts % n_group:
        raise CheckpointError(f"config.json: n_group={n_group} does not divide num_experts={experts} into equal groups")
    if not 1 <= topk_group <= n_group:
        raise CheckpointError(f"config.json: topk_group={topk_group} must be 1..n_group={n_group}")
    if isinstance(k, int) and k > topk_group * (experts // n_group):
        raise CheckpointError(
            f"config.json: num_experts_per_tok={k} is more than the {topk_group * (experts // n_group)} experts of "
            f"topk_group={topk_group} groups of {experts // n_group}"
        )


#: Files one of which a tokenizer needs (transformers' fast and slow tokenizers, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "*.tiktoken")


def check_tokenizer_files(model_path: Path) -> None:
    """Raises a :class:`CheckpointError` if the model directory has no tokenizer.

    Without one, transformers builds an empty tokenizer from config.json's
    model type, and every prompt then encodes to nothing.
    """
    if not any(glob.glob(str(model_path / pattern)) for pattern in TOKENIZER_FILES):
        raise CheckpointError(f"{model_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def model_classes(config: dict):
    """mlx-lm's ``(Model, ModelArgs)`` classes for ``config["model_type"]``.

    The one use of mlx-lm's private ``_get_classes`` (which also applies its
    model-type remapping); pyproject pins the mlx-lm versions it is tested with.

    Raises:
        ValueError: mlx-lm has no such model type.
    """
    try:
        return _get_classes(config)
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None


def _build_model(config: dict) -> nn.Module:
    model_class, args_class = model_classes(config)
    try:
        args = args_class.from_dict(config)
        return model_class(args)
    except (TypeError, KeyError, AssertionError) as e:  # mlx-lm's models assert what they support
        raise ValueError(
            f"config.json for model_type={config.get('model_type')!r} is missing "
            f"or has invalid keys: {e}"
        ) from None


def _quantize(model: nn.Module, config: dict, tensors: Dict[str, Any]) -> None:
    """Quantizes the structure as mlx-lm's loader does for ``config["quantization"]``."""
    quantization = config.get("quantization")
    if quantization is None:
        if "quantization_config" in config:
            method = config["quantization_config"].get("quant_method")
            raise ValueError(f"quantization_config quant_method={method!r} is not supported")
        return

    def class_predicate(p, m):
        if p in quantization:
            return quantization[p]
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in tensors:
            return False
        return infer_quant_config(p, m, tensors)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=class_predicate,
    )


def _read(index: CheckpointIndex, raw: dict, tensors: dict, codes: dict, src) -> mx.array:
    """Reads one sharded parameter from disk, following its plan entry."""
    if isinstance(src, (Take, TakeSplit)):
        key = src.key
        rows = src.experts if isinstance(src, TakeSplit) else None
        if key in raw and tensors.get(key) is raw[key]:  # untouched by sanitize
            if rows is None:
                return index.read_take(key, src.axis, src.index)
            return take(index.read_take(key, 0, rows), src.axis, src.index)  # the rows, then their slice
        if key in codes:  # stacked by sanitize from per-expert tensors
            src = per_expert_source(codes[key], src)
        elif key in tensors:  # transformed by sanitize: correct, but reads it whole
            whole = tensors[key] if rows is None else take(tensors[key], 0, rows)
            return take(whole, src.axis, src.index)
        else:
            raise CheckpointError(f"checkpoint has no tensor {key!r}")
    if all(k in index for k in src.keys):
        if src.index is None:
            return index.read_stack(src.keys)
        return mx.stack([index.read_take(k, src.axis, src.index) for k in src.keys])
    if all(k in tensors and k not in raw for k in src.keys):
        # Made by sanitize from a fused tensor (dbrx's Hugging Face layout):
        # correct, but evaluating them reads the fused tensor.
        parts = [tensors[k] for k in src.keys]
        if src.index is not None:
            parts = [take(p, src.axis, src.index) for p in parts]
        return mx.stack(parts)
    missing = [k for k in src.keys if k not in index and k not in tensors]
    raise CheckpointError(f"checkpoint has no tensor {missing[0]!r}")


@dataclass
class LoadPlan:
    """One rank's sharded model before any weight is read, and where each
    of its parameters comes from (see :func:`plan_load`)."""

    model: nn.Module
    config: dict
    index: CheckpointIndex
    raw: Dict[str, mx.array]  # checkpoint tensors as lazy arrays: nothing read
    tensors: Dict[str, mx.array]  # after sanitize(), placeholders for per-expert ones
    codes: Dict[str, List[str]]  # stacked key -> per-expert checkpoint keys
    plan: Plan
    worker: bool  # a central-mode worker: only expert parameters


def read_config(model_path: Path) -> dict:
    """config.json of a model directory, with errors that say what is wrong.

    Raises:
        CheckpointError: No config.json, not JSON, not a JSON object, or no
            ``model_type`` (which names the architecture).
    """
    file = model_path / "config.json"
    try:
        config = load_config(model_path)
    except FileNotFoundError:
        raise CheckpointError(f"{model_path} has no config.json: not an mlx-lm model directory") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (TypeError, AttributeError):  # mlx-lm merging generation_config.json into a non-object
        raise CheckpointError(f"{file} and generation_config.json must each hold a JSON object") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object, not a {type(config).__name__}")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise CheckpointError(
            f"{file} has no \"model_type\" (the architecture, e.g. \"qwen3_moe\"): "
            "not an mlx-lm / Hugging Face model config"
        )
    return config


#: Experts-per-token attributes of MoE blocks and their routers, as mlx-lm's models name them.
TOP_K_NAMES = ("top_k", "num_experts_per_tok", "n_activated_experts", "moe_top_k")


def check_top_k(model: nn.Module, config: dict) -> None:
    """Every MoE block routes each token to between 1 and all of its experts.

    A top-k above the number of experts (or group routing whose groups do
    not fit the experts) passes every load-time check and then fails inside
    the router on the first token, on every rank at once.

    Raises:
        CheckpointError: A block's top-k is outside ``1..num_experts``, or
            its ``n_group`` / ``topk_group`` do not fit, naming the numbers.
    """
    for moe in find_moe_blocks(model):
        routers = [getattr(moe.block, n, None) for n in ("gate", "router")]
        for owner in [moe.block] + [r for r in routers if isinstance(r, nn.Module)]:
            _check_groups(owner, moe.num_experts)
            for name in TOP_K_NAMES:
                k = getattr(owner, name, None)
                if isinstance(k, int) and not isinstance(k, bool) and not 1 <= k <= moe.num_experts:
                    key = next((n for n in TOP_K_NAMES if config.get(n) == k), name)  # as config.json spells it
                    raise CheckpointError(
                        f"config.json: {key}={k} experts per token, but {moe.path} has num_experts="
                        f"{moe.num_experts}: it must be 1..{moe.num_experts}"
                    )


def plan_load(
    model_path: Path,
    comm,
    placement: Union[ExpertPlacement, str, None] = None,
    weights: Optional[Sequence[float]] = None,
    model_config: Optional[dict] = None,
    mode: str = "ep",
    **layout_options,
) -> LoadPlan:
    """Builds this rank's shard of a model and plans its reads; reads no data.

    ``comm`` needs only ``rank`` and ``size`` here (``moe-mpi info`` plans
    every rank of a run in one process). ``layout_options`` (``layouts``,
    ``stats``, ``replicas``, ``balance``, ``profile``, ``check_contract``) go to
    :func:`moe_mpi.shard.shard_structure`.
    """
    config = read_config(model_path)
    config.update(model_config or {})
    files = glob.glob(str(model_path / "model*.safetensors"))
    if not files:
        raise CheckpointError(f"no model*.safetensors files in {model_path}")
    index = CheckpointIndex(files)
    model = _build_model(config)

    raw = {}
    for f in index.files:
        raw.update(mx.load(str(f)))  # lazy: nothing is read until evaluated
    # Per-expert tensors become one-number placeholders holding their position
    # in `names`; sanitize() stacks them like the real ones.
    names = sorted(k for k in raw if PER_EXPERT_KEY.search(k))
    tensors = {k: v for k, v in raw.items() if k not in set(names)}
    tensors.update({k: mx.array([float(i)]) for i, k in enumerate(names)})
    if hasattr(model, "sanitize"):
        tensors = model.sanitize(tensors)
    codes = {}
    for k, v in tensors.items():
        if k not in raw and v.ndim == 2 and v.shape[1] == 1 and v.dtype == mx.float32 and names:
            codes[k] = [names[int(c)] for c in np.asarray(v).reshape(-1)]

    # The quantization predicate reads shapes: give it the real (lazy, unread)
    # arrays where sanitize passed a per-expert tensor through unchanged, and
    # lazy stand-ins of the stacked shape where it stacked placeholders.
    stacked = {k: mx.broadcast_to(raw[c[0]][None], (len(c), *raw[c[0]].shape)) for k, c in codes.items()}
    _quantize(model, config, {**tensors, **{k: raw[k] for k in names if k in tensors}, **stacked})
    model.eval()
    check_top_k(model, config)
    _check_unused(model_path, model, tensors)
    plan: Plan = shard_structure(model, comm, placement, weights, mode, **layout_options)
    if layout_options.get("layouts") is None:  # layouts override the statistics
        check_stats_model(layout_options.get("stats"), model, tensors, comm.rank)
    worker = mode == "central" and comm.rank != 0
    if worker:
        drop_dense(model)  # central-mode workers hold only their experts
    return LoadPlan(model, config, index, raw, tensors, codes, plan, worker)


def _check_unused(model_path: Path, model: nn.Module, tensors: Dict[str, Any]) -> None:
    """Refuses checkpoint tensors the model built from config.json has no place for.

    mlx-lm's own loader refuses them too (``strict``): they mean config.json
    and the weights do not match (e.g. fewer layers in the config than in the
    checkpoint), and loading the rest would run a different model silently.
    Per-expert tensors are accounted for by their stacked parameter.
    """
    params = {k for k, _ in tree_flatten(model.parameters())}
    unused = sorted(k for k in tensors if k not in params and not PER_EXPERT_KEY.search(k))
    if unused:
        raise CheckpointError(
            f"{model_path}: {len(unused)} checkpoint tensor(s) have no parameter in the model config.json "
            f"describes (first: {unused[0]!r}): config.json does not match the weights"
        )


def _check_kind(path: str, want: mx.array, got: mx.array, where: Path) -> None:
    """A floating-point parameter gets a floating-point tensor, an integer one (packed 4-bit weights) an integer tensor."""
    if mx.issubdtype(want.dtype, mx.floating) != mx.issubdtype(got.dtype, mx.floating):
        raise CheckpointError(
            f"{where}: tensor {path!r} is {dtype_name(got.dtype)}, the model needs {dtype_name(want.dtype)} there "
            "(a quantized checkpoint without its \"quantization\" entry in config.json, or a corrupt file)"
        )


def read_parameters(
    lp: LoadPlan, index=None, evaluate: bool = True, on_read: Optional[Callable[[int], None]] = None
) -> List[Tuple[str, mx.array]]:
    """The (path, array) pairs that fill the planned model.

    Args:
        lp: The plan.
        index: Where sharded parameters are read from: the checkpoint
            (default), or a :class:`ShapeOnlyIndex` for shapes without data.
        evaluate: Evaluate each parameter as soon as it is read, so that a
            lazy stack or take does not keep its inputs (every expert's
            piece, or a whole tensor) alive until the end.
        on_read: Called with the bytes of each evaluated parameter (progress).
    """
    index = lp.index if index is None else index
    where = lp.index.files[0].parent
    params = []
    for path, want in tree_flatten(lp.model.parameters()):
        if lp.worker and path not in lp.plan:
            continue
        if path in lp.plan:
            arr = _read(index, lp.raw, lp.tensors, lp.codes, lp.plan[path])
        elif path in lp.tensors and path not in lp.codes:
            arr = lp.tensors[path]
        else:
            raise CheckpointError(f"{where}: checkpoint has no tensor {path!r}")
        _check_kind(path, want, arr, where)
        if evaluate:
            mx.eval(arr)
            if on_read is not None:
                on_read(arr.nbytes)
        params.append((path, arr))
    return params


def planned_bytes(lp: LoadPlan) -> int:
    """The bytes :func:`read_parameters` will read for this rank (no data is read)."""
    shapes = read_parameters(lp, ShapeOnlyIndex(lp.index), evaluate=False)
    return sum(a.nbytes for _, a in shapes)


#: Checkpoints whose share per rank is at least this big show a progress bar.
PROGRESS_MIN_BYTES = 1 << 30


def _progress(lp: LoadPlan, comm, show: Optional[bool]):
    """A tqdm bar of the bytes rank 0 reads, for large shares, or None.

    ``show`` None: when stderr is a terminal or an MPI launcher forwards it.
    """
    if show is None:
        show = sys.stderr.isatty() or under_launcher()
    if comm.rank != 0 or not show:
        return None
    total = planned_bytes(lp)
    if total < PROGRESS_MIN_BYTES:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, leave=False, mininterval=0.5,
        desc=f"loading (rank 0 of {comm.size})", file=sys.stderr,
    )


def load_model(
    model_path: Path,
    comm,
    placement: Union[ExpertPlacement, str, None] = None,
    weights: Optional[Sequence[float]] = None,
    model_config: Optional[dict] = None,
    mode: str = "ep",
    progress: Optional[bool] = None,
    **layout_options,
) -> Tuple[nn.Module, dict]:
    """Builds this rank's shard of a model and reads its weights from disk.

    Returns:
        ``(model, config)``.
    """
    lp = plan_load(model_path, comm, placement, weights, model_config, mode, **layout_options)
    bar = _progress(lp, comm, progress)
    try:
        params = read_parameters(lp, on_read=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    lp.model.load_weights(params, strict=not lp.worker)
    mx.eval(lp.model.parameters())
    cpu.accelerate(lp.model)  # MLX's Linux CPU backend only; nothing on Metal
    return lp.model, lp.config


def load(
    path_or_hf_repo: Union[str, Path],
    comm=None,
    placement: Union[ExpertPlacement, str, None] = None,
    weights: Optional[Sequence[float]] = None,
    tokenizer_config: Optional[dict] = None,
    model_config: Optional[dict] = None,
    return_config: bool = False,
    mode: str = "ep",
    progress: Optional[bool] = None,
    layouts=None,
    stats=None,
    replicas: float = 0.0,
    warm_experts: bool = False,
    balance: str = "both",
    profile=None,
    attention: str = "replicated",
    lm_head: str = "replicated",
):
    """Loads this rank's shard of an MoE model and the tokenizer.

    Every rank calls this with the same arguments. Each reads the replicated
    tensors and only its own experts' slices.

    Args:
        path_or_hf_repo: A local mlx-lm model directory or a Hugging Face repo.
        comm: A :class:`moe_mpi.Communicator`; ``Communicator()`` if None.
        placement: ``ExpertPlacement``, ``"contiguous"`` (default),
            ``"round-robin"`` or a placement JSON file.
        weights: Optional relative share of experts per rank, e.g. ``[2, 1, 1]``.
        tokenizer_config: Extra tokenizer arguments, as for ``mlx_lm.load``.
        model_config: Overrides for config.json, as for ``mlx_lm.load``.
        return_config: Also return the config dict.
        progress: Show a progress bar of rank 0's bytes read (shares over
            1 GiB only); None: when stderr is a terminal or mpirun forwards it.
        mode: ``"ep"`` (expert parallel, the default: each rank owns whole
            experts), ``"sliced"`` (each rank holds a slice of every expert),
            ``"auto"`` (per layer, the layout that evens out the expected
            load: hot experts split or replicated, see :mod:`moe_mpi.balance`)
            or ``"central"`` (rank 0 routes and the experts' owners serve
            it; the baseline, see :mod:`moe_mpi.central`).
        layouts: Each MoE layer's :class:`moe_mpi.layout.Layout`, or a
            layouts file (``moe-mpi balance --output``), for ``ep``, ``auto``
            or ``central``.
        stats: Router statistics (a :class:`moe_mpi.routing.RoutingStats`
            or its file, from ``moe-mpi profile``): ``ep`` places each
            layer's experts by them, ``auto`` balances by them.
        replicas: ``auto``: extra whole experts each rank may hold per layer.
        balance: ``auto``: ``"split"`` hot experts only, ``"replicate"``
            them only (within ``replicas``), or ``"both"`` (the default);
            docs/balance.md.
        profile: ``auto``: a ``moe-mpi calibrate`` profile (file or JSON
            object) whose measured expert kernel prices rows for the
            layout search and for sharing a replicated expert's rows
            (:mod:`moe_mpi.rowcost`); None: the default price.
        attention: ``"replicated"`` (default: every rank computes every
            head; one all-reduce per MoE layer) or ``"split"``: each rank
            holds its share of the heads and of the KV cache, and each
            attention ends in an all-reduce too (:mod:`moe_mpi.attention`).
        lm_head: ``"replicated"`` (default) or ``"split"``: each rank holds
            and computes its share of the LM head's vocabulary rows, and one
            all-gather per forward call joins the logits (:mod:`moe_mpi.vocab`).
        warm_experts: On Metal, idle ranks compute their least recently used
            experts as throw-away work so their memory stays wired, and the
            wired limit is set to the model's size (:mod:`moe_mpi.warmup`).
            Off on the CPU.

    Returns:
        ``(model, tokenizer)`` or ``(model, tokenizer, config)``.
    """
    if comm is None:
        from .comm import Communicator

        comm = Communicator()
    model_path = resolve_model_path(path_or_hf_repo)
    if stats is not None and not hasattr(stats, "frequencies"):
        stats = RoutingStats.load(stats)
    model, config = load_model(
        model_path, comm, placement, weights, model_config, mode, progress,
        layouts=layouts, stats=stats, replicas=replicas, balance=balance, profile=profile, attention=attention,
        lm_head=lm_head,
    )
    if warm_experts:
        use_warm_experts(model)
    check_tokenizer_files(model_path)
    tokenizer = load_tokenizer(
        model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id", None)
    )
    if return_config:
        return model, tokenizer, config
    return model, tokenizer
