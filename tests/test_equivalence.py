"""A sharded model gives the same logits and greedy tokens as plain mlx-lm.

For every architecture, tiny random-weight checkpoints are written to disk
in the formats mlx-lm loads (stacked and per-expert experts, float32, 4-bit
and 8-bit). The reference is computed here, in this process, with plain
single-process mlx-lm; the sharded runs happen under real ``mpirun`` on 1, 2
and 3 ranks (tests/mpi_equivalence.py).
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import dbrx
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP
from mlx_lm.utils import load as mlx_lm_load

from moe_mpi import synthetic
from moe_mpi.launch import run_mpirun

from configs import EXTRA_CONFIGS, REFUSED_CONFIGS

HERE = Path(__file__).parent
GREEDY_TOKENS = 16

# Architectures whose attention is not split by heads (tests/test_attention.py says why).
ATTENTION_REFUSED = ("deepseek_v3", "olmoe")

# name -> (write_checkpoint kwargs, mode, placement). "shard" loads with plain
# mlx-lm and then calls shard_experts; "load" uses moe_mpi.load.
VARIANTS = {
    "fp32": (dict(), "load", None),
    "fp32-per-expert": (dict(expert_format="per_expert"), "load", "round-robin"),
    # "native": the layout mlx-lm itself saves (per-expert for dbrx).
    "q4": (dict(quantize=4, expert_format="native"), "load", None),
    "q8": (dict(quantize=8, expert_format="native"), "load", None),
    "fp32-shard_experts": (dict(), "shard", None),
}
WEIGHTS = {2: [2, 1], 3: [2, 1, 1]}
# mode="auto" with each --balance choice runs on experts this wide: wide enough that the optimizer
# splits hot ones (thin slices cost more, docs/balance.md), so that "split" does split.
BALANCE_WIDTH = 1024
# Router statistics the balance cases are chosen from: two hot experts, the rest cooler.
BALANCE_SHARES = [0.4, 0.3, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03]
# balance choice -> what its layouts must hold (None: either may happen, by cost).
BALANCE_EXPECT = {
    "split": dict(split=True, replicated=False),
    "replicate": dict(split=False, replicated=True),
    "both": None,
}


def count_moe_layers(model) -> int:
    """MoE layers of a plain mlx-lm model, counted independently of moe_mpi."""
    moe_types = (SwitchGLU, SwitchMLP, dbrx.SparseMoeBlock)
    return sum(isinstance(m, moe_types) for _, m in model.named_modules())


def run_cases(n: int, cases: list, tmp_path: Path) -> None:
    """Runs tests/mpi_equivalence.py on ``n`` ranks; every case must match."""
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    # A rank that crashes prints every thread's Python stack (faulthandler) rather
    # than Open MPI's C backtrace alone: Open MPI is told to leave those signals be.
    proc = run_mpirun(
        n, [sys.executable, "-X", "faulthandler", "-m", "mpi4py", str(HERE / "mpi_equivalence.py"), str(spec)],
        timeout=600, extra=["-x", "OMPI_MCA_opal_signal="],
    )
    output = proc.stdout + proc.stderr
    started = [line for line in proc.stderr.splitlines() if " starting " in line]
    assert proc.returncode == 0, output + f"\nlast case started: {started[-1] if started else 'none'}"
    matched = [line for line in proc.stdout.splitlines() if line.endswith("match")]
    assert len(matched) == len(cases), output


def write_reference(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """Logits and greedy tokens of single-process mlx-lm, saved as .npz."""
    model, _ = mlx_lm_load(str(model_dir))
    vocab = synthetic.vocab_size(model)
    prompt = np.random.default_rng(seed).integers(0, vocab, size=12)
    logits = model(mx.array(prompt)[None])
    greedy = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=GREEDY_TOKENS)]
    np.savez(
        out,
        prompt=prompt,
        logits=np.array(logits),
        greedy=np.array(greedy),
        moe_layers=count_moe_layers(model),
    )
    return out


#: A row price under which sharing a copy's rows pays whenever it evens out work: every row a full read.
LINEAR_TABLE = {"rows": [1, 2], "seconds_per_byte": [1e-9, 2e-9]}


def write_linear_profile(out: Path) -> Path:
    """A calibrate profile (only what mode auto reads) pricing rows as :data:`LINEAR_TABLE`."""
    out.write_text(json.dumps({"machine": {"kernels": {"float32/expert": LINEAR_TABLE, "q4/expert": LINEAR_TABLE}}}))
    return out


def write_mixed_layouts(model_dir: Path, ref: Path, n: int, out: Path, split: bool = True, linear: bool = False) -> Path:
    """A layouts file: per MoE layer, experts 0 and 1 split (if ``split``), expert 2
    on every rank, the rest one owner each, round robin shifted by the layer; with
    ``linear``, every expert not split is on every rank and rows are priced by
    :data:`LINEAR_TABLE`, so that the rows of copies get shared."""
    from moe_mpi.layout import Layout, layouts_to_json
    from moe_mpi.rowcost import RowCost

    price = RowCost.from_profile({"machine": {"kernels": {"float32/expert": LINEAR_TABLE}}}, "float32") if linear else None

    config = json.loads((model_dir / "config.json").read_text())
    flat = dict(config, **(config.get("ffn_config") or {}))
    experts = next(flat[k] for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts") if flat.get(k))
    layouts = []
    for layer in range(int(np.load(ref)["moe_layers"])):
        holders = [() if split else (layer % n,), () if split else ((layer + 1) % n,), tuple(range(n))]
        holders += [tuple(range(n)) if linear else ((e + layer) % n,) for e in range(3, experts)]
        layouts.append(Layout(n, tuple(holders), price))
    layouts_to_json(layouts, str(out))
    return out


def write_skewed_stats(model_dir: Path, ref: Path, out: Path) -> Path:
    """Router statistics with :data:`BALANCE_SHARES` per MoE layer (drawn tokens, seeded)."""
    from moe_mpi.balance import draw_routing
    from moe_mpi.routing import RoutingStats

    config = json.loads((model_dir / "config.json").read_text())
    flat = dict(config, **(config.get("ffn_config") or {}))
    experts = next(flat[k] for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts") if flat.get(k))
    k = next(flat[k] for k in ("num_experts_per_tok", "moe_top_k") if flat.get(k))
    assert experts == len(BALANCE_SHARES), experts
    layers = int(np.load(ref)["moe_layers"])
    stats = RoutingStats([experts] * layers)
    rng = np.random.default_rng(0)
    for layer in range(layers):
        stats(layer, draw_routing(np.array(BALANCE_SHARES), k, 2000, 1, rng)[0])
    stats.save(str(out))
    return out


@pytest.fixture(scope="session")
def arch_checkpoints(tmp_path_factory):
    """Writes (once per session) each arch's checkpoints and references."""
    made = {}

    def get(arch: str) -> dict:
        if arch not in made:
            root = tmp_path_factory.mktemp(arch)
            files = {}
            for name, (kwargs, _, _) in VARIANTS.items():
                if name == "fp32-shard_experts":  # same files as "fp32"
                    files[name] = files["fp32"]
                    continue
                path = synthetic.write_checkpoint(root / name, arch, seed=1, **kwargs)
                files[name] = (path, write_reference(path, root / f"{name}.npz"))
            wide = synthetic.tiny_config(arch, moe_intermediate_size=BALANCE_WIDTH)
            path = synthetic.write_checkpoint(root / "fp32-wide", wide, seed=1)
            files["fp32-wide"] = (path, write_reference(path, root / "fp32-wide.npz"))
            made[arch] = files
        return made[arch]

    return get


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("arch", synthetic.ARCHITECTURES)
def test_sharded_matches_mlx_lm(arch, n, arch_checkpoints, tmp_path):
    files = arch_checkpoints(arch)
    cases = []
    for name, (_, mode, placement) in VARIANTS.items():
        path, ref = files[name]
        cases.append(
            dict(name=f"{arch}/{name}", model=str(path), reference=str(ref), mode=mode, placement=placement)
        )
    if n > 1:  # the other modes give the same results
        # (4-bit sliced needs whole 32-groups per rank: 64 units, 2 ranks.)
        others = [("fp32", "central"), ("q4", "central"), ("fp32", "sliced"), ("fp32-per-expert", "sliced")]
        others += [("q4", "sliced")] if n == 2 else []
        for name, parallel in others:
            path, ref = files[name]
            cases.append(
                dict(name=f"{arch}/{name}-{parallel}", model=str(path), reference=str(ref),
                     mode="load", placement=None, parallel=parallel)
            )
    # MLX's own all-reduce, left in the lazy graph; with every expert split no
    # forward pass reads the routing back, so the whole pass is one graph.
    lazy = [("fp32", "sliced", n > 1), ("q4", "ep", False)] + ([("q4", "sliced", True)] if n == 2 else [])
    for name, parallel, expect_lazy in lazy:
        path, ref = files[name]
        cases.append(dict(name=f"{arch}/{name}-{parallel}-mlx", model=str(path), reference=str(ref), mode="load",
                          placement=None, parallel=parallel, backend="mlx", expect_lazy=expect_lazy))
    if n > 1:  # layouts per layer: split, replicated and single-owner experts mixed (mode="auto")
        for name in ("fp32", "fp32-per-expert", "q4"):
            path, ref = files[name]
            layouts = write_mixed_layouts(path, ref, n, tmp_path / f"{name}-layouts.json", split=name != "q4" or n == 2)
            cases.append(dict(name=f"{arch}/{name}-auto-layouts", model=str(path), reference=str(ref),
                              mode="load", placement=None, parallel="auto", layouts=str(layouts)))
            cases.append(dict(name=f"{arch}/{name}-auto", model=str(path), reference=str(ref),
                              mode="load", placement=None, parallel="auto"))
            # The same, expert 2's rows shared among its holders (a row price in the layouts file).
            shared = write_mixed_layouts(path, ref, n, tmp_path / f"{name}-layouts-shared.json",
                                         split=name != "q4" or n == 2, linear=True)
            cases.append(dict(name=f"{arch}/{name}-auto-layouts-shared", model=str(path), reference=str(ref),
                              mode="load", placement=None, parallel="auto", layouts=str(shared), expect_shared=True))
        # The optimizer with each --balance choice, from skewed statistics, with room for copies.
        path, ref = files["fp32-wide"]
        stats = write_skewed_stats(path, ref, tmp_path / "stats-skewed.json")
        for choice, expect in BALANCE_EXPECT.items():
            cases.append(dict(name=f"{arch}/fp32-wide-auto-{choice}", model=str(path), reference=str(ref),
                              mode="load", placement=None, parallel="auto", stats=str(stats), replicas=2,
                              balance=choice, expect=expect))
        # Copies chosen with a profile's row price (whether a call shares their rows depends on the
        # routing of each architecture: the "-layouts-shared" cases above make sure some do).
        cases.append(dict(name=f"{arch}/fp32-wide-auto-replicate-profile", model=str(path), reference=str(ref),
                          mode="load", placement=None, parallel="auto", stats=str(stats), replicas=2,
                          balance="replicate", profile=str(write_linear_profile(tmp_path / "calib.json")),
                          expect=BALANCE_EXPECT["replicate"]))
    if n in WEIGHTS:
        path, ref = files["fp32"]
        cases.append(
            dict(name=f"{arch}/fp32-weights{WEIGHTS[n]}", model=str(path), reference=str(ref),
                 mode="load", placement=None, weights=WEIGHTS[n])
        )
    if arch not in ATTENTION_REFUSED:  # the attention split by heads too, with each kind of expert layout
        # (4-bit: heads of 16 columns, quantization groups of 32: whole groups on 1 and 2 ranks only.)
        heads = [("fp32", "ep", "load"), ("fp32", "ep", "shard")]
        heads += [("fp32-per-expert", "sliced", "load")] if n > 1 else []
        heads += [("q4", "auto", "load")] if n < 3 else []
        for name, parallel, how in heads:
            path, ref = files[name]
            cases.append(dict(name=f"{arch}/{name}-{parallel}-heads-{how}", model=str(path), reference=str(ref),
                              mode=how, placement=None, parallel=parallel, attention="split"))
        if n in WEIGHTS:
            path, ref = files["fp32"]
            cases.append(dict(name=f"{arch}/fp32-heads-weights{WEIGHTS[n]}", model=str(path), reference=str(ref),
                              mode="load", placement=None, weights=WEIGHTS[n], attention="split"))
    # The LM head split by vocabulary rows: one all-gather of the logits per call (every one of
    # these architectures has an LM head apart from its embedding; tied ones are in the generic test).
    vocab = [("fp32", "ep", {}), ("q4", "sliced" if n == 2 else "ep", {}), ("fp32", "sliced", dict(backend="mlx"))]
    vocab += [("fp32", "ep", dict(weights=WEIGHTS[n]))] if n in WEIGHTS else []
    vocab += [("fp32", "auto", dict(attention="split"))] if arch not in ATTENTION_REFUSED else []
    for name, parallel, extra in vocab:
        path, ref = files[name]
        tag = "".join(f"-{k}{v}" for k, v in extra.items())
        cases.append(dict(name=f"{arch}/{name}-{parallel}-vocab{tag}", model=str(path), reference=str(ref),
                          mode="load", placement=None, parallel=parallel, lm_head="split", **extra))
    run_cases(n, cases, tmp_path)


