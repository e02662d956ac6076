"""Checkpoint conversion between PyTorch LLaVA formats and llava_jax model directories.

CLI: `python -m llava_jax.convert {hf-to-jax,llava-to-jax,jax-to-hf} ...`.
"""

from llava_jax.convert.core import hf_to_jax, jax_to_hf, llava_to_jax
from llava_jax.convert.tensors import CheckpointError

__all__ = ["hf_to_jax", "jax_to_hf", "llava_to_jax", "CheckpointError"]
