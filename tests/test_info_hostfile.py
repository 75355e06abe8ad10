"""``moe-mpi info`` and ``moe-mpi hostfile``.

info: its byte counts are checked against what a real ``load`` holds (param
nbytes and ``mx.get_active_memory()``), in this process for every
architecture and layout and under ``mpirun`` on 2 ranks; it must read no
tensor data (a 16 GiB sparse checkpoint is planned in seconds, with no bytes
read and nothing allocated) and never need mpirun; bad input gives one clean
error line and a non-zero exit.

hostfile: Open MPI <-> MPICH <-> mlx.launch JSON round trips, errors with
file and line, and every example in hostfiles/ is valid (and the JSON ones
are accepted by mlx's own hostfile parser).
"""

import gc
import json
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moe_mpi.loading import model_classes
from moe_mpi import hostfile, info, synthetic
from moe_mpi.memory import PlanningComm, plan_memory
from moe_mpi.launch import run_mpirun
from moe_mpi.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "hostfiles").glob("*"))

# name -> write_checkpoint arguments
CHECKPOINTS = {
    **{arch: (arch, {}) for arch in synthetic.ARCHITECTURES},
    "mixtral-per-expert": ("mixtral", dict(expert_format="per_expert")),
    "qwen2_moe-q4": ("qwen2_moe", dict(quantize=4)),
    "deepseek_v3-q8": ("deepseek_v3", dict(quantize=8)),
    "dbrx-q4-native": ("dbrx", dict(quantize=4, expert_format="native")),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            arch, kwargs = CHECKPOINTS[name]
            made[name] = synthetic.write_checkpoint(tmp_path_factory.mktemp(name) / name, arch, seed=1, **kwargs)
        return made[name]

    return get


def _sparse_checkpoint(path: Path, config: dict) -> Path:
    """A full-size checkpoint whose data is a hole: valid headers, no bytes on disk.

    Reading any tensor of it would take seconds per GiB and allocate as much.
    """
    path.mkdir(parents=True)
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))  # lazy: nothing allocated
    q = config["quantization"]
    nn.quantize(model, group_size=q["group_size"], bits=q["bits"])
    header, offset = {}, 0
    for key, a in tree_flatten(model.parameters()):
        dtype, size = ("U32", 4) if a.dtype == mx.uint32 else ("BF16", 2)
        header[key] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.size * size]}
        offset += a.size * size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    (path / "config.json").write_text(json.dumps(config))
    return path


# Qwen3-30B-A3B's shapes, 4-bit: a 16 GiB checkpoint.
QWEN3_30B = {
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 40960, "tie_word_embeddings": False,
    "quantization": {"group_size": 64, "bits": 4},
}


