"""Synthetic models for ``moe-mpi bench``: random-weight checkpoints shaped like real MoE models.

Each shape (:data:`SYNTHETIC`) is a ``qwen3_moe`` checkpoint, scaled down to
run on a laptop; ``qwen3_moe`` because mlx-lm has a tensor-parallel
``Model.shard()`` for it, so every mode can run on the same weights. Each is
written once to a cache directory (rank 0 writes, the others wait) by
:func:`moe_mpi.synthetic.write_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from ..barrier import quiet_barrier
from ..errors import UserError
from ..runner import collective_phase

__all__ = ["SYNTHETIC", "describe_model", "ensure_synthetic", "synthetic_config", "synthetic_dir"]

#: Architecture of every synthetic model (mlx-lm has ``shard()`` for it).
SYNTHETIC_ARCH = "qwen3_moe"


SYNTHETIC_SEED = 0


# Bump when the way a checkpoint is written changes, so old caches are not used.
_CACHE_VERSION = 1


#: Synthetic shape name -> overrides of ``tiny_config("qwen3_moe")``.
#: Vocabularies are kept at 8192: a real 100k-150k vocabulary would make the
#: (replicated) LM head, not the experts, dominate decode on these small
#: shapes. KV heads are chosen so mlx-lm's tensor parallelism can split them.
SYNTHETIC: Dict[str, Dict[str, Any]] = {
    # Seconds-long end-to-end runs for tests.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        intermediate_size=64,
        vocab_size=512,
    ),
    # The project's performance baseline: DBRX's expert layout (16 experts,
    # top-4, FFN/hidden = 3.5) at hidden 768; 3.2 GB of float32 weights.
    "dbrx-like": dict(
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=6,  # splits over 2, 3 or 6 ranks
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=2688,
        intermediate_size=2688,
        vocab_size=8192,
    ),
    # Qwen3-30B-A3B's routing (128 small experts, top-8); 1.6 GB.
    "qwen3-moe-like": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=256,
        intermediate_size=256,
        vocab_size=8192,
    ),
    # Mixtral's routing (8 big experts, top-2, FFN/hidden = 3.5); 1.4 GB.
    "mixtral-like": dict(
        hidden_size=1024,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=3584,
        intermediate_size=3584,
        vocab_size=8192,
    ),
}


# A skewed twin of dbrx-like: the same weights' shapes, routers that prefer
# some experts (moe_mpi.router_skew.skew_routers: Zipf's 1/rank**1.2, capped
# at 1/k, a different order per layer).
SYNTHETIC["dbrx-like-skewed"] = SYNTHETIC["dbrx-like"]

#: Shape name -> Zipf exponent of its routers' expert shares (0: even).
ROUTER_SKEW: Dict[str, float] = {"dbrx-like-skewed": 1.2}


def synthetic_config(name: str) -> Dict[str, Any]:
    """The full ``config.json`` dict of synthetic shape ``name``.

    Raises:
        UserError: Unknown name.
    """
    from ..synthetic import tiny_config

    if name not in SYNTHETIC:
        raise UserError(
            f"--synthetic {name!r}: unknown shape; choose from {', '.join(SYNTHETIC)}"
        )
    config = tiny_config(SYNTHETIC_ARCH, **SYNTHETIC[name])
    config["max_position_embeddings"] = 4096
    return config


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/moe_mpi/synthetic`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "moe_mpi" / "synthetic"


def synthetic_dir(name: str, cache_dir: Optional[str] = None) -> Path:
    """Where shape ``name`` is cached: ``<cache>/<name>-<hash of its config>``.

    The hash covers the config, seed and writer version, so changing a shape
    never reuses a stale checkpoint.
    """
    config = synthetic_config(name)
    record = {"config": config, "seed": SYNTHETIC_SEED, "version": _CACHE_VERSION}
    if ROUTER_SKEW.get(name):
        record["router_skew"] = [ROUTER_SKEW[name], "bias along an embedding direction"]
    key = json.dumps(record, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / f"{name}-{digest}"


def _write_synthetic(name: str, path: Path) -> None:
    """Writes shape ``name`` to ``path`` atomically (temp dir, then rename)."""
    from ..synthetic import write_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from other users
    try:
        write_checkpoint(tmp, synthetic_config(name), seed=SYNTHETIC_SEED, router_skew=ROUTER_SKEW.get(name, 0.0))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_synthetic(name: str, ctl, cache_dir: Optional[str], debug: bool) -> Path:
    """The cached checkpoint of shape ``name``; rank 0 writes it if missing.

    Collective. Every rank must see rank 0's cache directory (one host, or
    a shared file system); on several hosts without one, pass ``--model``
    with a checkpoint present on every host instead.
    """
    path = synthetic_dir(name, cache_dir)
    with collective_phase(ctl, debug=debug, name_ranks=False):
        try:
            if ctl.rank == 0 and not (path / "config.json").exists():
                _write_synthetic(name, path)
        finally:
            # Every rank reaches this, even when rank 0's write failed, so
            # nobody is stranded; the others sleep through a long write.
            quiet_barrier(ctl, idle=ctl.rank != 0)
    with collective_phase(ctl, debug=debug):
        if not (path / "config.json").exists():
            raise UserError(
                f"synthetic model {path} is not visible on this rank: "
                "--cache-dir must be on a file system every host shares"
            )
    return path


def describe_model(config: Dict[str, Any], synthetic: Optional[str], path: Path) -> str:
    """One line: what model the benchmark ran."""
    # Generic names first, then the architectures' own (dbrx nests its MoE keys).
    flat = dict(config, **(config.get("ffn_config") or {}))

    def get(*keys):
        return next((flat[k] for k in keys if flat.get(k) is not None), "?")

    what = (
        f"{config.get('model_type')}, hidden {get('hidden_size', 'd_model')}, "
        f"{get('num_hidden_layers', 'n_layers')} layers, "
        f"{get('num_experts', 'num_local_experts', 'n_routed_experts', 'moe_num_experts')} "
        f"experts top-{get('num_experts_per_tok', 'moe_top_k')}, expert FFN "
        f"{get('moe_intermediate_size', 'ffn_hidden_size', 'intermediate_size')}, "
        f"vocab {get('vocab_size')}, {config.get('torch_dtype', '?')}"
    )
    if config.get("quantization"):
        what += f", {config['quantization'].get('bits')}-bit"
    name = f"synthetic {synthetic}" if synthetic else "model"
    return f"model: {name} ({what}) at {path}"
