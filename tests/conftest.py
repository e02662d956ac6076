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


@pytest.fixture(scope="session")
def tiny_demo_checkpoint(tmp_path_factory) -> str:
    """A saved random tiny LLaVA with the demo tokenizer (what chat and serve tests load)."""
    from llava_jax.checkpoint import save_model
    from llava_jax.data import demo
    from llava_jax.models.config import get_preset
    from llava_jax.models.llava import create_model

    tok = demo.load_tokenizer()
    config = get_preset("tiny", text={"vocab_size": len(tok)},
                        image_token_index=tok.convert_tokens_to_ids("<image>"),
                        pad_token_id=tok.pad_token_id)
    return str(save_model(create_model(config, seed=1), tmp_path_factory.mktemp("c") / "tiny",
                          tokenizer=tok))


def torch_module_state(tensors: dict, prefix_map: dict[str, str]) -> dict:
    """Canonical names -> names of a specific torch module, as torch tensors."""
    from llava_jax.convert.reference import torch_state

    return torch_state(tensors, prefix_map)


def hf_llava_from_model(model):
    """A transformers LlavaForConditionalGeneration (float32, eval) holding `model`'s weights."""
    from llava_jax.convert.reference import transformers_llava

    return transformers_llava(model)
