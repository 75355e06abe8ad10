"""The fused CPU decode step (moe_mpi.fused) gives mlx-lm's logits.

A tiny float32 checkpoint of each covered architecture (qwen3_moe with one
dense layer among the MoE ones, and mixtral) is written to disk;
single-process mlx-lm gives the reference logits of a scripted sequence of
calls on one KV cache; tests/mpi_fused.py replays it on 1, 2 and 3 ranks in
both modes, under real ``mpirun``.
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import load as mlx_lm_load

from moe_mpi import Communicator, fused, load, synthetic
from moe_mpi.launch import run_mpirun

HERE = Path(__file__).parent
BATCH = 3


# The architectures the fused step covers, and their test checkpoints' shapes.
ARCHS = {"qwen3_moe": dict(num_hidden_layers=3, mlp_only_layers=[1]), "mixtral": dict(num_hidden_layers=2)}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    config = synthetic.tiny_config(request.param, **ARCHS[request.param])
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("fused") / "model", config, seed=5)


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
    out = tmp_path_factory.mktemp("fused-ref") / "ref.npz"
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("mode", ["ep", "sliced"])
def test_fused_decode_matches_mlx_lm(checkpoint, reference, n, mode):
    proc = run_mpirun(
        n,
        [sys.executable, "-m", "mpi4py", str(HERE / "mpi_fused.py"), str(checkpoint), str(reference), mode],
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert proc.stdout.count("10 fused, match") == n, output


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
    assert model.ep_fused_step.steps == 3
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_off_switch_and_uncovered_models(checkpoint, tmp_path, monkeypatch):
    comm = Communicator()
    monkeypatch.setenv("MOE_MPI_FUSED_DECODE", "0")
    model, _ = load(str(checkpoint), comm=comm)
    assert getattr(model, "ep_fused_step", None) is None
    assert fused.fused_unsupported(model) == "MOE_MPI_FUSED_DECODE=0"
    monkeypatch.delenv("MOE_MPI_FUSED_DECODE")
    bf16 = synthetic.write_checkpoint(tmp_path / "bf16", "qwen3_moe", dtype="bfloat16")
    model, _ = load(str(bf16), comm=comm)
    assert getattr(model, "ep_fused_step", None) is None
    assert "not float32" in fused.fused_unsupported(model)
    olmoe = synthetic.write_checkpoint(tmp_path / "olmoe", "olmoe")
    model, _ = load(str(olmoe), comm=comm)
    assert getattr(model, "ep_fused_step", None) is None
    assert fused.fused_unsupported(model) == "model_type='olmoe' is not covered (qwen3_moe, mixtral)"
    model, _ = load(str(checkpoint), comm=comm, mode="central")
    assert fused.fused_unsupported(model) == "not an ep or sliced shard, nor mlx-lm's tensor parallel"
