"""Tiny configs of mlx-lm MoE architectures that moe_mpi has no code for.

They go through the generic sharding path only; the tests prove that it works
for them (docs/architectures.md): ``EXTRA_CONFIGS`` are split exactly on 1, 2
and 3 ranks; ``REFUSED_CONFIGS`` have MoE blocks whose output is not linear
(nor affine) in their experts' outputs, refused on more than one rank
(moe_mpi/contract.py).

Every mlx-lm 0.32.2 model file with a SwitchGLU/SwitchMLP, or built on one
that has, has a config here (tests/test_configs.py checks), except muse_spark,
whose model calls Metal kernels (no Linux CPU run), and the six architectures
of moe_mpi.synthetic.ARCHITECTURES, tested on their own.
Each is tiny: hidden size 64, 8 experts, vocab 256, a few layers (a dense
first layer where the architecture has the option, to cover it).
"""

_BASE = dict(vocab_size=256, hidden_size=64, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=512, tie_word_embeddings=False)
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
# Multi-head latent attention (deepseek_v2 and its descendants).
_MLA = dict(kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
# Linear attention layers 1 and 3 (kimi_linear, kimi_k3).
_KDA = {"kda_layers": [1, 3], "num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4}
_SLIDING = ["sliding_attention", "full_attention"]

EXTRA_CONFIGS = {
    # Shared experts named `shared_experts`, a softmax gate mixing them with the routed sum.
    "Klear": dict(
        _BASE, **_ATTENTION, model_type="Klear", num_hidden_layers=2, intermediate_size=128,
        attention_bias=False, mlp_only_layers=[], num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, n_shared_experts=1, moe_intermediate_size=64, norm_topk_prob=True,
    ),
    # Router nested as `router.gate`, group routing, sliding-window layers.
    "afmoe": dict(
        _BASE, **_ATTENTION, model_type="afmoe", num_hidden_layers=3, intermediate_size=128,
        moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
        num_dense_layers=1, n_group=2, topk_group=1, sliding_window=8, layer_types=_SLIDING + _SLIDING[:1],
    ),
    "bailing_hybrid": dict(
        _BASE, **_ATTENTION, **_MLA, model_type="bailing_hybrid", num_hidden_layers=3,
        intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        num_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, layer_group_size=2,
        group_norm_size=2, routed_scaling_factor=1.5,
    ),
    # Experts with biases (use_bias), sigmoid group routing with expert bias.
    "bailing_moe": dict(
        _BASE, **_ATTENTION, model_type="bailing_moe", num_hidden_layers=3, intermediate_size=128,
        moe_intermediate_size=64, num_experts=8, num_shared_experts=1, norm_topk_prob=True,
        num_experts_per_tok=2, first_k_dense_replace=1, use_qk_norm=True, use_bias=True,
        moe_router_enable_expert_bias=True, score_function="sigmoid", n_group=2, topk_group=1,
        routed_scaling_factor=1.5,
    ),
    "bailing_moe_linear": dict(
        _BASE, **_ATTENTION, model_type="bailing_moe_linear", num_hidden_layers=3, intermediate_size=128,
        moe_intermediate_size=64, num_experts=8, num_shared_experts=1, norm_topk_prob=True,
        num_experts_per_tok=2, first_k_dense_replace=1, layer_group_size=2, group_norm_size=2,
        use_qk_norm=True,
    ),
    "bailing_moe_v3": dict(
        _BASE, **_MLA, model_type="bailing_moe_v3", num_hidden_layers=3, intermediate_size=128,
        moe_intermediate_size=64, moe_shared_expert_intermediate_size=64, num_attention_heads=4,
        num_experts=8, num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
        n_group=2, topk_group=1, routed_scaling_factor=1.5, layer_group_size=2, head_dim=16,
    ),
    "deepseek": dict(
        _BASE, model_type="deepseek", num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, first_k_dense_replace=1,
    ),
    "deepseek_v2": dict(
        _BASE, **_MLA, model_type="deepseek_v2", num_hidden_layers=3, intermediate_size=128,
        moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=1.5, topk_method="group_limited_greedy", n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        rope_scaling={"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    "deepseek_v32": dict(
        _BASE, **_MLA, model_type="deepseek_v32", num_hidden_layers=3, intermediate_size=128,
        moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=1.5, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, index_head_dim=16, index_n_heads=2, index_topk=4,
    ),
    # The block (`Experts`) takes the routing from its caller; shared experts outside it.
    "deepseek_v41": dict(
        model_type="deepseek_v41", vocab_size=256, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, head_dim=32, q_lora_rank=32, qk_rope_head_dim=8, o_groups=2,
        o_lora_rank=32, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
        rms_norm_eps=1e-6, sliding_window=8, max_position_embeddings=512, hc_mult=2, hc_sinkhorn_iters=3,
    ),
    # Switch layer named `experts`.
    "dots1": dict(
        _BASE, **_ATTENTION, model_type="dots1", num_hidden_layers=3, intermediate_size=128,
        first_k_dense_replace=1, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
        norm_topk_prob=True, num_experts_per_tok=2, routed_scaling_factor=1.5, n_group=2, topk_group=1,
    ),
    "ernie4_5_moe": dict(
        _BASE, **_ATTENTION, model_type="ernie4_5_moe", num_hidden_layers=3, intermediate_size=128,
        use_bias=False, moe_num_experts=8, moe_layer_start_index=1, moe_intermediate_size=64, moe_k=2,
        moe_num_shared_experts=1,
    ),
    "exaone_moe": dict(
        _BASE, **_ATTENTION, model_type="exaone_moe", num_hidden_layers=3, intermediate_size=128,
        moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
        sliding_window=8, layer_types=_SLIDING[:1] + _SLIDING, is_moe_layer=[False, True, True],
        n_group=2, topk_group=1,
    ),
    # A block beside a dense MLP in each layer, called with the routing; GeGLU experts.
    "gemma4_text": dict(
        model_type="gemma4_text", vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, head_dim=16, global_head_dim=32, num_key_value_heads=2,
        num_kv_shared_layers=0, vocab_size_per_layer_input=256, hidden_size_per_layer_input=16,
        sliding_window=8, layer_types=_SLIDING, max_position_embeddings=512, enable_moe_block=True,
        num_experts=8, top_k_experts=2, moe_intermediate_size=64, tie_word_embeddings=True,
    ),
    "glm4_moe": dict(
        model_type="glm4_moe", vocab_size=256, hidden_size=64, intermediate_size=128,
        max_position_embeddings=512, moe_intermediate_size=64, norm_topk_prob=True,
        num_attention_heads=4, n_group=2, head_dim=16, topk_group=1, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=1.5, num_experts_per_tok=2,
        first_k_dense_replace=1, num_hidden_layers=3, num_key_value_heads=2,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, use_qk_norm=True,
        tie_word_embeddings=False, attention_bias=False, partial_rotary_factor=0.5,
    ),
    "glm4_moe_lite": dict(
        _BASE, **_MLA, model_type="glm4_moe_lite", num_hidden_layers=3, intermediate_size=128,
        moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=1.5, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, num_nextn_predict_layers=0,
    ),
    # Switch layer named `experts`, biases, its own activation, sliding-window layers.
    "gpt_oss": dict(
        model_type="gpt_oss", num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=256, hidden_size=64, intermediate_size=64, head_dim=16,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, layer_types=_SLIDING,
    ),
    "granitemoe": dict(
        _BASE, model_type="granitemoe", num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, logits_scaling=2.0, attention_multiplier=0.25, embedding_multiplier=4.0,
        residual_multiplier=0.5, attention_bias=False, num_local_experts=8, num_experts_per_tok=2,
    ),
    # Mamba layers; a shared MLP beside the block, not in it.
    "granitemoehybrid": dict(
        _BASE, model_type="granitemoehybrid", num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=False, embedding_multiplier=4.0,
        attention_multiplier=0.25, logits_scaling=2.0, residual_multiplier=0.5,
        layer_types=["mamba", "attention"], num_local_experts=8, num_experts_per_tok=2,
        shared_intermediate_size=64, mamba_n_heads=4, mamba_d_head=32, mamba_expand=2,
        mamba_proj_bias=False, mamba_d_state=16, mamba_d_conv=4, mamba_n_groups=1, mamba_conv_bias=True,
    ),
    # Shared expert named `shared_mlp`.
    "hunyuan": dict(
        _BASE, **_ATTENTION, model_type="hunyuan", num_hidden_layers=2, intermediate_size=64,
        attention_bias=False, moe_topk=2, num_experts=8, num_shared_expert=1, use_mixed_mlp_moe=True,
        use_qk_norm=True, use_cla=False, cla_share_factor=2,
        rope_scaling={"alpha": 1.0, "factor": 1.0, "type": "dynamic"},
    ),
    "jamba": dict(
        _BASE, model_type="jamba", num_hidden_layers=4, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1,
        expert_layer_period=2, mamba_d_conv=4, mamba_d_state=16, mamba_expand=2, num_experts=8,
        num_experts_per_tok=2,
    ),
    # Latent MoE: the experts run at width 32 between two projections (no norm).
    "kimi_k3": dict(
        _BASE, model_type="kimi_k3", num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=128, linear_attn_config=_KDA, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
        moe_intermediate_size=64, first_k_dense_replace=1, num_expert_group=2, topk_group=1,
        routed_expert_hidden_size=32,
    ),
    "kimi_linear": dict(
        _BASE, **_ATTENTION, model_type="kimi_linear", num_hidden_layers=3, intermediate_size=128,
        linear_attn_config=_KDA, model_max_length=512, num_experts=8, moe_intermediate_size=64,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_experts_per_token=2,
        num_shared_experts=1, first_k_dense_replace=1, num_expert_group=2, topk_group=1,
    ),
    # Shared expert named `shared_expert`, routed sum scaled after the experts.
    "laguna": dict(
        _BASE, **_ATTENTION, model_type="laguna", num_hidden_layers=3, intermediate_size=128,
        sliding_window=8, layer_types=["full_attention", "sliding_attention", "full_attention"],
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
        moe_routed_scaling_factor=1.5,
    ),
    "lfm2_moe": dict(
        _BASE, model_type="lfm2_moe", num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=64,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_attention_heads=4,
        num_key_value_heads=2, use_expert_bias=True, num_dense_layers=1, norm_eps=1e-5, conv_bias=False,
        conv_L_cache=3, layer_types=["conv", "full_attention", "conv"],
    ),
    # The router's score scales the experts' input; `text_config`; MoE every other layer.
    "llama4": dict(
        model_type="llama4", text_config=dict(
            _BASE, **_ATTENTION, model_type="llama4_text", attention_bias=False, attention_chunk_size=8,
            interleave_moe_layer_step=2, intermediate_size=64, intermediate_size_mlp=128,
            num_experts_per_tok=1, num_hidden_layers=4, num_local_experts=8, rope_scaling=None,
            use_qk_norm=True,
        ),
    ),
    # Identity "zero experts": a term without experts, kept by one rank.
    "longcat_flash": dict(
        model_type="longcat_flash", attention_method="MLA", zero_expert_type="identity", hidden_size=64,
        ffn_hidden_size=128, moe_topk=2, expert_ffn_hidden_size=64, n_routed_experts=8, zero_expert_num=2,
        num_layers=2, vocab_size=256, max_position_embeddings=512, num_attention_heads=4,
        **_MLA, routed_scaling_factor=1.5, rms_norm_eps=1e-5, rope_theta=10000.0,
        mla_scale_q_lora=True, mla_scale_kv_lora=True, attention_bias=False,
    ),
    "mellum": dict(
        _BASE, **_ATTENTION, model_type="mellum", num_hidden_layers=2, intermediate_size=128, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True, sliding_window=8,
        layer_types=_SLIDING, rope_parameters={"sliding_attention": {"rope_theta": 10000.0},
                                               "full_attention": {"rope_theta": 100000.0}},
    ),
    "mimo_v2_flash": dict(
        model_type="mimo_v2_flash", num_experts_per_tok=2, hybrid_layer_pattern=[0, 1, 0],
        moe_layer_freq=[0, 1, 1], add_swa_attention_sink_bias=True, add_full_attention_sink_bias=False,
        sliding_window_size=8, vocab_size=256, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=1.5, topk_method="noaux_tc",
        scoring_func="sigmoid", norm_topk_prob=True, n_group=2, topk_group=1, max_position_embeddings=512,
        layernorm_epsilon=1e-5, rope_theta=10000.0, swa_rope_theta=10000.0, swa_num_attention_heads=4,
        swa_num_key_value_heads=2, head_dim=16, v_head_dim=16, swa_head_dim=16, swa_v_head_dim=16,
        partial_rotary_factor=0.5,
    ),
    "minimax": dict(
        _BASE, **_ATTENTION, model_type="minimax", intermediate_size=64, num_experts_per_tok=2,
        num_local_experts=8, shared_intermediate_size=0, num_hidden_layers=2, rotary_dim=8,
    ),
    # Clamped SwiGLU experts and shared experts; a dense first layer; `text_config`.
    "minimax_m3_vl": dict(
        model_type="minimax_m3_vl", text_config=dict(
            _BASE, **_ATTENTION, model_type="minimax_m3", intermediate_size=64, dense_intermediate_size=128,
            shared_intermediate_size=64, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
            routed_scaling_factor=1.5, mlp_layer_types=["dense", "sparse"],
        ),
    ),
    "mistral4": dict(
        _BASE, **_MLA, model_type="mistral4", num_hidden_layers=3, intermediate_size=128,
        moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=1.5, norm_topk_prob=True, topk_group=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1,
                         "original_max_position_embeddings": 512},
    ),
    # SwitchMLP with ReLU² experts, Mamba layers; latent MoE: experts at width 32, then a
    # projection with a bias (mlp_bias), a term without experts kept by one rank.
    "nemotron_h": dict(
        model_type="nemotron_h", vocab_size=256, hidden_size=64, intermediate_size=128,
        max_position_embeddings=512, num_attention_heads=4, num_key_value_heads=2, attention_bias=False,
        mamba_num_heads=4, mamba_head_dim=16, mamba_proj_bias=False, ssm_state_size=16, conv_kernel=4,
        n_groups=1, mlp_bias=True, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True,
        hybrid_override_pattern=["M", "E", "*", "E"], head_dim=16, moe_intermediate_size=64,
        moe_shared_expert_intermediate_size=64, n_group=1, n_routed_experts=8, n_shared_experts=1,
        topk_group=1, num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=1.5,
        tie_word_embeddings=False, moe_latent_size=32,
    ),
    "phimoe": dict(
        model_type="phimoe", vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        original_max_position_embeddings=512, num_local_experts=8, num_experts_per_tok=2,
    ),
    # SwitchMLP with biases; `num_vocab`, not `vocab_size`.
    "phixtral": dict(
        model_type="phixtral", num_vocab=256, model_dim=64, num_heads=4, num_layers=2, rotary_dim=8,
        num_experts_per_tok=2, num_local_experts=8,
    ),
    "qwen3_next": dict(
        _BASE, model_type="qwen3_next", num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
        shared_expert_intermediate_size=64, mlp_only_layers=[], moe_intermediate_size=64,
        num_key_value_heads=2, partial_rotary_factor=0.5, head_dim=16, full_attention_interval=2,
        norm_topk_prob=True,
    ),
    # Shared expert named `share_expert`; clamped SwiGLU.
    "step3p5": dict(
        _BASE, model_type="step3p5", num_hidden_layers=2, num_attention_heads=4, num_attention_groups=2,
        head_dim=16, intermediate_size=128, sliding_window=8, layer_types=_SLIDING, moe_num_experts=8,
        moe_top_k=2, moe_intermediate_size=64, share_expert_dim=64, moe_layers_enum="0,1",
        swiglu_limits=[7.0, 7.0], swiglu_limits_shared=[7.0, 7.0],
    ),
}

# model_type (or model_type-option) -> (config, what the refusal says). On one
# rank, or with mode="central", they run exactly.
# Model files that build on another architecture's classes, with a config or
# wrapper of their own: vision-language wrappers (`text_config`, the language
# model under `language_model`), new ModelArgs over an old model, new embeddings.
_DEEPSEEK_V3_TEXT = dict(
    _BASE, **_MLA, model_type="deepseek_v3", num_hidden_layers=3, intermediate_size=128,
    moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    n_routed_experts=8, routed_scaling_factor=1.5, n_group=2, topk_group=1, num_experts_per_tok=2,
    first_k_dense_replace=1, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
)
_QWEN3_5_TEXT = dict(
    {k: v for k, v in EXTRA_CONFIGS["qwen3_next"].items() if k not in ("partial_rotary_factor", "mlp_only_layers")},
    rope_parameters={"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)
EXTRA_CONFIGS.update({
    # deepseek_v32's model (MLA, an indexer) under its own ModelArgs, rope in `rope_parameters`.
    "glm_moe_dsa": dict(
        {k: v for k, v in EXTRA_CONFIGS["deepseek_v32"].items() if k != "rope_theta"}, model_type="glm_moe_dsa",
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, topk_method="noaux_tc",
        scoring_func="sigmoid", norm_topk_prob=True, moe_layer_freq=1, attention_bias=False,
    ),
    # deepseek_v3's model under `language_model`, config in `text_config`.
    "kimi_k25": dict(model_type="kimi_k25", text_config=_DEEPSEEK_V3_TEXT),
    "kimi_vl": dict(model_type="kimi_vl", text_config=_DEEPSEEK_V3_TEXT),
    # longcat_flash's layers behind n-gram embeddings.
    "longcat_flash_ngram": dict(
        EXTRA_CONFIGS["longcat_flash"], model_type="longcat_flash_ngram", ngram_vocab_size_ratio=2,
        emb_neighbor_num=3, emb_split_num=2,
    ),
    # qwen3_next's MoE block (gated shared expert) and attention, gated delta-net layers,
    # the language model under `language_model`; qwen3_5_moe nests it in `text_config`.
    "qwen3_5": dict(_QWEN3_5_TEXT, model_type="qwen3_5"),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", text_config=dict(_QWEN3_5_TEXT, model_type="qwen3_5_moe_text")),
    # glm4_moe's model under its own ModelArgs.
    "solar_open": dict(EXTRA_CONFIGS["glm4_moe"], model_type="solar_open"),
})

REFUSED_CONFIGS = {
    # An RMS norm of the routed sum (latent_moe_use_norm).
    "kimi_k3-latent-norm": (
        dict(EXTRA_CONFIGS["kimi_k3"], latent_moe_use_norm=True),
        "not linear in its experts' outputs",
    ),
}
