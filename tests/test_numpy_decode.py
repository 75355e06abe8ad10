"""The numpy decode step (moe_mpi.cpu.decode) gives mlx-lm's logits, and only where it knows the code.

A tiny float32 checkpoint of each covered architecture (qwen3_moe with one
dense layer among the MoE ones, and mixtral) is written to disk;
single-process mlx-lm gives the reference logits of a scripted sequence of
calls on one KV cache; tests/mpi_numpy_decode.py replays it on 1, 2 and 3
ranks in both modes, under real ``mpirun``. Models the step was not written
for (other classes, RoPE scaling, other mlx-lm sources) keep mlx-lm's code.
"""

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import load as mlx_lm_load

from moe_mpi import Communicator, load, synthetic
from moe_mpi.cpu import decode
from moe_mpi.cpu.switches import numpy_kernels
from moe_mpi.launch import run_mpirun

HERE = Path(__file__).parent
BATCH = 3

pytestmark = pytest.mark.skipif(not numpy_kernels(), reason="the numpy decode step is CPU only")

# The architectures the numpy step covers, and their test checkpoints' shapes.
ARCHS = {"qwen3_moe": dict(num_hidden_layers=3, mlp_only_layers=[1]), "mixtral": dict(num_hidden_layers=2)}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    config = synthetic.tiny_config(request.param, **ARCHS[request.param])
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("numpy-decode") / "model", config, seed=5)


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """Inputs and mlx-lm's logits of: a prompt, 6 steps, a 2-token chunk, 4 steps."""
    model, _ = mlx_lm_load(str(checkpoint))
    rng = np.random.default_rng(1)
    vocab = model.args.vocab_size
    lengths = [7] + [1] * 6 + [2] + [1] * 4
    cache = make_prompt_cache(model)
    moe_layers = sum(any(isinstance(m, SwitchGLU) for _, m in layer.named_modules()) for layer in model.layers)
    arrays = {"moe_layers": np.array(moe_layers)}
    for i, n in enumerate(lengths):
        tokens = rng.integers(0, vocab, (BATCH, n)).astype(np.int32)
        arrays[f"in{i}"] = tokens
        arrays[f"out{i}"] = np.array(model(mx.array(tokens), cache=cache))
    out = tmp_path_factory.mktemp("numpy-decode-ref") / "ref.npz"
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("mode", ["ep", "sliced", "auto"])
def test_numpy_decode_matches_mlx_lm(checkpoint, reference, n, mode, tmp_path):
    argv = [sys.executable, "-m", "mpi4py", str(HERE / "mpi_numpy_decode.py"), str(checkpoint), str(reference), mode]
    if mode == "auto" and n > 1:  # split, replicated and single-owner experts in one layer
        from test_equivalence import write_mixed_layouts

        argv.append(str(write_mixed_layouts(checkpoint, reference, n, tmp_path / "layouts.json")))
    proc = run_mpirun(n, argv, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert proc.stdout.count("10 in numpy, match") == n, output


def _decode_logits(model, prompt, steps=3):
    cache = make_prompt_cache(model)
    out = [np.array(model(mx.array(prompt), cache=cache))]
    for t in range(steps):
        out.append(np.array(model(mx.array(prompt[:, t : t + 1]), cache=cache)))
    return out


def test_replaced_weights_are_seen(checkpoint):
    """After ``update`` the step reads the new weights, not views of the old ones."""
    model, _ = load(str(checkpoint), comm=Communicator())
    q0 = mx.random.normal(model.model.layers[0].self_attn.q_proj.weight.shape, key=mx.random.key(3))
    model.model.layers[0].self_attn.q_proj.update({"weight": q0})
    plain, _ = mlx_lm_load(str(checkpoint))
    plain.model.layers[0].self_attn.q_proj.update({"weight": q0})
    prompt = np.random.default_rng(2).integers(0, 64, (1, 5)).astype(np.int32)
    got, want = _decode_logits(model, prompt), _decode_logits(plain, prompt)
    assert model.cpu_path.numpy_steps == 3
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_mlx_lm_code_is_the_code_the_step_was_verified_against():
    """Fails loudly when mlx-lm's code under the numpy step changes.

    The step re-implements mlx-lm's attention, MoE block, decoder layer and
    KV cache update for each covered architecture. With other sources it
    keeps mlx-lm's code (safe, slower); this test makes the change visible.
    To take a new mlx-lm: run the exactness tests above against it, then add
    its fingerprints to ``moe_mpi.cpu.decode.VERIFIED``.
    """
    import mlx_lm

    for arch in decode.architectures():
        got = decode.fingerprint(arch)
        assert got in decode.VERIFIED[arch.name].values(), (
            f"mlx-lm {mlx_lm.__version__} changed the {arch.name} code the numpy decode step "
            f"re-implements (fingerprint {got}, verified: {decode.VERIFIED[arch.name]})"
        )


def test_off_switch_and_uncovered_models(checkpoint, tmp_path, monkeypatch):
    comm = Communicator()
    monkeypatch.setenv("MOE_MPI_NUMPY_DECODE", "0")
    model, _ = load(str(checkpoint), comm=comm)
    assert model.cpu_path.decode_step is None
    assert model.cpu_path.decode_step_off == "MOE_MPI_NUMPY_DECODE=0"
    monkeypatch.delenv("MOE_MPI_NUMPY_DECODE")
    bf16 = synthetic.write_checkpoint(tmp_path / "bf16", "qwen3_moe", dtype="bfloat16")
    model, _ = load(str(bf16), comm=comm)
    assert model.cpu_path.decode_step is None and "not float32" in model.cpu_path.decode_step_off
    olmoe = synthetic.write_checkpoint(tmp_path / "olmoe", "olmoe")
    model, _ = load(str(olmoe), comm=comm)
    assert model.cpu_path.decode_step is None
    assert model.cpu_path.decode_step_off == "model_type='olmoe' is not covered (qwen3_moe, mixtral)"
    model, _ = load(str(checkpoint), comm=comm, mode="central")
    assert model.cpu_path.decode_step is None and model.cpu_path.decode_step_off == "not an ep, sliced or auto shard"


def test_models_the_step_was_not_written_for_keep_mlx_lm_code(checkpoint, monkeypatch):
    """RoPE scaling, a sliding window, a RoPE subclass, a layer subclass, or
    other mlx-lm sources: the step is not installed, and the model (mlx-lm's
    code) still gives mlx-lm's logits."""
    comm = Communicator()
    plain, _ = mlx_lm_load(str(checkpoint))
    prompt = np.random.default_rng(4).integers(0, 64, (1, 4)).astype(np.int32)
    want = _decode_logits(plain, prompt)

    class ScaledRoPE(nn.RoPE):  # e.g. llama3 or yarn RoPE: other angles
        pass

    def rope_subclass(model):
        attn = model.layers[0].self_attn
        attn.rope = ScaledRoPE(attn.rope.dims, attn.rope.traditional, attn.rope.base)

    def layer_subclass(model):
        layer = model.layers[0]
        layer.__class__ = type("PatchedLayer", (type(layer),), {})

    def sliding_window(model):  # as in an mlx-lm whose args read it
        model.args.sliding_window = 64

    changes = {
        "rope_scaling": (dict(model_config={"rope_scaling": {"type": "linear", "factor": 2.0}}), None),
        "sliding_window": ({}, sliding_window),
        "ScaledRoPE": ({}, rope_subclass),
        "PatchedLayer": ({}, layer_subclass),
    }
    for expected, (kwargs, patch) in changes.items():
        model, _ = load(str(checkpoint), comm=comm, **kwargs)
        if patch is not None:
            patch(model)
        why = decode.unsupported(model)
        assert why is not None and expected in why, (expected, why)
    monkeypatch.setattr(decode, "VERIFIED", {"qwen3_moe": {}, "mixtral": {}})
    model, _ = load(str(checkpoint), comm=comm)
    assert model.cpu_path.decode_step is None and "verified against" in model.cpu_path.decode_step_off
    for a, b in zip(_decode_logits(model, prompt), want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
