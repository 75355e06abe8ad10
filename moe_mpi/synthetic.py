"""Tiny random-weight MoE checkpoints in the on-disk format mlx-lm loads.

The checkpoints written here need no network: ``mlx_lm.load(path)`` (or
``mlx_lm.utils.load``) reads them like any local model directory. They are
used by the tests (tiny shapes) and by benchmarks (bigger shapes through
``tiny_config(arch, **overrides)``).

Weights come from the real mlx-lm model class of each architecture, so the
parameter names and shapes are exactly the ones mlx-lm expects. Every
parameter is redrawn from a key derived from ``(seed, name)``, which makes
its value independent of construction order and of the expert layout on disk.
The scales are chosen so that router logits and output logits are well
spread: greedy decoding should then have no near-ties that a 1e-4 numerical
difference (e.g. a different summation order across ranks) could flip.

The experts are written in one of several layouts that mlx-lm loads
(``expert_format``, see :mod:`moe_mpi.expert_formats`).

Note: on the mlx CPU backend (0.32) ``gather_mm`` supports float32 only, so
an unquantized bfloat16/float16 checkpoint of a ``SwitchGLU`` model writes and
loads but cannot run a forward pass on CPU; quantized ones (``gather_qmm``)
run in any dtype.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .expert_formats import resolve_expert_format, to_expert_format
from .router_skew import skew_routers
from .tokenizer_writer import write_tokenizer

ARCHITECTURES = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "dbrx", "olmoe")

# Std of a router logit is ROUTER_GAIN (inputs are RMS-normalised to ~1), so
# softmax routing is decisive and top-k has no near-ties.
ROUTER_GAIN = 4.0
# deepseek_v3 scores experts with a sigmoid: keep its logits in the sigmoid's
# sensitive range or many scores saturate at ~1.0 and tie.
SIGMOID_ROUTER_GAIN = 2.0
E_SCORE_BIAS_STD = 0.1
# Std of an output logit is ~LM_HEAD_GAIN: a wide spread keeps the top-2 gap
# of greedy decoding far above float32 noise.
LM_HEAD_GAIN = 16.0
NORM_NOISE = 0.1
BIAS_STD = 0.1

_TINY_CONFIGS: Dict[str, Dict[str, Any]] = {
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "kv_lora_rank": 32,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "dbrx": {
        "architectures": ["DbrxForCausalLM"],
        "model_type": "dbrx",
        "vocab_size": 512,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "max_seq_len": 4096,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 500000.0},
        "ffn_config": {
            "ffn_hidden_size": 64,
            "moe_num_experts": 8,
            "moe_top_k": 2,
        },
        "tie_word_embeddings": False,
    },
    "olmoe": {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
}

# Generic override names -> the architecture's own config key ("a.b" nests).
_ALIASES: Dict[str, Dict[str, str]] = {
    "mixtral": {
        "num_experts": "num_local_experts",
        "moe_intermediate_size": "intermediate_size",
    },
    "qwen3_moe": {},
    "qwen2_moe": {},
    "deepseek_v3": {"num_experts": "n_routed_experts"},
    "olmoe": {"moe_intermediate_size": "intermediate_size"},
    "dbrx": {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "attn_config.kv_n_heads",
        "num_experts": "ffn_config.moe_num_experts",
        "num_experts_per_tok": "ffn_config.moe_top_k",
        "moe_intermediate_size": "ffn_config.ffn_hidden_size",
        "max_position_embeddings": "max_seq_len",
    },
}


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------


def tiny_config(arch: str, **overrides: Any) -> Dict[str, Any]:
    """Returns a tiny Hugging Face style ``config.json`` dict for ``arch``.

    Besides the architecture's own keys, a few generic names are accepted for
    every architecture and mapped to its own key: ``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``
    (e.g. ``num_experts`` -> ``num_local_experts`` for mixtral,
    ``ffn_config.moe_num_experts`` for dbrx). Dict values (dbrx's
    ``ffn_config``/``attn_config``) are merged, not replaced.

    Args:
        arch: One of ``ARCHITECTURES`` (an mlx-lm ``model_type``).
        **overrides: Config keys to change, e.g. ``hidden_size=1024``.

    Returns:
        A new config dict.

    Raises:
        ValueError: If ``arch`` is unknown.
    """
    if arch not in _TINY_CONFIGS:
        raise ValueError(f"Unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    config = copy.deepcopy(_TINY_CONFIGS[arch])
    aliases = _ALIASES[arch]
    for key, value in overrides.items():
        _set_nested(config, aliases.get(key, key), copy.deepcopy(value))
    # qwen3_moe keeps head_dim explicit; follow the hidden size unless given.
    if arch == "qwen3_moe" and "head_dim" not in overrides:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return config


def _set_nested(config: Dict[str, Any], dotted_key: str, value: Any) -> None:
    """Sets ``config[a][b] = value`` for ``"a.b"``, merging dict values."""
    *parents, leaf = dotted_key.split(".")
    node = config
    for name in parents:
        node = node.setdefault(name, {})
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        node[leaf].update(value)
    else:
        node[leaf] = value


def _key(seed: int, name: str) -> mx.array:
    """A PRNG key for one parameter: independent of any other parameter."""
    return mx.random.key(((seed & 0xFFFFFFFF) << 32) | zlib.crc32(name.encode()))


def _module_paths(model: nn.Module, types: Tuple[type, ...]) -> set:
    """Returns the dotted paths of the submodules that are instances of types."""
    return {path for path, m in model.named_modules() if isinstance(m, types)}


_ROUTER_RE = re.compile(r"(\.gate|\.router\.layer)\.weight$")


def _random_value(
    name: str,
    shape: Tuple[int, ...],
    key: mx.array,
    *,
    is_norm: bool,
    is_embedding: bool,
    router_gain: float,
) -> mx.array:
    """Draws one parameter; the scale depends on the role of the parameter."""
    noise = mx.random.normal(shape, key=key)
    if is_norm:
        # Non-trivial norm weights, so a wrong or missing norm shows up.
        return 1.0 + NORM_NOISE * noise if name.endswith("weight") else BIAS_STD * noise
    if name.endswith("e_score_correction_bias"):
        return E_SCORE_BIAS_STD * noise
    if name.endswith("bias"):
        return BIAS_STD * noise
    if is_embedding:
        return noise
    fan_in = shape[-1]
    if name == "lm_head.weight":
        return noise * (LM_HEAD_GAIN / math.sqrt(fan_in))
    if _ROUTER_RE.search(name):
        return noise * (router_gain / math.sqrt(fan_in))
    return noise / math.sqrt(fan_in)


def randomize_parameters(model: nn.Module, config: Dict[str, Any], seed: int) -> None:
    """Redraws every parameter of ``model`` in place (float32).

    Args:
        model: An mlx-lm model, not yet quantized.
        config: Its config (selects the router scale).
        seed: Base seed; each parameter uses a key from ``(seed, name)``.
    """
    norms = _module_paths(model, (nn.RMSNorm, nn.LayerNorm))
    embeddings = _module_paths(model, (nn.Embedding,))
    sigmoid = config.get("scoring_func") == "sigmoid"
    router_gain = SIGMOID_ROUTER_GAIN if sigmoid else ROUTER_GAIN
    new_params = []
    for name, value in tree_flatten(model.parameters()):
        owner = name.rsplit(".", 1)[0]
        new = _random_value(
            name,
            value.shape,
            _key(seed, name),
            is_norm=owner in norms,
            is_embedding=owner in embeddings,
            router_gain=router_gain,
        )
        new_params.append((name, new.astype(mx.float32)))
        # Evaluate as we go so a large model never holds two lazy graphs.
        mx.eval(new_params[-1][1])
    model.update(tree_unflatten(new_params))


def vocab_size(model: nn.Module) -> int:
    """The ids a model emits: the last axis of its logits for one token.

    Read from the model, not from its config, where the key differs by
    architecture (``vocab_size``, ``text_config.vocab_size``, phixtral's
    ``num_vocab``). MLX knows the shape without evaluating anything.
    """
    return model(mx.array([[0]])).shape[-1]


def _cast(model: nn.Module, dtype: str) -> None:
    """Casts floating parameters to ``dtype`` as ``mlx_lm.convert`` does."""
    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda _: True)
    params = [
        (k, v.astype(target) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))


def build_model(
    config: Dict[str, Any],
    *,
    seed: int = 0,
    dtype: str = "float32",
    quantize: Optional[int] = None,
    group_size: int = 32,
    router_skew: float = 0.0,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Builds a random mlx-lm model and the config to save next to it.

    Args:
        config: HF-style config (see ``tiny_config``).
        seed: Weight seed.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        quantize: ``None``, 4 or 8 (mlx affine quantization).
        group_size: Quantization group size (32 or 64).
        router_skew: 0 for evenly used experts; ``a > 0`` makes the routers
            prefer some experts, their shares about Zipf's ``1 / rank**a``,
            a different order in each layer
            (:func:`moe_mpi.router_skew.skew_routers`).

    Returns:
        ``(model, config)``; the config has ``quantization`` when quantized.
    """
    from mlx_lm.utils import quantize_model

    from .loading import model_classes

    config = copy.deepcopy(config)
    config["torch_dtype"] = dtype
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    randomize_parameters(model, config, seed)
    if router_skew:
        skew_routers(model, config, router_skew, seed)
    if dtype != "float32":
        _cast(model, dtype)
    if quantize is not None:
        if quantize not in (4, 8):
            raise ValueError(f"quantize must be None, 4 or 8, not {quantize!r}")
        # quantize_model prints a bits-per-weight line; keep test output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(
                model, config, group_size=group_size, bits=quantize
            )
    mx.eval(model.parameters())
    return model, config


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _make_shards(
    weights: Dict[str, mx.array], max_shard_bytes: Optional[int]
) -> List[Dict[str, mx.array]]:
    """Greedy split in order, as ``mlx_lm.utils.make_shards`` but in bytes."""
    if max_shard_bytes is None:
        return [dict(weights)]
    shards: List[Dict[str, mx.array]] = []
    size = 0
    for key, value in weights.items():
        if not shards or size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    return shards


