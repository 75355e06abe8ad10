"""Tiny configs of mlx-lm MoE architectures that moe_mpi has no code for.

They go through the generic sharding path only; the tests prove that it works
for them (docs/architectures.md).
"""

# Two mlx-lm architectures with no code of their own in moe_mpi: glm4_moe
# (sigmoid group routing, shared experts) and gpt_oss (switch layer named
# `experts`, biases, its own activation).
EXTRA_CONFIGS = {
    "glm4_moe": dict(
        model_type="glm4_moe", vocab_size=256, hidden_size=64, intermediate_size=128,
        max_position_embeddings=512, moe_intermediate_size=64, norm_topk_prob=True,
        num_attention_heads=4, n_group=2, head_dim=16, topk_group=1, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=1.5, num_experts_per_tok=2,
        first_k_dense_replace=1, num_hidden_layers=3, num_key_value_heads=2,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, use_qk_norm=True,
        tie_word_embeddings=False, attention_bias=False, partial_rotary_factor=0.5,
    ),
    "gpt_oss": dict(
        model_type="gpt_oss", num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=256, hidden_size=64, intermediate_size=64, head_dim=16,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
}
