"""Expert layouts on disk: mlx-lm model weights rewritten for its loaders.

Checkpoints store a layer's experts in several layouts, which each mlx-lm
model's ``sanitize()`` turns into the form its model class holds.
:func:`to_expert_format` rewrites an mlx-lm model's weights into one of them
(``expert_format``), so that a written checkpoint goes through that loading
path:

* ``"stacked"``: the mlx-community layout, one ``switch_mlp.{gate,up,down}_proj``
  tensor of shape ``[E, out, in]`` per layer. For dbrx, whose mlx-lm model
  keeps a list of per-expert MLPs, "stacked" means the Hugging Face fused
  layout ``ffn.experts.mlp.{w1,v1,w2}`` of shape ``[E * ffn, d_model]`` (w2
  stored transposed), which dbrx's ``sanitize()`` splits (unquantized only).
* ``"per_expert"``: the Hugging Face layout, one tensor per expert, e.g.
  ``mlp.experts.{e}.gate_proj.weight`` or, for mixtral,
  ``block_sparse_moe.experts.{e}.w1.weight``. Each model's ``sanitize()``
  restacks them. For dbrx this is the layout mlx-lm itself saves
  (``ffn.experts.{e}.w1.weight``). For deepseek_v3 (unquantized) the MLA
  ``embed_q``/``unembed_out`` pair is also written back as the Hugging Face
  ``kv_b_proj`` that its ``sanitize()`` splits.
* ``"native"``: whatever mlx-lm's own ``save_model`` would write
  (``"per_expert"`` for dbrx, ``"stacked"`` otherwise).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

import mlx.core as mx

EXPERT_FORMATS = ("stacked", "per_expert", "native")

# (layer-container prefix, MoE block name, {switch_mlp proj: per-expert name})
_PER_EXPERT_NAMES: Dict[str, Tuple[str, Dict[str, str]]] = {
    "mixtral": (
        "block_sparse_moe",
        {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    ),
    "qwen3_moe": ("mlp", {p: p for p in ("gate_proj", "down_proj", "up_proj")}),
    "qwen2_moe": ("mlp", {p: p for p in ("gate_proj", "down_proj", "up_proj")}),
    "deepseek_v3": ("mlp", {p: p for p in ("gate_proj", "down_proj", "up_proj")}),
    "olmoe": ("mlp", {p: p for p in ("gate_proj", "down_proj", "up_proj")}),
}

_SWITCH_RE = re.compile(
    r"^(?P<prefix>.*)\.switch_mlp\.(?P<proj>gate_proj|up_proj|down_proj)"
    r"\.(?P<kind>weight|scales|biases|bias)$"
)


def _unstack_experts(arch: str, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Splits ``switch_mlp`` tensors into Hugging Face per-expert tensors.

    A Linear ``bias`` of the experts (olmoe ``mlp_bias``) stays stacked:
    no ``sanitize()`` restacks per-expert biases.
    """
    block, names = _PER_EXPERT_NAMES[arch]
    out: Dict[str, mx.array] = {}
    for key, value in weights.items():
        match = _SWITCH_RE.match(key)
        if match is None or match["kind"] == "bias":
            out[key] = value
            continue
        prefix = match["prefix"]
        assert prefix.endswith(block), key
        for e in range(value.shape[0]):
            name = f"{prefix}.experts.{e}.{names[match['proj']]}.{match['kind']}"
            out[name] = value[e]
    return out


def _to_kv_b_proj(
    config: Dict[str, Any], weights: Dict[str, mx.array]
) -> Dict[str, mx.array]:
    """Rebuilds deepseek's HF ``kv_b_proj`` from mlx's ``embed_q``/``unembed_out``.

    The inverse of the split in ``deepseek_v3.Model.sanitize``: per head, the
    rows are ``qk_nope_head_dim`` key rows then ``v_head_dim`` value rows.
    """
    out: Dict[str, mx.array] = {}
    for key, value in weights.items():
        if key.endswith(".unembed_out.weight"):
            continue
        if not key.endswith(".embed_q.weight"):
            out[key] = value
            continue
        prefix = key[: -len(".embed_q.weight")]
        wk = value.swapaxes(-1, -2)  # [H, nope, kv_lora]
        wv = weights[f"{prefix}.unembed_out.weight"]  # [H, v_head, kv_lora]
        fused = mx.concatenate([wk, wv], axis=1)
        out[f"{prefix}.kv_b_proj.weight"] = fused.reshape(-1, config["kv_lora_rank"])
    return out


_DBRX_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w1|v1|w2)\.weight$"
)


def _fuse_dbrx_experts(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Fuses dbrx per-expert MLPs into the HF ``ffn.experts.mlp.{w1,v1,w2}``.

    Each fused tensor is ``[E * ffn, d_model]``; HF stores ``w2`` transposed.
    """
    out: Dict[str, mx.array] = {}
    groups: Dict[str, List[Tuple[int, mx.array]]] = {}
    for key, value in weights.items():
        match = _DBRX_EXPERT_RE.match(key)
        if match is None:
            out[key] = value
            continue
        fused_key = f"{match['prefix']}.mlp.{match['w']}"
        if fused_key not in groups:
            groups[fused_key] = []
            out[fused_key] = None  # keep the key's place in the order
        part = value.T if match["w"] == "w2" else value
        groups[fused_key].append((int(match["e"]), part))
    for fused_key, parts in groups.items():
        out[fused_key] = mx.concatenate([p for _, p in sorted(parts, key=lambda t: t[0])])
    return out


def resolve_expert_format(arch: str, expert_format: str) -> str:
    """Maps ``"native"`` to the layout mlx-lm itself saves for ``arch``."""
    if expert_format not in EXPERT_FORMATS:
        raise ValueError(
            f"expert_format must be one of {EXPERT_FORMATS}, not {expert_format!r}"
        )
    if expert_format == "native":
        return "per_expert" if arch == "dbrx" else "stacked"
    return expert_format


def to_expert_format(
    arch: str,
    config: Dict[str, Any],
    weights: Dict[str, mx.array],
    expert_format: str,
) -> Dict[str, mx.array]:
    """Rewrites mlx-lm model weights into the requested expert layout.

    Args:
        arch: The mlx-lm model_type.
        config: The config to be saved (``quantization`` tells if quantized).
        weights: ``tree_flatten(model.parameters())`` as a dict.
        expert_format: ``"stacked"``, ``"per_expert"`` or ``"native"``.

    Returns:
        The weights to write, in a layout the model's ``sanitize()`` reads.

    Raises:
        ValueError: For a layout mlx-lm cannot load back (dbrx fused or
            qwen3_moe per-expert, quantized).
    """
    expert_format = resolve_expert_format(arch, expert_format)
    quantized = "quantization" in config
    if arch == "dbrx":
        if expert_format == "per_expert":
            return weights
        if quantized:
            raise ValueError(
                "dbrx 'stacked' is the HF fused layout, which dbrx sanitize() "
                "only reads unquantized; use expert_format='per_expert'"
            )
        return _fuse_dbrx_experts(weights)
    if expert_format == "stacked":
        return weights
    if quantized and arch == "qwen3_moe":
        raise ValueError(
            "qwen3_moe sanitize() restacks only '.weight' per-expert tensors; "
            "a quantized qwen3_moe needs expert_format='stacked'"
        )
    weights = _unstack_experts(arch, weights)
    if arch == "deepseek_v3" and not quantized:
        # Quantized kv_b_proj would be dequantized and requantized by
        # sanitize(), changing the values, so keep mlx's split form then.
        weights = _to_kv_b_proj(config, weights)
    return weights