def write_weights(
    path: Path,
    weights: Dict[str, mx.array],
    *,
    max_shard_bytes: Optional[int] = None,
    total_parameters: Optional[int] = None,
) -> List[Path]:
    """Writes safetensors shards and ``model.safetensors.index.json``.

    File names and index follow ``mlx_lm.utils.save_model``: one
    ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` when split.
    Old ``model*.safetensors`` in ``path`` are removed first, because mlx-lm
    loads every file matching that pattern.

    Args:
        path: Output directory (created).
        weights: Name -> array, in the order to write.
        max_shard_bytes: Split so each file holds at most this many bytes of
            tensors (a bigger tensor gets a file of its own). None: one file.
        total_parameters: For the index metadata.

    Returns:
        The shard paths written.
    """
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("model*.safetensors"):
        old.unlink()
    shards = _make_shards(weights, max_shard_bytes)
    count = len(shards)
    index: Dict[str, Any] = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": {},
    }
    if total_parameters is not None:
        index["metadata"]["total_parameters"] = total_parameters
    files = []
    for i, shard in enumerate(shards):
        name = "model.safetensors"
        if count > 1:
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: name for k in shard})
        files.append(path / name)
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
    return files


def write_checkpoint(
    path: Union[str, Path],
    arch_or_config: Union[str, Dict[str, Any]],
    *,
    seed: int = 0,
    dtype: str = "float32",
    quantize: Optional[int] = None,
    group_size: int = 32,
    expert_format: str = "stacked",
    max_shard_bytes: Optional[int] = None,
    tokenizer: bool = True,
    router_skew: float = 0.0,
) -> Path:
    """Writes a random-weight checkpoint that ``mlx_lm.load(path)`` loads.

    Args:
        path: Output directory (created; old weight files are replaced).
        arch_or_config: An arch name (uses ``tiny_config(arch)``) or a config
            dict with ``model_type``.
        seed: Weight seed; the same seed gives the same model in any layout.
        dtype: Dtype of the unquantized parameters.
        quantize: ``None``, 4 or 8 bits (mlx affine, via
            ``mlx_lm.utils.quantize_model``, so ``config.json`` gets the
            ``quantization`` key exactly as mlx-lm writes it).
        group_size: Quantization group size (32 or 64).
        expert_format: ``"stacked"``, ``"per_expert"`` or ``"native"`` (see
            :mod:`moe_mpi.expert_formats`).
        max_shard_bytes: Split the weights into several files of at most
            this many bytes each. None: one file.
        tokenizer: Also write an offline tokenizer.
        router_skew: See :func:`build_model`.

    Returns:
        The checkpoint directory.
    """
    from mlx_lm.utils import get_total_parameters, save_config

    path = Path(path)
    if isinstance(arch_or_config, str):
        config = tiny_config(arch_or_config)
    else:
        config = copy.deepcopy(arch_or_config)
    arch = config["model_type"]
    expert_format = resolve_expert_format(arch, expert_format)
    model, config = build_model(
        config, seed=seed, dtype=dtype, quantize=quantize, group_size=group_size, router_skew=router_skew
    )
    weights = dict(tree_flatten(model.parameters()))
    weights = to_expert_format(arch, config, weights, expert_format)
    write_weights(
        path,
        weights,
        max_shard_bytes=max_shard_bytes,
        total_parameters=get_total_parameters(model),
    )
    vocab = vocab_size(model)
    del model, weights
    if tokenizer:
        config["eos_token_id"] = write_tokenizer(path, vocab)
    save_config(config, config_path=path / "config.json")
    return path
