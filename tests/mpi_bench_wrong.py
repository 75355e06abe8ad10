"""Rank side of the output-check test: ``moe-mpi bench decode`` with one more mode, ``broken``.

``broken`` is ``ep`` with the first MoE layer's expert outputs scaled by
1.5: it runs, and runs fast, but its output is not mlx-lm's. The benchmark
must mark it wrong and keep its speed out of the results. Arguments are
``moe-mpi bench decode``'s.
"""

import sys

from moe_mpi.bench import decode, modes
from moe_mpi.shard import find_moe_blocks


class Broken(modes.MoeMpiMode):
    def build(self, ctx):
        built = super().build(ctx)
        switch = find_moe_blocks(built.model)[0].switch
        proj = switch.down_proj if "down_proj" in switch else switch.fc2
        proj.weight = proj.weight * 1.5
        built.name = "broken"
        return built


modes.MODES["broken"] = Broken("ep", description="ep with one layer's expert outputs scaled by 1.5 (a wrong mode)")
sys.exit(decode.main(sys.argv[1:]))
