"""What the performance model needs of an MoE model: its sizes, weight format and bytes.

:class:`ModelShape` reads an mlx-lm / Hugging Face ``config.json`` and
counts the bytes of every part (attention, router, one expert, LM head, KV
cache per token), quantized weights with their scales and biases. ``moe-mpi
bench roofline`` and :mod:`moe_mpi.perfmodel` use this one byte model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ["ModelShape", "PerfModelError"]

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
