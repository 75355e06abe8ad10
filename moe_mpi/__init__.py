"""moe_mpi: expert-parallel Mixture-of-Experts inference for MLX over MPI.

Every rank runs the same program on a replicated dense model; each rank owns
a subset of the experts, and one all-reduce per MoE layer combines the
ranks' partial sums::

    from moe_mpi import Communicator, load

    comm = Communicator()
    model, tokenizer = load("path/to/model", comm=comm)
    logits = model(tokens)  # the same on every rank
"""

# Before anything imports mlx.core: on Linux, MLX then uses OpenBLAS
# instead of its wheel's reference BLAS (moe_mpi.cpu.blas).
from .cpu import preload_blas

preload_blas()

from .comm import Communicator  # noqa: E402  (after the BLAS preload)
from .loading import load  # noqa: E402
from .placement import ExpertPlacement  # noqa: E402
from .shard import shard_experts  # noqa: E402

__all__ = ["Communicator", "ExpertPlacement", "load", "shard_experts"]
__version__ = "0.1.0"
