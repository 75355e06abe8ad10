"""``moe-mpi serve``: an OpenAI-compatible server over the expert-parallel cluster.

Run it on N ranks::

    mpirun -n 2 moe-mpi serve --model PATH_OR_REPO [--host 127.0.0.1] [--port 8080]

Rank 0 answers HTTP (``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``, ``GET /health``, ``GET /status``); every rank steps the
same continuous batch, with one control broadcast per step. The modules:

* :mod:`.command`: options, start-up in collective phases, the run;
* :mod:`.api`: mlx-lm's HTTP server, subclassed (endpoints, responses);
* :mod:`.request`: a request, read and checked before it reaches the cluster (OpenAI errors);
* :mod:`.logprobs`: log probabilities in OpenAI's shapes;
* :mod:`.desk`: rank 0's side of the loop (requests in, text out);
* :mod:`.engine`: the loop every rank runs over mlx-lm's ``BatchGenerator``;
* :mod:`.control`: the one broadcast per step;
* :mod:`.status`: the figures of ``/status``.

See docs/serving.md.
"""

from .command import main, setup_arg_parser

__all__ = ["main", "setup_arg_parser"]
