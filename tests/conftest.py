"""Shared fixtures: tiny HF checkpoints built once per session."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_hf_factory(tmp_path_factory):
    """tiny_hf_factory(family, **overrides) -> Path of a cached tiny random HF checkpoint."""
    from sage_megatron.testing.tiny_models import make_tiny_hf_model

    cache = {}

    def make(family: str, **overrides):
        key = (family, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf_{family}")
            cache[key] = make_tiny_hf_model(family, out, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def load_bench():
    """``load_bench(name)``: the module bench/<name>.py (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
