"""transformers' PyTorch LLaVA holding a llava_jax model's weights (parity tests, benchmarks).

Needs the `torch` extra. Built in memory from `mapping.torch_tensors`, renamed to the module
names of transformers 5 (`LlavaForConditionalGeneration._checkpoint_conversion_mapping`).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from llava_jax.convert import hf_config, mapping

TRANSFORMERS_MODULE_PREFIXES = mapping.TRANSFORMERS_MODULE_PREFIXES


def torch_state(tensors: dict, prefixes: dict[str, str]) -> dict:
    """{canonical name: array} -> {module name: float32 torch tensor}, renamed by prefix.

    Names matching no prefix are dropped (e.g. the vision tower for a text-only module).
    """
    out = {}
    for name, value in tensors.items():
        for old, new in prefixes.items():
            if name.startswith(old):
                out[new + name[len(old):]] = torch.from_numpy(np.array(value, np.float32))
                break
    return out


def transformers_llava(model, *, attn_implementation: str | None = None, train: bool = False):
    """A float32 `LlavaForConditionalGeneration` (`LlavaNext...` / `LlavaOnevision...` for tiled
    models) with `model`'s weights (eval mode by default).

    Raises RuntimeError when a weight has no counterpart on either side.
    """
    hf = hf_config.to_hf_llava(model.config)
    config_class = {"llava": transformers.LlavaConfig, "llava_next": transformers.LlavaNextConfig,
                    "llava_onevision": transformers.LlavaOnevisionConfig}[hf["model_type"]]
    config = config_class.from_dict(hf)
    if attn_implementation is not None:
        config.text_config._attn_implementation = attn_implementation
        config.vision_config._attn_implementation = attn_implementation
    torch.manual_seed(0)  # the (overwritten) random init stays reproducible
    reference = getattr(transformers, hf["architectures"][0])(config).float()
    reference.train(train)
    state = torch_state(mapping.torch_tensors(model), TRANSFORMERS_MODULE_PREFIXES)
    missing, unexpected = reference.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")
               and not (m == "lm_head.weight" and model.config.text.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weight transfer failed: missing {missing}, unexpected {unexpected}")
    return reference
