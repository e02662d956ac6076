"""llava_jax: LLaVA (CLIP vision tower -> projector -> LLaMA decoder) in JAX / Flax NNX.

Public entry points (imported lazily so that `import llava_jax.data` stays light):
    llava_jax.load_pretrained(path, dtype=...)  -> Pretrained(model, config, tokenizer, processor)
    llava_jax.generate(model, input_ids, ...)   -> new token ids
    llava_jax.GenerationConfig(max_new_tokens=...) the settings generate / stream take
"""

import importlib

from llava_jax import _moved

__version__ = "0.1.0"
_moved.install()  # old module paths (llava_jax.trainer, ...) keep working for one release

_LAZY = {
    "load_pretrained": ("llava_jax.checkpoint", "load_pretrained"),
    "Pretrained": ("llava_jax.checkpoint", "Pretrained"),
    "generate": ("llava_jax.inference.generation", "generate"),
    "GenerationConfig": ("llava_jax.inference.generation", "GenerationConfig"),
    "LlavaConfig": ("llava_jax.models.config", "LlavaConfig"),
    "LlavaModel": ("llava_jax.models.llava", "LlavaModel"),
}


def __getattr__(name):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'llava_jax' has no attribute {name!r}")
