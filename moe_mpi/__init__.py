"""moe_mpi: expert-parallel MoE inference for MLX over MPI."""