def _info(*args: str) -> subprocess.CompletedProcess:
    """``moe-mpi info`` as a plain process: no mpirun, no MPI environment."""
    return subprocess.run(
        [sys.executable, "-m", "moe_mpi.info", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


# ---------------------------------------------------------------------------
# info: numbers
# ---------------------------------------------------------------------------


@pytest.fixture
def no_buffer_cache():
    """MLX reuses freed buffers up to twice the size asked for; without its
    cache, active memory is exactly the bytes of the live arrays."""
    previous = mx.set_cache_limit(0)
    yield
    mx.set_cache_limit(previous)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_info_weights_are_what_load_holds(name, checkpoints, no_buffer_cache):
    path = checkpoints(name)
    for n in (1, 2, 3):
        plan = plan_memory(path, n, placement="round-robin" if n == 3 else None)
        assert [r.rank for r in plan.ranks] == list(range(n))
        for rank in range(n):
            gc.collect()
            mx.clear_cache()
            before = mx.get_active_memory()
            # The real loader, as rank `rank` of `n` (it only reads comm.rank/size).
            model, _ = load_model(path, PlanningComm(rank, n), "round-robin" if n == 3 else None)
            active = mx.get_active_memory() - before
            held = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
            r = plan.ranks[rank]
            assert held == r.weight_bytes, (name, n, rank)
            # Nothing else of note stays allocated (at most tiny buffers).
            assert 0 <= active - r.weight_bytes <= 1024, (name, n, rank, active, r.weight_bytes)
            del model
        if n > 1:
            # Experts are split, not copied; the replicated part is on every rank.
            assert len({r.replicated_bytes for r in plan.ranks}) == 1
            single = plan_memory(path, 1).ranks[0]
            assert sum(r.expert_bytes for r in plan.ranks) == single.expert_bytes
            assert sum(r.shared_expert_bytes for r in plan.ranks) == single.shared_expert_bytes


RANK_CHECK = r"""
import gc, json, sys
import mlx.core as mx
from mlx.utils import tree_flatten
from moe_mpi import Communicator, load
comm = Communicator()
mx.set_cache_limit(0)  # active memory = live arrays exactly (no reused larger buffers)
gc.collect(); mx.clear_cache(); mx.reset_peak_memory()
before = mx.get_active_memory()
model, _ = load(sys.argv[1], comm=comm, weights=json.loads(sys.argv[2]))
report = dict(
    rank=comm.rank,
    held=sum(a.nbytes for _, a in tree_flatten(model.parameters())),
    active=mx.get_active_memory() - before,
    peak=mx.get_peak_memory() - before,
)
reports = comm.allgather(report)
if comm.rank == 0:
    print("REPORT " + json.dumps(reports), flush=True)
"""


def test_info_matches_a_real_load_on_two_ranks(checkpoints):
    path = checkpoints("qwen2_moe")  # routed and shared experts
    weights = [3, 1]
    plan = plan_memory(path, 2, weights=weights)
    proc = run_mpirun(2, [sys.executable, "-c", RANK_CHECK, str(path), json.dumps(weights)], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    reports = json.loads(line[len("REPORT "):])
    assert plan.ranks[0].expert_bytes == 3 * plan.ranks[1].expert_bytes  # weights 3:1 of 8 experts
    for got, want in zip(reports, plan.ranks):
        assert got["held"] == want.weight_bytes
        assert 0 <= got["active"] - want.weight_bytes <= 1024, (got, want)
        # Loading never needs more than the weights plus one read buffer.
        assert got["peak"] <= want.weight_bytes + want.load_buffer_bytes + 4096, (got, want)


def test_info_kv_cache_estimate_matches_mlx_lm(checkpoints):
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load as mlx_lm_load

    for name in ("qwen3_moe", "deepseek_v3", "dbrx", "qwen2_moe-q4"):
        path = checkpoints(name)
        model, _ = mlx_lm_load(str(path))
        cache = make_prompt_cache(model)
        mx.eval(model(mx.arange(5)[None], cache=cache))
        # KVCache holds its K/V in buffers of `step` tokens; bytes per token:
        per_token = sum(
            a.nbytes // c.keys.shape[2] for c in cache for _, a in tree_flatten(c.state) if isinstance(a, mx.array)
        )
        plan = plan_memory(path, 2, context=300)
        assert plan.kv_bytes_per_token == per_token, name
        assert plan.ranks[0].kv_cache_bytes == per_token * 512  # 300 tokens take two 256-token steps


def test_info_with_the_attention_split_is_what_load_holds(checkpoints, no_buffer_cache):
    """--attention split: each rank's weights as a real load's, and its heads' share of the KV cache."""
    path = checkpoints("qwen3_moe")  # 4 query heads, 2 key/value heads
    whole = plan_memory(path, 3, context=300)
    plan = plan_memory(path, 3, context=300, attention="split")
    assert "attention split by heads" in plan.placement_strategy
    for rank, r in enumerate(plan.ranks):
        model, _ = load_model(path, PlanningComm(rank, 3), attention="split")
        assert sum(a.nbytes for _, a in tree_flatten(model.parameters())) == r.weight_bytes
        assert r.replicated_bytes < whole.ranks[rank].replicated_bytes  # its heads only
        # 3 ranks share 2 key/value heads: ranks 0 and 1 hold head 0, rank 2 head 1.
        assert r.kv_cache_bytes == whole.ranks[rank].kv_cache_bytes // 2
        assert [layer.self_attn.n_kv_heads for layer in model.layers] == [1] * len(model.layers)
        del model


def test_info_reads_no_tensor_data(tmp_path, checkpoints):
    path = _sparse_checkpoint(tmp_path / "qwen3-30b", QWEN3_30B)
    plan_memory(checkpoints("qwen3_moe"), 2)  # imports done, so they are not counted

    def read_bytes() -> int:
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(io["rchar"])

    gc.collect()
    active, read = mx.get_active_memory(), read_bytes()
    mx.reset_peak_memory()
    plan = plan_memory(path, 4)
    read = read_bytes() - read
    assert read < 4 << 20, f"read {read} bytes"  # config and headers only (the header is ~80 KB)
    assert mx.get_active_memory() == active and mx.get_peak_memory() <= active + (1 << 20)

    assert plan.checkpoint_bytes > 15 << 30  # 16 GB
    experts = sum(r.expert_bytes for r in plan.ranks)
    replicated = plan.ranks[0].replicated_bytes
    assert experts + replicated == plan.checkpoint_bytes  # every tensor is counted once
    assert all(r.expert_bytes == experts // 4 for r in plan.ranks)
    assert plan.num_moe_layers == 48 and plan.num_experts == (128,) and plan.top_k == 8
    assert plan.kv_bytes_per_token == 48 * 2 * 4 * 128 * 2  # layers x K,V x heads x dims x bf16


# ---------------------------------------------------------------------------
# info: CLI
# ---------------------------------------------------------------------------


def test_info_cli_without_mpirun(checkpoints, capsys):
    path = checkpoints("qwen3_moe")
    proc = _info("--model", str(path), "--np", "3", "--weights", "2,1,1", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["num_ranks"] == 3 and data["model_type"] == "qwen3_moe"
    assert data["placements"] == [{"num_experts": 8, "experts_per_rank": [[0, 1, 2, 3], [4, 5], [6, 7]]}]
    assert [r["num_experts"] for r in data["ranks"]] == [4, 2, 2]
    plan = plan_memory(path, 3, weights=[2, 1, 1])
    assert [r["weight_bytes"] for r in data["ranks"]] == [r.weight_bytes for r in plan.ranks]
    for r in data["ranks"]:
        assert r["peak_bytes"] >= r["weight_bytes"] + r["kv_cache_bytes"]

    # The same entry point in this process (subprocesses are slow: mlx-lm imports).
    info.main(["--model", str(path), "--np", "2", "--placement", "round-robin"])
    out = capsys.readouterr().out
    assert "qwen3_moe" in out and "2, of which 2 MoE" in out and "top-2" in out
    assert "rank 0: 4 experts: 0, 2, 4, 6" in out and "rank 1: 4 experts: 1, 3, 5, 7" in out
    assert "KV cache" in out and "per token" in out and "Activations: one 2048-token" in out


def test_info_takes_ranks_from_a_hostfile(checkpoints, capsys):
    info.main(["--model", str(checkpoints("qwen3_moe")), "--hostfile", str(ROOT / "hostfiles/4-macs.openmpi"), "--json"])
    assert json.loads(capsys.readouterr().out)["num_ranks"] == 4


def test_local_commands_under_mpirun_answer_once(checkpoints, tmp_path):
    """info, hostfile and plan need no mpirun; a user who starts them under
    one anyway gets the answer once (rank 0), not once per rank."""
    model, out = checkpoints("qwen3_moe"), tmp_path / "layouts.json"
    script = " && ".join([
        f"{sys.executable} -m moe_mpi info --model {model} --np 2 --write-layouts {out}",
        f"{sys.executable} -m moe_mpi hostfile check {ROOT / 'hostfiles/2-macs.openmpi'}",
        f"{sys.executable} -m moe_mpi plan --model tiny --machines m2-ultra-192:2 --link 10gbe --modes ep",
    ])
    proc = run_mpirun(2, ["sh", "-c", script], timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("Model: ") == 1 and proc.stdout.count("rank 1: 4 experts") == 1, proc.stdout
    assert proc.stdout.count("2 hosts, 2 slots") == 1 and proc.stdout.count("# moe-mpi plan: tiny") == 1, proc.stdout
    assert json.loads(out.read_text())


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    config = synthetic.tiny_config("qwen3_moe", mlp_only_layers=[0, 1])  # every layer dense
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("dense") / "dense", config, tokenizer=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model", "--np", "2"], "does not exist"),
        (["--model", "{dense}", "--np", "2"], "no MoE block"),
        (["--model", "{moe}", "--np", "9"], "num_experts=8 is less than num_ranks=9"),
        (["--model", "{moe}", "--np", "3", "--weights", "2,1"], "got 2 weights for num_ranks=3"),
        (["--model", "{moe}", "--np", "2", "--placement", "nonsense"], "unknown placement strategy"),
        (["--model", "{moe}", "--np", "0"], "--np must be at least 1"),
        (["--model", "{empty}", "--np", "2"], "has no config.json"),
        (["--model", "{moe}", "--hostfile", "{badhosts}"], ":1: slots must be a positive integer"),
        (["--model", "{moe}", "--mode", "auto", "--profile", "{badhosts}"], "bad.hosts: not JSON"),
        # Each was a traceback (AttributeError, KeyError).
        (["--model", "{listconfig}"], "config.json must hold a JSON object, not a list"),
        (["--model", "{moe}", "--mode", "auto", "--stats", "{badstats}"], 'layer 0: expected "counts" (8 non-negative'),
        # Shapes that disagree with config.json or the header's own byte counts were read as given.
        (["--model", "{fewexperts}"], "has shape [4, 64, 64], so no position 7 on axis 0"),
        (["--model", "{badheader}"], "shape [8, 64, 63] of F32 needs 129024 bytes, its data_offsets give 131072"),
        (["--model", "{moe}", "--write-layouts", "{empty}"], "--write-layouts {empty} is a directory"),
        # Failed in every rank's router on the first token.
        (["--model", "{topk}"], "config.json: num_experts_per_tok=16 experts per token, but model.layers.0.mlp has num_experts=8"),
        (["--model", "{groups}"], "config.json: topk_group=8 must be 1..n_group=4"),
    ],
)
def test_info_bad_input_is_one_clean_line(args, message, checkpoints, dense_checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.hosts").write_text("a slots=0\n")
    (tmp_path / "listconfig").mkdir()
    (tmp_path / "listconfig" / "config.json").write_text("[1]")
    (tmp_path / "stats.json").write_text(json.dumps(
        {"format": "moe_mpi.routing", "version": 1, "layers": [{"num_experts": 8}, {"num_experts": 8}]}
    ))
    gate = "model.layers.1.mlp.switch_mlp.gate_proj.weight"
    fill = dict(
        moe=checkpoints("qwen3_moe"), dense=dense_checkpoint, empty=tmp_path / "empty", badhosts=tmp_path / "bad.hosts",
        listconfig=tmp_path / "listconfig", badstats=tmp_path / "stats.json",
        fewexperts=_broken_copy(checkpoints("qwen3_moe"), tmp_path / "few", lambda h: h[gate].update(
            shape=[4, 64, 64], data_offsets=[h[gate]["data_offsets"][0], h[gate]["data_offsets"][0] + 4 * 64 * 64 * 4]
        )),
        badheader=_broken_copy(checkpoints("qwen3_moe"), tmp_path / "header", lambda h: h[gate].update(shape=[8, 64, 63])),
        topk=_changed_config(checkpoints("qwen3_moe"), tmp_path / "topk", num_experts_per_tok=16),
        groups=_changed_config(checkpoints("deepseek_v3"), tmp_path / "groups", topk_group=8),
    )
    message = message.format(**fill)
    with pytest.raises(SystemExit) as e:
        info.main([a.format(**fill) for a in args])
    assert e.value.code == 1
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and out.err.startswith("moe-mpi: error: "), out.err
    assert message in out.err and out.out == ""


def _broken_copy(src: Path, dst: Path, change) -> Path:
    """A copy of checkpoint ``src`` whose model.safetensors header is ``change``d (the data stays)."""
    import shutil

    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    return dst


def _changed_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint ``src`` with ``changes`` in its config.json."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(config, **changes)))
    return dst


def test_info_error_exit_status_as_a_process():
    proc = _info("--model", "/nonexistent/model")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "moe-mpi: error: model path '/nonexistent/model' does not exist\n"


# ---------------------------------------------------------------------------
# hostfile
# ---------------------------------------------------------------------------


def _hosts(hf: hostfile.Hostfile):
    return [(e.host, e.slots or 1, e.user) for e in hf.entries]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_hostfiles_are_valid(path, capsys):
    hostfile.main(["check", str(path)])  # exits non-zero on any error
    out = capsys.readouterr()
    assert out.out.strip().endswith("OK") and "warning" not in out.err
    hf = hostfile.read(path)
    n = int(path.name.split("-")[0])
    assert hf.format == {".openmpi": "openmpi", ".mpich": "mpich", ".json": "json"}[path.suffix]
    assert hf.total_slots == n and len(hf.entries) == n
    # All formats of one example describe the same Macs.
    assert _hosts(hf) == _hosts(hostfile.read(path.with_suffix(".openmpi")))


@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.suffix == ".json"], ids=lambda p: p.name)
def test_json_examples_are_what_mlx_launch_reads(path):
    from mlx._distributed_utils.common import Hostfile as MLXHostfile

    ours = hostfile.read(path)
    theirs = MLXHostfile.from_file(str(path))
    assert theirs.backend == "mpi"
    assert [h.ssh_hostname for h in theirs.hosts] == ours.ranks()
    assert [h.ips for h in theirs.hosts] == [list(e.ips) for e in ours.entries]


OMPI = """\
# my cluster
# two Macs

# the big one
mac1.local slots=2 max_slots=4
bob@10.0.0.2 slots=1   # the small one
10.0.0.3 slots=3
"""


def test_round_trips_between_all_formats():
    start = hostfile.parse(OMPI, source="cluster")
    assert start.format == "openmpi" and start.header == ("my cluster", "two Macs")
    assert _hosts(start) == [("mac1.local", 2, None), ("10.0.0.2", 1, "bob"), ("10.0.0.3", 3, None)]
    assert start.ranks() == ["mac1.local"] * 2 + ["10.0.0.2"] + ["10.0.0.3"] * 3
    for path in (["mpich", "json", "openmpi"], ["json", "mpich", "openmpi"], ["json", "json", "mpich", "mpich"]):
        hf = start
        for fmt in path:
            text = hostfile.dumps(hf, fmt)
            hf = hostfile.parse(text)  # the format is detected
            assert hf.format == fmt
            assert _hosts(hf) == _hosts(start), (path, text)
    mpich = hostfile.dumps(start, "mpich")
    assert "mac1.local:2\n" in mpich and "10.0.0.2:1 user=bob\n" in mpich
    assert "# the big one\nmac1.local:2" in mpich and "# the small one\n10.0.0.2" in mpich  # comments kept
    data = json.loads(hostfile.dumps(start, "json"))
    assert data["backend"] == "mpi"
    assert [h["ssh"] for h in data["hosts"]] == ["mac1.local", "mac1.local", "bob@10.0.0.2"] + ["10.0.0.3"] * 3
    assert data["hosts"][0]["ips"] == [] and data["hosts"][2]["ips"] == ["10.0.0.2"]


def test_json_list_form_and_mlx_ips():
    text = '[{"ssh": "m1", "ips": ["169.254.1.1"]},\n {"ssh": "m2", "ips": ["169.254.1.2"]},\n {"ssh": "m1"}]'
    hf = hostfile.parse(text)
    assert _hosts(hf) == [("m1", 2, None), ("m2", 1, None)]
    assert hf.entries[0].ips == ("169.254.1.1",)
    assert any("rank order" in w for w in hf.warnings)  # m1 comes back after m2
    assert hostfile.dumps(hf, "openmpi") == "m1 slots=2\nm2 slots=1\n"


def test_convert_cli(tmp_path, capsys):
    src = tmp_path / "c.openmpi"
    src.write_text(OMPI)
    hostfile.main(["convert", str(src), str(tmp_path / "c.json")])
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'c.json'}: mlx.launch JSON hostfile, 3 hosts, 6 slots")
    assert hostfile.read(tmp_path / "c.json").total_slots == 6
    hostfile.main(["convert", str(tmp_path / "c.json"), "-", "--to", "mpich"])
    out = capsys.readouterr()
    assert out.out.splitlines() == ["mac1.local:2", "10.0.0.2:1 user=bob", "10.0.0.3:3"]
    assert "max_slots" not in out.err  # JSON had already dropped it, with a warning then
    hostfile.main(["convert", str(src), "-", "--to", "mpich"])
    assert "max_slots=4 has no MPICH equivalent" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        hostfile.main(["convert", str(src), str(tmp_path / "out.txt")])
    assert e.value.code == 1 and "pass --to" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, where, message",
    [
        ("a slots=2\nb slots=0\n", ":2:", "slots must be a positive integer, got 0"),
        ("a slots=2\n\nb slots=two\n", ":3:", "slots must be a positive integer, got 'two'"),
        ("a slots=1\nb slotz=1\n", ":2:", "unknown key 'slotz'"),
        ("a slots=1 4\n", ":1:", "unexpected '4'"),
        ("# c\na slots=1\nb slots=1\nA slots=2\n", ":4:", "duplicate host 'A' (first on line 2)"),
        ("a slots=4 max_slots=2\n", ":1:", "max_slots=2 is less than slots=4"),
        ("a:2\nb:0\n", ":2:", "must be a positive integer, got 0"),
        ("a:2\nb:x\n", ":2:", "must be a positive integer, got 'x'"),
        ("a:2\nb:1 colour=red\n", ":2:", "unexpected 'colour=red'"),
        ("a:1\na:1\n", ":2:", "duplicate host 'a' (first on line 1)"),
        ("a:2\nb slots=2\n", ":", "line 1 uses MPICH syntax (host:N or user=) but line 2 uses Open MPI syntax"),
        ("bad_host! slots=1\n", ":1:", "invalid host name 'bad_host!'"),
        ("", ":", "no hosts"),
        ("# only\n# comments\n\n", ":", "no hosts"),
        ('[{"ssh": "a"},\n {"ssh": "b",}]', ":2:", "invalid JSON"),
        ('{"hosts": [\n  {"ssh": "a"},\n  {"ips": ["1.2.3.4"]}\n]}', ":3:", "needs an \"ssh\" host name"),
        ('[\n {"ssh": "a", "ips": ["mac.local"]}\n]', ":2:", "not an IP address"),
        ('{"hosts": []}', ":", "no hosts"),
        ('{"host": [{"ssh": "a"}]}', ":1:", "unknown keys ['host']"),
    ],
)
def test_check_errors_name_file_and_line(text, where, message, tmp_path, capsys):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        hostfile.main(["check", str(path)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moe-mpi: error: "), err
    assert f"{path}{where}" in err and message in err, err


def test_check_format_overrides_and_hints(tmp_path):
    with pytest.raises(hostfile.HostfileError, match=r":1: 'a:2' is MPICH syntax; .* write 'a slots=2'"):
        hostfile.parse("a:2\n", "openmpi", source="f")
    ipv6 = hostfile.parse("fe80::1 slots=2\n")  # fine for Open MPI and JSON, not for MPICH
    assert ipv6.ranks() == ["fe80::1"] * 2 and "fe80::1" in hostfile.dumps(ipv6, "json")
    with pytest.raises(hostfile.HostfileError, match=r"cannot hold IPv6"):
        hostfile.dumps(ipv6, "mpich")
    hf = hostfile.parse("a\nb\n")  # bare names: read as Open MPI, with a warning about slots
    assert hf.format == "openmpi" and hf.total_slots == 2 and "one slot per CPU core" in hf.warnings[0]
    with pytest.raises(hostfile.HostfileError, match="no such file"):
        hostfile.read(tmp_path / "missing")


def test_info_shows_the_expected_load_before_and_after(tmp_path):
    """moe-mpi info --mode auto --stats: the layouts chosen, and per layer the
    busiest rank's expected share against plain ep's, from the statistics."""
    from moe_mpi.routing import RoutingStats

    path = synthetic.write_checkpoint(tmp_path / "m", "qwen3_moe", seed=0)
    stats = RoutingStats([8, 8])
    for layer in range(2):
        stats(layer, np.array([[0, 1]] * 40 + [[2, 5]] * 4))  # experts 0 and 1: most of the slots
    stats.save(tmp_path / "stats.json")
    out = tmp_path / "layouts.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moe_mpi", "info", "--model", str(path), "--np", "2", "--mode", "auto",
         "--stats", str(tmp_path / "stats.json"), "--write-layouts", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Expected load at 8 tokens per step, from the router statistics" in proc.stdout, proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 4]
    assert len(rows) == 2 and all(float(r[2]) < float(r[1]) for r in rows), proc.stdout  # better than plain ep
    assert json.loads(out.read_text())["format"] == "moe_mpi.layouts"
    # --balance replicate copies the hot experts (within --replicas) and splits none.
    proc = subprocess.run(
        [sys.executable, "-m", "moe_mpi", "info", "--model", str(path), "--np", "2", "--mode", "auto",
         "--stats", str(tmp_path / "stats.json"), "--balance", "replicate", "--replicas", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mode auto, balance replicate, replicas 1, by router statistics" in proc.stdout, proc.stdout
    # (one copy: its rows are shared between the two holders, so a second does not pay)
    assert "whole per rank 4/5, replicated 1, split 0" in proc.stdout, proc.stdout
    # Copies' rows are shared by the price of rows: the default one here.
    assert "row price default: 2 / 16 / 128 rows cost 1.06 / 1.88 / 8.5x one row" in proc.stdout, proc.stdout
    # --profile: the price of rows measured by calibrate, shown, and kept in the layouts written.
    table = {"rows": [1, 2, 16], "seconds_per_byte": [1.0, 1.25, 6.0]}
    (tmp_path / "calib.json").write_text(json.dumps({"machine": {"kernels": {"float32/expert": table}}}))
    proc = subprocess.run(
        [sys.executable, "-m", "moe_mpi", "info", "--model", str(path), "--np", "2", "--mode", "auto",
         "--stats", str(tmp_path / "stats.json"), "--balance", "replicate", "--replicas", "1",
         "--profile", str(tmp_path / "calib.json"), "--write-layouts", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "row price calibrate float32/expert: 2 / 16 / 128 rows cost 1.25 / 6.00 / 44.0x one row" in proc.stdout, proc.stdout
    assert all(layer["row_cost"]["work"] == [1.0, 1.25, 6.0] for layer in json.loads(out.read_text())["layers"])
    bad = subprocess.run(
        [sys.executable, "-m", "moe_mpi", "info", "--model", str(path), "--mode", "auto", "--balance", "copy"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "--balance: invalid choice: 'copy'" in bad.stderr, bad.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "moe_mpi", "info", "--model", str(path), "--stats", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "not a moe_mpi routing statistics file" in bad.stderr, bad.stderr
