"""Checks that synthetic checkpoints load in plain mlx-lm and behave well."""

import json

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import load_tokenizer

from moe_mpi.synthetic import (
    ARCHITECTURES,
    tiny_config,
    write_checkpoint,
    write_tokenizer,
)

PROMPT = "hello world, the quick brown fox"
GREEDY_STEPS = 16
# Greedy tokens must not hinge on differences this small (the sharded model
# sums expert outputs in another order).
MIN_GAP = 1e-3

VARIANTS = {
    "fp32_stacked": {},
    "fp32_per_expert": {"expert_format": "per_expert"},
    "q4": {"quantize": 4},
    "q8": {"quantize": 8},
}


def _variant_kwargs(arch, variant):
    kwargs = dict(VARIANTS[variant])
    # dbrx "stacked" is the HF fused layout, readable only unquantized.
    if arch == "dbrx" and "quantize" in kwargs:
        kwargs["expert_format"] = "native"
    return kwargs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Writes each (arch, variant) checkpoint once per module."""
    cache = {}

    def get(arch, variant):
        if (arch, variant) not in cache:
            path = tmp_path_factory.mktemp(f"{arch}_{variant}")
            cache[arch, variant] = write_checkpoint(
                path, arch, seed=0, **_variant_kwargs(arch, variant)
            )
        return cache[arch, variant]

    return get


def _prefill_logits(model, tokenizer):
    prompt = mx.array(tokenizer.encode(PROMPT))[None]
    logits = model(prompt)
    mx.eval(logits)
    return logits


def _greedy(model, tokenizer, steps=GREEDY_STEPS):
    """Returns the greedy tokens and the smallest top-2 log-prob gap."""
    prompt = mx.array(tokenizer.encode(PROMPT))
    tokens, gaps = [], []
    for token, logprobs in generate_step(prompt, model, max_tokens=steps):
        top2 = mx.sort(logprobs)[-2:]
        gaps.append((top2[1] - top2[0]).item())
        tokens.append(int(token))
    return tokens, min(gaps)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loads_and_generates(checkpoint, arch, variant):
    model, tokenizer = load(str(checkpoint(arch, variant)))  # strict load
    logits = _prefill_logits(model, tokenizer)
    assert logits.shape[-1] == tiny_config(arch)["vocab_size"]
    assert mx.all(mx.isfinite(logits)).item()
    tokens, gap = _greedy(model, tokenizer)
    assert len(tokens) == GREEDY_STEPS
    assert gap > MIN_GAP, f"near-tie in greedy decoding: gap {gap}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_per_expert_matches_stacked(checkpoint, arch):
    stacked, tokenizer = load(str(checkpoint(arch, "fp32_stacked")))
    per_expert, _ = load(str(checkpoint(arch, "fp32_per_expert")))
    a = _prefill_logits(stacked, tokenizer)
    b = _prefill_logits(per_expert, tokenizer)
    assert mx.array_equal(a, b).item()
    assert _greedy(stacked, tokenizer)[0] == _greedy(per_expert, tokenizer)[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantized_config_and_layers(checkpoint, arch, bits):
    path = checkpoint(arch, f"q{bits}")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    assert config["quantization"]["group_size"] == 32
    assert config["quantization_config"] == config["quantization"]
    model, _ = load(str(path))
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert "Linear" not in kinds
    if arch != "dbrx":  # dbrx keeps a list of per-expert Linear layers
        assert "QuantizedSwitchLinear" in kinds


def _weight_keys(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return index["weight_map"]


def test_per_expert_key_names(checkpoint):
    keys = _weight_keys(checkpoint("mixtral", "fp32_per_expert"))
    assert "model.layers.1.block_sparse_moe.experts.7.w1.weight" in keys
    assert not any("switch_mlp" in k for k in keys)
    keys = _weight_keys(checkpoint("qwen2_moe", "fp32_per_expert"))
    assert "model.layers.0.mlp.experts.0.down_proj.weight" in keys
    assert "model.layers.0.mlp.shared_expert_gate.weight" in keys
    keys = _weight_keys(checkpoint("deepseek_v3", "fp32_per_expert"))
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # first_k_dense_replace
    assert "model.layers.1.self_attn.kv_b_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    keys = _weight_keys(checkpoint("dbrx", "fp32_per_expert"))
    assert "transformer.blocks.0.ffn.experts.5.v1.weight" in keys


def test_dbrx_stacked_is_hf_fused(checkpoint):
    path = checkpoint("dbrx", "fp32_stacked")
    weights = mx.load(str(path / "model.safetensors"))
    config = tiny_config("dbrx")
    ffn = config["ffn_config"]
    fused_shape = (ffn["moe_num_experts"] * ffn["ffn_hidden_size"], config["d_model"])
    for w in ("w1", "v1", "w2"):
        assert weights[f"transformer.blocks.1.ffn.experts.mlp.{w}"].shape == fused_shape


def test_stacked_switch_mlp_shapes(checkpoint):
    model, _ = load(str(checkpoint("qwen3_moe", "fp32_stacked")))
    config = tiny_config("qwen3_moe")
    for layer in model.model.layers:
        gate_proj = layer.mlp.switch_mlp.gate_proj
        assert isinstance(gate_proj, SwitchLinear)
        assert gate_proj.weight.shape == (
            config["num_experts"],
            config["moe_intermediate_size"],
            config["hidden_size"],
        )
    model, _ = load(str(checkpoint("olmoe", "q4")))
    assert isinstance(model.model.layers[0].mlp.switch_mlp.up_proj, QuantizedSwitchLinear)


def test_sharded_files_match_single_file(tmp_path, checkpoint):
    path = write_checkpoint(tmp_path / "sharded", "qwen2_moe", max_shard_bytes=100_000)
    files = sorted(p.name for p in path.glob("model*.safetensors"))
    assert len(files) > 1
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(_weight_keys(path).values()) == set(files)
    sharded, tokenizer = load(str(path))
    single, _ = load(str(checkpoint("qwen2_moe", "fp32_stacked")))
    a = _prefill_logits(sharded, tokenizer)
    b = _prefill_logits(single, tokenizer)
    assert mx.array_equal(a, b).item()


def test_rewrite_removes_old_shards(tmp_path):
    path = tmp_path / "ckpt"
    write_checkpoint(path, "mixtral", max_shard_bytes=100_000, tokenizer=False)
    write_checkpoint(path, "mixtral", tokenizer=False)
    assert [p.name for p in path.glob("model*.safetensors")] == ["model.safetensors"]


def test_seed_changes_weights(tmp_path):
    a = write_checkpoint(tmp_path / "a", "olmoe", seed=1, tokenizer=False)
    b = write_checkpoint(tmp_path / "b", "olmoe", seed=1, tokenizer=False)
    c = write_checkpoint(tmp_path / "c", "olmoe", seed=2, tokenizer=False)
    wa, wb, wc = (mx.load(str(p / "model.safetensors")) for p in (a, b, c))
    key = "model.layers.0.mlp.switch_mlp.up_proj.weight"
    assert mx.array_equal(wa[key], wb[key]).item()
    assert not mx.array_equal(wa[key], wc[key]).item()


def test_norm_and_bias_are_random(checkpoint):
    weights = mx.load(str(checkpoint("qwen2_moe", "fp32_stacked") / "model.safetensors"))
    norm = weights["model.layers.0.input_layernorm.weight"]
    assert 0.01 < mx.std(norm).item() < 0.5 and abs(mx.mean(norm).item() - 1) < 0.1
    assert mx.std(weights["model.layers.0.self_attn.q_proj.bias"]).item() > 0.01
    weights = mx.load(str(checkpoint("deepseek_v3", "fp32_stacked") / "model.safetensors"))
    bias = weights["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == mx.float32 and mx.std(bias).item() > 0.01


def test_unsupported_layouts_raise(tmp_path):
    with pytest.raises(ValueError, match="dbrx"):
        write_checkpoint(tmp_path / "d", "dbrx", quantize=4, expert_format="stacked")
    with pytest.raises(ValueError, match="qwen3_moe"):
        write_checkpoint(tmp_path / "q", "qwen3_moe", quantize=4, expert_format="per_expert")
    with pytest.raises(ValueError):
        tiny_config("llama")


def test_tiny_config_overrides():
    config = tiny_config("dbrx", hidden_size=128, num_experts=6, ffn_config={"moe_top_k": 3})
    assert config["d_model"] == 128
    assert config["ffn_config"] == {"ffn_hidden_size": 64, "moe_num_experts": 6, "moe_top_k": 3}
    assert tiny_config("mixtral", num_experts=6)["num_local_experts"] == 6
    assert tiny_config("deepseek_v3", num_experts=12)["n_routed_experts"] == 12
    assert tiny_config("qwen3_moe", hidden_size=128)["head_dim"] == 32
    # The tiny default must not be mutated by overrides.
    assert tiny_config("dbrx")["ffn_config"]["moe_num_experts"] == 8


def test_qwen3_moe_sparse_layers(tmp_path, checkpoint):
    config = tiny_config("qwen3_moe")
    assert config["decoder_sparse_step"] == 1 and config["mlp_only_layers"] == []
    model, _ = load(str(checkpoint("qwen3_moe", "fp32_stacked")))
    assert all(hasattr(layer.mlp, "switch_mlp") for layer in model.model.layers)
    path = write_checkpoint(
        tmp_path / "dense0",
        tiny_config("qwen3_moe", mlp_only_layers=[0]),
        expert_format="per_expert",
    )
    model, _ = load(str(path))
    assert not hasattr(model.model.layers[0].mlp, "switch_mlp")
    assert hasattr(model.model.layers[1].mlp, "switch_mlp")


def test_deepseek_config_exercises_routing():
    config = tiny_config("deepseek_v3")
    assert config["n_group"] > 1 and 1 <= config["topk_group"] < config["n_group"]
    assert config["scoring_func"] == "sigmoid"
    assert config["routed_scaling_factor"] != 1
    assert config["first_k_dense_replace"] == 1 and config["n_shared_experts"] >= 1


@pytest.mark.parametrize("vocab_size", [64, 256, 512])
def test_tokenizer(tmp_path, vocab_size):
    eos_id = write_tokenizer(tmp_path, vocab_size)
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenizer.encode("hello world")
    assert ids and max(ids) < vocab_size
    assert tokenizer.decode(ids) == "hello world"
    assert tokenizer.eos_token_id == eos_id < vocab_size
    # Every id a random model can emit decodes.
    assert isinstance(tokenizer.decode(list(range(vocab_size))), str)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_skewed_routers_prefer_some_experts(tmp_path):
    """router_skew: each layer's expert shares follow capped Zipf shares (on
    tokens the fit never saw), each layer in its own order; mlx-lm loads it."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load as mlx_lm_load

    from moe_mpi import router_skew, routing, synthetic

    config = synthetic.tiny_config("qwen3_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    path = synthetic.write_checkpoint(tmp_path / "skewed", config, seed=2, router_skew=1.2)
    model, _ = mlx_lm_load(str(path))
    stats = routing.RoutingStats.for_model(model)
    tokens = mx.array(np.random.default_rng(99).integers(0, config["vocab_size"], (8, 64)).astype(np.int32))
    with routing.record_routing(model, stats):
        mx.eval(model(tokens))
    want = router_skew.capped_zipf(16, 1.2, 0.25)
    hottest = []
    for layer in range(stats.num_layers):
        got = np.sort(stats.frequencies(layer))[::-1]
        np.testing.assert_allclose(got[:4], want[:4], atol=0.05)
        hottest.append(int(np.argmax(stats.frequencies(layer))))
    assert len(set(hottest)) > 1, hottest  # not the same expert in every layer
