"""LlavaModel: CLIP or SigLIP features -> projector -> spliced into the token embeddings -> the
LLaMA-style decoder (Llama / Mistral / Qwen2).

Input convention (transformers' LLaVA): every image occupies `num_image_tokens`
consecutive positions holding `image_token_index` in `input_ids`. The k-th placeholder of
a row receives the k-th projected feature of that row's images, in image order. The merge
is a gather + where with static shapes, so it jits once per batch shape.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.config import LlavaConfig, jnp_dtype
from llava_jax.models.llama import LlamaModel
from llava_jax.models.partitioning import RESIDUAL, constrain
from llava_jax.models.projector import Projector
from llava_jax.models.siglip import SiglipVisionTower

Array = jax.Array


class LlavaModel(nnx.Module):
    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        self.config = config
        tower = (SiglipVisionTower if config.vision.model_type == "siglip_vision_model"
                 else CLIPVisionTower)
        self.vision_tower = tower(config, rngs=rngs)
        self.multi_modal_projector = Projector(config, rngs=rngs)
        self.language_model = LlamaModel(
            config.text, dtype=jnp_dtype(config.dtype), param_dtype=jnp_dtype(config.param_dtype),
            scan_layers=config.scan_layers, remat_policy=config.remat_policy,
            attention=config.attention, rngs=rngs)

    def image_features(self, pixel_values: Array) -> Array:
        """pixels [b, images, H, W, 3] -> projected features [b, images * tokens, hidden]."""
        batch, num_images = pixel_values.shape[:2]
        features = self.vision_tower(pixel_values.reshape(-1, *pixel_values.shape[2:]))
        features = self.multi_modal_projector(features)
        features = features.reshape(batch, num_images * features.shape[1], features.shape[-1])
        return constrain(features, RESIDUAL)

    def embed(self, input_ids: Array, pixel_values: Array | None = None,
              image_mask: Array | None = None) -> Array:
        """Token embeddings with image features written at the placeholder positions.

        Args:
          input_ids: int [b, s].
          pixel_values: float [b, images, H, W, 3] or None (text only).
          image_mask: bool [b, images], which image slots hold real images (default: all).
            Placeholder runs are matched to the real slots in slot order.
        Returns:
          [b, s, hidden] in the compute dtype.
        """
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values)  # [b, images * tokens, hidden]
        if image_mask is not None:
            # Move real image slots to the front (stable), so the k-th placeholder run meets
            # the k-th real image whatever the slot layout.
            order = jnp.argsort(~image_mask.astype(bool), axis=1, stable=True)
            tokens = self.config.num_image_tokens
            token_order = (order[:, :, None] * tokens + jnp.arange(tokens)).reshape(order.shape[0], -1)
            features = jnp.take_along_axis(features, token_order[:, :, None], axis=1)
        is_image = input_ids == self.config.image_token_index
        feature_index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
        gathered = jnp.take_along_axis(features, feature_index[:, :, None], axis=1)
        # Rows never mix: the gather and where stay on each row's devices.
        return constrain(jnp.where(is_image[:, :, None], gathered.astype(embeds.dtype), embeds),
                         RESIDUAL)

    def __call__(self, input_ids: Array, pixel_values: Array | None = None,
                 attention_mask: Array | None = None, *, segment_ids: Array | None = None,
                 positions: Array | None = None, image_mask: Array | None = None,
                 cache: dict | None = None, cache_index: Array | int | None = None,
                 return_hidden: bool = False, layers=None):
        """Logits for a batch of token ids with images.

        Args:
          input_ids: int32 [b, s], images as runs of `image_token_index`.
          pixel_values: float32 [b, images, H, W, 3], normalised, channels last; or None.
          attention_mask: [b, s] 1 for real tokens, 0 for padding (ignored if segment_ids).
          segment_ids: [b, s] packed-sample ids (0 = padding); attention stays in a segment.
          positions: [b, s] rotary positions; default 0..s-1 (or from cache_index).
          image_mask: bool [b, images], real image slots (default: all).
          cache, cache_index: KV cache from `init_cache` and the slot to write at.
          layers: per-layer decoder modules from `language_model.unstack_layers()` (with a
            cache from `language_model.unstack_cache`), or None for the stacked layers.
        Returns:
          float32 logits [b, s, vocab]; with a cache, (logits, new_cache).
        """
        batch, seq = input_ids.shape
        if segment_ids is None:
            segment_ids = (jnp.ones((batch, seq), jnp.int32) if attention_mask is None
                           else attention_mask.astype(jnp.int32))
        if positions is None:
            offset = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32) + offset, (batch, seq))
        embeds = self.embed(input_ids, pixel_values, image_mask)
        return self.language_model(embeds, positions, segment_ids, cache=cache,
                                   cache_index=cache_index, return_hidden=return_hidden,
                                   layers=layers)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> dict:
        """An empty KV cache for `batch` rows of up to `max_length` tokens."""
        return self.language_model.init_cache(batch, max_length, dtype)


def create_model(config: LlavaConfig, seed: int = 0) -> LlavaModel:
    """A randomly initialised model."""
    return LlavaModel(config, rngs=nnx.Rngs(params=seed))


def abstract_model(config: LlavaConfig) -> LlavaModel:
    """The model with ShapeDtypeStruct leaves: no memory allocated (for counting / restoring)."""
    return nnx.eval_shape(lambda: LlavaModel(config, rngs=nnx.Rngs(params=0)))


def abstract_params(config: LlavaConfig) -> tuple[nnx.GraphDef, dict]:
    """(graph definition, nested dict of ShapeDtypeStructs in `param_dtype`), nothing allocated.

    `nnx.merge(graphdef, params)` with a matching dict of arrays gives a ready LlavaModel.
    """
    model = abstract_model(config)
    graphdef, _ = nnx.split(model)
    dtype = jnp_dtype(config.param_dtype)
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
                                  nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def count_params(model: nnx.Module) -> int:
    """Number of parameters (works on abstract models)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
