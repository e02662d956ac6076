"""CLIP ViT vision tower (transformers' `CLIPVisionModel`), returning LLaVA's image features.

LLaVA reads the hidden state *before* the last encoder layer (-2) and never applies the
post-layernorm; we still hold `post_layernorm` (and every layer) so a checkpoint keeps the
whole tower and converts back to transformers with no missing keys. Layers past the
deepest selected one are never computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models.config import LlavaConfig, VisionConfig, jnp_dtype
from llava_jax.models.layers import Dense, LayerNorm, gelu_tanh, quick_gelu, run_stacked, stacked
from llava_jax.models.partitioning import BATCH, HEAD_DIM, HEADS, LENGTH, MLP, RESIDUAL, constrain

Array = jax.Array


class CLIPAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biases."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        width = config.hidden_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(width, width, **kw)
        self.k_proj = Dense(width, width, **kw)
        self.v_proj = Dense(width, width, **kw)
        self.out_proj = Dense(width, width, **kw)
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        """x: [batch, tokens, width] -> [batch, tokens, width]."""
        batch, tokens, _ = x.shape
        # Heads over 'tensor' (the decoder's Megatron layout, models/llama.py).
        heads = (BATCH, LENGTH, HEADS, HEAD_DIM)
        split = lambda t: constrain(t.reshape(batch, tokens, self.num_heads, self.head_dim), heads)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * self.head_dim**-0.5, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32)
        out = constrain(out.astype(self.dtype), heads).reshape(batch, tokens, -1)
        return constrain(self.out_proj(out), RESIDUAL)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu_pytorch_tanh": gelu_tanh}


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)); x + mlp(ln2(x)). SigLIP's encoder layer
    is the same block with the tanh GELU (config.hidden_act)."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        dense = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, **norm)
        self.self_attn = CLIPAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, **norm)
        self.fc1 = Dense(config.hidden_size, config.intermediate_size, **dense)
        self.fc2 = Dense(config.intermediate_size, config.hidden_size, **dense)
        self.activation = config.hidden_act

    def __call__(self, x: Array) -> Array:
        """x [n, tokens, width] -> [n, tokens, width]."""
        x = constrain(x + self.self_attn(self.layer_norm1(x)), RESIDUAL)
        hidden = constrain(self.fc1(self.layer_norm2(x)), (BATCH, LENGTH, MLP))
        return constrain(x + self.fc2(_ACTIVATIONS[self.activation](hidden)), RESIDUAL)


class CLIPVisionTower(nnx.Module):
    """pixels [n, H, W, 3] (normalised, channels last) -> features [n, tokens, width * k]."""

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        vision = config.vision
        dtype, param_dtype = jnp_dtype(config.dtype), jnp_dtype(config.param_dtype)
        init = nnx.initializers.normal(stddev=0.02)
        # Patch embedding is a stride-p convolution without bias; held as [p, p, C, width] (HWIO).
        self.patch_embedding = nnx.Param(
            init(rngs.params(), (vision.patch_size, vision.patch_size, vision.num_channels,
                                 vision.hidden_size), param_dtype))
        # Class and position embeddings start at std width^-1/2, as in OpenAI's CLIP (not
        # transformers' 0.02): at 0.02 the position is ~2% of a token after the pre-layernorm,
        # and a frozen random tower (the demo's stand-in for a pretrained one) tells the
        # decoder almost nothing about where a patch is.
        embedding_init = nnx.initializers.normal(stddev=vision.hidden_size**-0.5)
        self.class_embedding = nnx.Param(
            embedding_init(rngs.params(), (vision.hidden_size,), param_dtype))
        self.position_embedding = nnx.Param(
            embedding_init(rngs.params(), (vision.num_patches + 1, vision.hidden_size), param_dtype))
        norm = dict(eps=vision.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.pre_layernorm = LayerNorm(vision.hidden_size, **norm)
        self._init_encoder(config, rngs)

    def _init_encoder(self, config: LlavaConfig, rngs: nnx.Rngs) -> None:
        """The encoder layers, the post-layernorm and the feature selection (shared with
        SigLIP)."""
        vision = config.vision
        dtype, param_dtype = jnp_dtype(config.dtype), jnp_dtype(config.param_dtype)
        self.layers = stacked(
            lambda r: CLIPEncoderLayer(vision, dtype=dtype, param_dtype=param_dtype, rngs=r),
            vision.num_layers, rngs)
        self.post_layernorm = LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps,
                                        dtype=dtype, param_dtype=param_dtype)  # unused by LLaVA
        self.vision = vision
        self.feature_layers = tuple(
            layer % (vision.num_layers + 1) for layer in config.feature_layers)
        # 'patch' drops the first token (CLIP's class token; for SigLIP, as transformers'
        # "default", its first patch), 'cls_patch' keeps all.
        self.keep_cls = config.vision_feature_select_strategy == "cls_patch"
        self.scan_layers = config.scan_layers
        self.remat_policy = config.remat_policy
        self.dtype = dtype

    def patch_embed(self, pixel_values: Array) -> Array:
        """pixels [n, H, W, C] -> float32 [n, patches, width]: the stride-p convolution."""
        n, height, width, channels = pixel_values.shape
        p = self.vision.patch_size
        if height != self.vision.image_size or width != self.vision.image_size:
            raise ValueError(f"pixel_values are {height}x{width}; this vision tower expects "
                             f"{self.vision.image_size}x{self.vision.image_size}.")
        # A stride-p conv is a matmul over non-overlapping p x p patches; a 'valid' conv
        # drops the last size % p rows / columns (SigLIP at 384 px, patch 14).
        rows, columns = height // p, width // p
        pixel_values = pixel_values[:, :rows * p, :columns * p]
        patches = pixel_values.reshape(n, rows, p, columns, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * channels)
        kernel = self.patch_embedding[...].reshape(p * p * channels, -1)
        return jnp.einsum("npk,kd->npd", patches.astype(self.dtype), kernel.astype(self.dtype),
                          preferred_element_type=jnp.float32)

    def embed(self, pixel_values: Array) -> Array:
        """pixels [n, H, W, C] -> [n, 1 + patches, width] after the pre-layernorm."""
        n = pixel_values.shape[0]
        x = self.patch_embed(pixel_values)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(jnp.float32), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(jnp.float32)
        return constrain(self.pre_layernorm(x.astype(self.dtype)), RESIDUAL)

    def __call__(self, pixel_values: Array) -> Array:
        """pixels [n, H, W, 3] -> selected features [n, tokens, width * len(feature_layers)].

        tokens = config.num_image_tokens: the tower's tokens, less the first for 'patch'.
        """
        hidden = self.embed(pixel_values)
        selected = {}
        done = 0  # hidden == hidden_states[done]: the output of `done` encoder layers
        for target in sorted(set(self.feature_layers)):
            if target > done:
                hidden, _ = run_stacked(self.layers, hidden, lambda layer, h, _: (layer(h), None),
                                        scan=self.scan_layers, policy_name=self.remat_policy,
                                        start=done, stop=target)
                done = target
            selected[target] = hidden
        features = jnp.concatenate([selected[layer] for layer in self.feature_layers], axis=-1)
        return features if self.keep_cls else features[:, 1:]
