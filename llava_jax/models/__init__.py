"""Pure model code (flax.nnx): CLIP vision tower, projector, LLaMA decoder, LlavaModel."""

from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig, get_preset, PRESETS
from llava_jax.models.llava import LlavaModel, abstract_model, count_params, create_model
