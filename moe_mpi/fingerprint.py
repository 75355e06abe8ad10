"""Ranks agree on what they run, before they run it.

Every rank is started with its own command line (``mpirun``'s ``:`` syntax
gives ranks different ones) and reads its own copy of the model (one per
Mac). If two ranks differ in anything that changes the computation (the
checkpoint, the tokenizer, the placement, the seed, the version of MLX),
their partial sums no longer add up to the model's output, and the output
is wrong without an error. So before computing, the ranks compare a
fingerprint: per field, a short value (the option itself, or 16 hex digits
of a SHA-256 for files and weights). Each comparison is one ``allgather`` of
that small dict; a mismatch is refused on every rank with one message that
names the field and which ranks have which value.

Two comparisons:

* :func:`run_fields` at start-up, before any other collective: the options
  that decide what every rank does (a rank with another ``--max-tokens``
  would stop early and strand the others; one with another ``--prompts-file``
  presence would run other collectives), and the versions of moe_mpi, mlx,
  mlx-lm, numpy, mpi4py, Python and the MPI library;
* :func:`model_fields` after loading: config.json, the tokenizer files, the
  checkpoint's tensor names, shapes and dtypes, a hash of the replicated
  (dense) weights as loaded, and every MoE layer's placement (its layout,
  with the row price that shares a replicated expert's rows: what a
  ``--profile`` file said).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .digest import array_digest
from .errors import CollectiveError
from .safetensors_io import read_header
from .shard import expert_parameters, find_moe_blocks, shared_children
from .vocab import VocabParallelHead

__all__ = ["PER_HOST", "compare", "dense_digest", "model_fields", "run_fields", "versions"]

#: Options that may differ between ranks, and what is compared instead:
#: ``None`` nothing (rank 0 alone reads it, or it changes no computation),
#: ``bool`` whether it is given. Paths may differ from host to host; what
#: they lead to is compared after loading (the model, the placement).
PER_HOST = {
    "model": None,
    "prompt": None,
    "prompts_file": bool,
    "output": bool,
    "record_routing": bool,
    "placement": None,
    "stats": None,
    "layouts": None,
    "weights": None,
    "replicas": None,
    # Whether a calibrate profile prices rows; what it says is in the layouts, compared after loading.
    "profile": bool,
    "progress": None,
    "debug": None,
}

#: Files of a model directory that make up its tokenizer and chat template.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def versions() -> Dict[str, str]:
    """The versions every rank must share."""
    import mlx_lm
    import mpi4py
    import numpy as np
    from mpi4py import MPI

    from . import __version__

    mpi = MPI.Get_library_version().strip().splitlines()[0].strip()
    return {
        "moe_mpi version": __version__,
        "mlx version": mx.__version__,
        "mlx-lm version": mlx_lm.__version__,
        "numpy version": np.__version__,
        "mpi4py version": mpi4py.__version__,
        "MPI library": mpi,
        "Python version": ".".join(platform.python_version_tuple()[:2]),
    }


def run_fields(args: argparse.Namespace, per_host: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """The options of a command line that every rank must share, and the versions.

    Args:
        args: The parsed command line.
        per_host: A command's own rules, over :data:`PER_HOST` (e.g. the
            options of ``moe-mpi serve`` that only rank 0's HTTP side reads).
    """
    rules = {**PER_HOST, **(per_host or {})}
    fields = versions()
    for name, value in sorted(vars(args).items()):
        rule = rules.get(name, str)
        if rule is None:
            continue
        option = "--" + name.replace("_", "-")
        fields[option] = str(value is not None) if rule is bool else str(value)
    return fields


def _files_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def replicated_parameters(model: nn.Module) -> List[str]:
    """Paths of the parameters every rank holds whole: not experts, not shared-expert slices,
    not the heads of an attention split across ranks, not the rows of a split LM head."""
    local = expert_parameters(model)
    for moe in find_moe_blocks(model):
        for name in shared_children(moe.block):
            prefix = f"{moe.path}.{name}." if moe.path else f"{name}."
            local.update(prefix + p for p, _ in tree_flatten(moe.block[name].parameters()))
    for path, module in model.named_modules():
        if "head_shard" in vars(module) or isinstance(module, VocabParallelHead):  # this rank's heads, its logits' rows
            local.update(f"{path}.{p}" if path else p for p, _ in tree_flatten(module.parameters()))
    return sorted(p for p, _ in tree_flatten(model.parameters()) if p not in local)


def dense_digest(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the replicated weights' names, dtypes, shapes and bytes."""
    params = dict(tree_flatten(model.parameters()))
    return array_digest((path, params[path]) for path in replicated_parameters(model))


def model_fields(model_path: Path, config: Dict[str, Any], model: nn.Module) -> Dict[str, str]:
    """What every rank must have loaded the same (see the module's documentation)."""
    model_path = Path(model_path)
    tensors = []
    for f in sorted(model_path.glob("model*.safetensors")):
        for key, info in read_header(f).items():
            tensors.append([key, info.dtype, list(info.shape)])
    info = model.ep_info
    placement = {
        "mode": info.mode,
        "attention": info.attention,
        "ranks": info.size,
        "layers": [layout.to_dict() for layout in info.layouts],
    }
    return {
        "model config": _sha(json.dumps(config, sort_keys=True, default=str).encode()),
        "tokenizer": _files_digest(model_path / n for n in TOKENIZER_FILES if (model_path / n).is_file()),
        "checkpoint tensors (names, dtypes, shapes)": _sha(json.dumps(sorted(tensors)).encode()),
        "dense weights": dense_digest(model),
        "expert placement": _sha(json.dumps(placement, sort_keys=True).encode()),
    }


def _describe(field: str, values: List[Any]) -> str:
    groups: Dict[str, List[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault("(none)" if value is None else str(value), []).append(rank)
    parts = [
        f"{value} on {'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}"
        for value, ranks in sorted(groups.items(), key=lambda kv: kv[1][0])
    ]
    return f"{field}: " + "; ".join(parts)


def compare(comm, fields: Dict[str, str], what: str) -> None:
    """Collective: every rank's ``fields`` must be equal.

    Raises:
        CollectiveError: On every rank, naming each field that differs and
            the ranks holding each value.
    """
    every = comm.allgather(fields) if comm.size > 1 else [fields]
    names = sorted({k for f in every for k in f}, key=lambda k: (k.startswith("--") is False, k))
    differ = [n for n in names if len({f.get(n) for f in every}) > 1]
    if differ:
        details = "; ".join(_describe(n, [f.get(n) for f in every]) for n in differ[:3])
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise CollectiveError(f"the ranks disagree on {what}: {details}{more}; refusing to run")