@pytest.mark.parametrize("n", [2, 3])
def test_generic_path_other_architectures(n, tmp_path_factory, tmp_path):
    """Architectures with no code in moe_mpi work through the generic path; those
    whose blocks cannot be split (refused in ep mode, tests/test_shard.py) run in
    central mode."""
    root = tmp_path_factory.getbasetemp() / "generic"
    configs = {**EXTRA_CONFIGS, **{arch: config for arch, (config, _) in REFUSED_CONFIGS.items()}}
    cases = []
    for arch, config in sorted(configs.items()):
        path = root / arch
        if not (root / f"{arch}.npz").exists():
            synthetic.write_checkpoint(path, config, seed=1)
            write_reference(path, root / f"{arch}.npz")
        parallel = "central" if arch in REFUSED_CONFIGS else "ep"
        cases.append(dict(name=f"{arch}/fp32-{parallel}", model=str(path), reference=str(root / f"{arch}.npz"),
                          mode="load", parallel=parallel))
        if parallel == "ep" and splits_attention(config, n):
            cases.append(dict(name=f"{arch}/fp32-ep-heads", model=str(path), reference=str(root / f"{arch}.npz"),
                              mode="load", parallel="ep", attention="split"))
        if parallel == "ep" and splits_lm_head(config):  # a head, or a tied embedding's as_linear (tests/test_vocab.py)
            cases.append(dict(name=f"{arch}/fp32-ep-vocab", model=str(path), reference=str(root / f"{arch}.npz"),
                              mode="load", parallel="ep", lm_head="split"))
    assert any("heads" in c["name"] for c in cases)  # the split attention of some of them is checked
    assert any("vocab" in c["name"] for c in cases)
    run_cases(n, cases, tmp_path)


def splits_lm_head(config: dict) -> bool:
    """Whether moe_mpi finds this architecture's LM head, or its tied embedding, to split (its own check)."""
    from types import SimpleNamespace

    from moe_mpi.vocab import split_lm_head

    model, _ = synthetic.build_model(config, seed=1)
    try:
        split_lm_head(model, SimpleNamespace(rank=0, size=2), config["model_type"])
    except ValueError:
        return False
    return True


def splits_attention(config: dict, n: int) -> bool:
    """Whether moe_mpi splits (some of) this architecture's attention over ``n`` ranks
    (its own check, in this process); those it refuses are tested in tests/test_attention.py."""
    from types import SimpleNamespace

    from moe_mpi.attention import split_attention

    model, _ = synthetic.build_model(config, seed=1)
    try:
        split_attention(model, SimpleNamespace(rank=0, size=n), config["model_type"])
    except ValueError:
        return False
    return True
