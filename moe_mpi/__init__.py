"""moe_mpi: expert-parallel Mixture-of-Experts inference for MLX over MPI.

Every rank runs the same program on a replicated dense model; each rank owns
a subset of the experts, and one all-reduce per MoE layer combines the
ranks' partial sums::

    from moe_mpi import Communicator, load

    comm = Communicator()
    model, tokenizer = load("path/to/model", comm=comm)
    logits = model(tokens)  # the same on every rank
"""

from .comm import Communicator
from .loading import load
from .placement import ExpertPlacement
from .shard import shard_experts

__all__ = ["Communicator", "ExpertPlacement", "load", "shard_experts"]
__version__ = "0.1.0"
