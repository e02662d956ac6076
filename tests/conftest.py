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
    import torch

    out = {}
    for name, value in tensors.items():
        for old, new in prefix_map.items():
            if name.startswith(old):
                out[new + name[len(old):]] = torch.from_numpy(np.array(value, np.float32))
                break
    return out


# transformers 5 module names for LlavaForConditionalGeneration.
HF_LLAVA_MODULE_NAMES = {
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
    "vision_tower.vision_model.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
}


def hf_llava_from_model(model):
    """A transformers LlavaForConditionalGeneration (float32, eval) holding `model`'s weights."""
    import torch
    import transformers

    from llava_jax.convert import hf_config, mapping

    config = transformers.LlavaConfig.from_dict(hf_config.to_hf_llava(model.config))
    torch.manual_seed(0)
    reference = transformers.LlavaForConditionalGeneration(config).float().eval()
    state = torch_module_state(mapping.torch_tensors(model), HF_LLAVA_MODULE_NAMES)
    missing, unexpected = reference.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")
               and not (m == "lm_head.weight" and model.config.text.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    return reference
