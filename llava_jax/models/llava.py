"""LlavaModel: CLIP or SigLIP features -> projector -> spliced into the token embeddings -> the
LLaMA-style decoder (Llama / Mistral / Qwen2).

Input convention (transformers' LLaVA): every image occupies `num_image_tokens`
consecutive positions holding `image_token_index` in `input_ids`. The k-th placeholder of
a row receives the k-th projected feature of that row's images, in image order. The merge
is a gather + where with static shapes, so it jits once per batch shape.

Tiled images (LLaVA-NeXT / OneVision, `config.anyres`): pixel_values gain a tile axis,
[b, images, tiles, H, W, 3], and the host (data/anyres.py) passes the layout as a
placeholder -> feature map, `image_feature_index` int32 [b, P, 4] and `image_feature_weight`
float32 [b, P, 4]: the k-th placeholder receives sum_j weight[k, j] * table[index[k, j]],
where a row's table is its tiles' projected features [images * tiles * tokens, hidden]
followed by the learned `image_newline`. That one gather covers the base tile, the unpad
crop, the newline after each grid row and OneVision's bilinear shrink, all with static shapes.
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
        if config.anyres:
            # Ends each row of a tiled image's feature grid (transformers' init: N(0, 1/hidden)).
            hidden = config.text.hidden_size
            self.image_newline = nnx.Param(
                nnx.initializers.normal(stddev=hidden**-0.5)(
                    rngs.params(), (hidden,), jnp_dtype(config.param_dtype)))

    def image_features(self, pixel_values: Array) -> Array:
        """pixels [b, images, H, W, 3] -> projected features [b, images * tokens, hidden]."""
        batch, num_images = pixel_values.shape[:2]
        features = self.vision_tower(pixel_values.reshape(-1, *pixel_values.shape[2:]))
        features = self.multi_modal_projector(features)
        features = features.reshape(batch, num_images * features.shape[1], features.shape[-1])
        return constrain(features, RESIDUAL)

    def tiled_features(self, input_ids: Array, pixel_values: Array, index: Array,
                       weight: Array) -> Array:
        """Each position's feature under a tiled layout (garbage at non-placeholders).

        Args:
          input_ids: int [b, s]; pixel_values: [b, images, tiles, H, W, 3].
          index: int32 [b, P, 4], weight: float32 [b, P, 4]: placeholder k of a row takes
            sum_j weight[k, j] * table[index[k, j]] (data/anyres.py's `feature_map`).
        Returns:
          float32 [b, s, hidden].
        """
        batch, images, tiles = pixel_values.shape[:3]
        features = self.image_features(
            pixel_values.reshape(batch, images * tiles, *pixel_values.shape[3:]))
        newline = jnp.broadcast_to(self.image_newline[...].astype(features.dtype),
                                   (batch, 1, features.shape[-1]))
        table = jnp.concatenate([features, newline], axis=1)  # [b, images*tiles*tokens + 1, h]
        is_image = input_ids == self.config.image_token_index
        k = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, index.shape[1] - 1)
        sources = jnp.take_along_axis(index, k[:, :, None], axis=1)  # [b, s, 4]
        weights = jnp.take_along_axis(weight.astype(jnp.float32), k[:, :, None], axis=1)
        out = jnp.zeros((*input_ids.shape, table.shape[-1]), jnp.float32)
        # Plain 'anyres' never interpolates: every placeholder is one feature at weight 1.
        taps = 1 if self.config.image_aspect == "anyres" else index.shape[-1]
        for j in range(taps):
            gathered = jnp.take_along_axis(table, sources[:, :, j, None], axis=1)
            out = out + weights[:, :, j, None] * gathered.astype(jnp.float32)
        return out

    def embed(self, input_ids: Array, pixel_values: Array | None = None,
              image_mask: Array | None = None, image_feature_index: Array | None = None,
              image_feature_weight: Array | None = None) -> Array:
        """Token embeddings with image features written at the placeholder positions.

        Args:
          input_ids: int [b, s].
          pixel_values: float [b, images, H, W, 3] or None (text only); tiled models:
            [b, images, tiles, H, W, 3] with `image_feature_index` / `image_feature_weight`.
          image_mask: bool [b, images], which image slots hold real images (default: all).
            Placeholder runs are matched to the real slots in slot order (flat models).
          image_feature_index, image_feature_weight: [b, P, 4] the tiled layout (see
            `tiled_features`); required by, and only for, tiled models.
        Returns:
          [b, s, hidden] in the compute dtype.
        """
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds
        if self.config.anyres:
            if pixel_values.ndim != 6 or image_feature_index is None or image_feature_weight is None:
                raise ValueError(
                    "a tiled (anyres) model takes pixel_values [b, images, tiles, H, W, 3] with "
                    "image_feature_index and image_feature_weight (from its processor); got "
                    f"pixel_values of shape {tuple(pixel_values.shape)}.")
            gathered = self.tiled_features(input_ids, pixel_values, image_feature_index,
                                           image_feature_weight)
            is_image = input_ids == self.config.image_token_index
            return constrain(jnp.where(is_image[:, :, None], gathered.astype(embeds.dtype),
                                       embeds), RESIDUAL)
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
                 image_feature_index: Array | None = None,
                 image_feature_weight: Array | None = None, cache: dict | None = None,
                 cache_index: Array | int | None = None,
                 return_hidden: bool = False, layers=None):
        """Logits for a batch of token ids with images.

        Args:
          input_ids: int32 [b, s], images as runs of `image_token_index`.
          pixel_values: float32 [b, images, H, W, 3], normalised, channels last; or None.
          attention_mask: [b, s] 1 for real tokens, 0 for padding (ignored if segment_ids).
          segment_ids: [b, s] packed-sample ids (0 = padding); attention stays in a segment.
          positions: [b, s] rotary positions; default 0..s-1 (or from cache_index).
          image_mask: bool [b, images], real image slots (default: all).
          image_feature_index, image_feature_weight: tiled models' layout [b, P, 4] (with
            pixel_values [b, images, tiles, H, W, 3]); see `embed`.
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
        embeds = self.embed(input_ids, pixel_values, image_mask, image_feature_index,
                            image_feature_weight)
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
