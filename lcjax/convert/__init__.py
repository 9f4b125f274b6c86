"""HF transformers <-> lcjax weight maps (in-memory tensors or safetensors; never unpickle)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np


def read_hf_dir(path: str, *, caller: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config.json as a dict, the merged state dict of every *.safetensors file)`` of a local HF checkpoint
    directory, read without unpickling. ``caller`` names the loader in the error for a directory without weights."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{caller}: no *.safetensors files in {path!r}")
    state_dict: dict[str, np.ndarray] = {}
    for file in files:
        state_dict.update(load_file(file))
    return config, state_dict
