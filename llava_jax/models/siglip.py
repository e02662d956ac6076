"""SigLIP ViT vision tower (transformers' `SiglipVisionModel`), returning LLaVA's image features.

Differences from CLIP (models/clip.py), whose encoder layers and feature selection it shares:
no class token, a patch convolution with bias, no pre-layernorm (hidden state 0 is the
patch + position embedding), the tanh GELU. LLaVA reads `vision_feature_layer` of the hidden
states, which never includes the post-layernorm or the attention-pooling head: both are held,
so a checkpoint converts back to transformers losslessly, and never computed
(`SiglipVisionTower.pooled_input` applies the post-layernorm, for parity checks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.config import LlavaConfig, jnp_dtype
from llava_jax.models.layers import Dense, LayerNorm
from llava_jax.models.partitioning import RESIDUAL, constrain

Array = jax.Array


class _HeadAttention(nnx.Module):
    """torch.nn.MultiheadAttention's parameters: a fused in-projection [width, 3 * width] and
    the out-projection."""

    def __init__(self, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = Dense(width, 3 * width, **kw)
        self.out_proj = Dense(width, width, **kw)


class _HeadMLP(nnx.Module):
    def __init__(self, width: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(width, hidden, **kw)
        self.fc2 = Dense(hidden, width, **kw)


class SiglipPoolingHead(nnx.Module):
    """`SiglipMultiheadAttentionPoolingHead`'s weights (probe, attention, layernorm, MLP).

    Held only: LLaVA never pools, so nothing here is computed."""

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        vision = config.vision
        kw = dict(dtype=jnp_dtype(config.dtype), param_dtype=jnp_dtype(config.param_dtype))
        width = vision.hidden_size
        self.probe = nnx.Param(nnx.initializers.normal(stddev=1.0)(
            rngs.params(), (1, 1, width), kw["param_dtype"]))
        self.attention = _HeadAttention(width, rngs=rngs, **kw)
        self.layernorm = LayerNorm(width, eps=vision.layer_norm_eps, **kw)
        self.mlp = _HeadMLP(width, vision.intermediate_size, rngs=rngs, **kw)


class SiglipVisionTower(CLIPVisionTower):
    """pixels [n, H, W, 3] (normalised, channels last) -> features [n, tokens, width * k].

    tokens = patches ('cls_patch', transformers' "full") or patches - 1 ('patch', its
    "default", which drops the first token: SigLIP has no class token, so a patch goes).
    """

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):  # noqa: super() not called:
        # the embeddings differ; the encoder and selection come from _init_encoder.
        vision = config.vision
        param_dtype = jnp_dtype(config.param_dtype)
        init = nnx.initializers.normal(stddev=0.02)
        # [p, p, C, width] (HWIO), like CLIP's, plus the conv's bias.
        self.patch_embedding = nnx.Param(
            init(rngs.params(), (vision.patch_size, vision.patch_size, vision.num_channels,
                                 vision.hidden_size), param_dtype))
        self.patch_bias = nnx.Param(jnp.zeros((vision.hidden_size,), param_dtype))
        embedding_init = nnx.initializers.normal(stddev=vision.hidden_size**-0.5)
        self.position_embedding = nnx.Param(
            embedding_init(rngs.params(), (vision.num_patches, vision.hidden_size), param_dtype))
        self._init_encoder(config, rngs)
        self.head = SiglipPoolingHead(config, rngs=rngs) if vision.use_head else None

    def embed(self, pixel_values: Array) -> Array:
        """pixels [n, H, W, C] -> hidden state 0 [n, patches, width]: patches + positions."""
        x = self.patch_embed(pixel_values) + self.patch_bias[...].astype(jnp.float32)
        x = x + self.position_embedding[...].astype(jnp.float32)
        return constrain(x.astype(self.dtype), RESIDUAL)

    def pooled_input(self, last_hidden: Array) -> Array:
        """transformers' `last_hidden_state`: the post-layernorm of the last layer's output."""
        return self.post_layernorm(last_hidden)
