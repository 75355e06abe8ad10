"""Every MoE model file of the installed mlx-lm is covered by a test config.

docs/architectures.md says every mlx-lm model with a stacked expert layer runs
exactly through moe_mpi; this test keeps that claim true. A model file is MoE
if it uses ``SwitchGLU``/``SwitchMLP`` itself or imports from a file that does
(vision-language wrappers and new ModelArgs over an older model import the
older file's classes). A new mlx-lm release that adds one fails here until it
has a config in tests/configs.py.
"""

import re
from pathlib import Path

import mlx_lm.models
from mlx_lm.utils import MODEL_REMAPPING

from configs import EXTRA_CONFIGS, REFUSED_CONFIGS
from moe_mpi.synthetic import ARCHITECTURES

#: MoE model files that cannot be run here, and why (docs/architectures.md).
NOT_RUN = {"muse_spark": "its model calls Metal kernels: no reference on Linux CPU"}


def moe_model_files() -> set:
    """The mlx-lm model modules whose models hold a stacked expert layer."""
    folder = Path(mlx_lm.models.__file__).parent
    sources = {path.stem: path.read_text() for path in folder.glob("*.py")}
    moe = {name for name, text in sources.items() if re.search(r"\bSwitch(GLU|MLP)\b", text)}
    moe.discard("switch_layers")
    grew = True
    while grew:  # a file importing from an MoE file builds on its MoE classes
        grew = False
        for name, text in sources.items():
            if name not in moe and set(re.findall(r"from \.(\w+) import", text)) & moe:
                moe.add(name)
                grew = True
    return moe


def module_of(config: dict) -> str:
    """The mlx-lm module that loads a config (mlx_lm.utils remaps some model types)."""
    return MODEL_REMAPPING.get(config["model_type"], config["model_type"])


def test_every_moe_model_file_has_a_config():
    configured = {module_of(c) for c in EXTRA_CONFIGS.values()}
    configured |= {module_of(c) for c, _ in REFUSED_CONFIGS.values()}
    files = moe_model_files()
    assert {"mixtral", "qwen3_moe", "qwen3_5_moe", "kimi_vl"} <= files  # the scan finds direct and wrapped ones
    missing = sorted(files - configured - set(ARCHITECTURES) - set(NOT_RUN))
    assert not missing, f"mlx-lm MoE model files with no config in tests/configs.py: {missing}"
    # Every extra config names an MoE model file (dbrx, one of ARCHITECTURES, holds
    # a list of per-expert MLPs in mlx-lm, no stacked layer: it is not one).
    stale = sorted(configured - files)
    assert not stale, f"configs for modules that are not mlx-lm MoE model files: {stale}"
