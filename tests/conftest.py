"""Shared fixtures: tiny configs, random models, transformers reference models."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = REPO_ROOT.parent / "shared" / "assets" / "llama2-tokenizer" / "tokenizer.json"


def pytest_configure(config):
    # grain worker processes read absl flags; tests never parse argv.
    from absl import flags

    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def llama_tokenizer_path():
    if not SHARED_TOKENIZER.exists():
        pytest.skip(f"{SHARED_TOKENIZER} not present (../shared is absent)")
    return SHARED_TOKENIZER


def torch_module_state(tensors: dict, prefix_map: dict[str, str]) -> dict:
    """Canonical names -> names of a specific torch module, as torch tensors."""
    from llava_jax.convert.reference import torch_state

    return torch_state(tensors, prefix_map)


def hf_llava_from_model(model):
    """A transformers LlavaForConditionalGeneration (float32, eval) holding `model`'s weights."""
    from llava_jax.convert.reference import transformers_llava

    return transformers_llava(model)
