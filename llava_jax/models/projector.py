"""Vision -> language projector: 'linear', 'mlp{N}x_gelu' (exact-erf GELU between) or 'identity'."""

from __future__ import annotations

import jax
from flax import nnx

from llava_jax.models.config import LlavaConfig, jnp_dtype
from llava_jax.models.layers import Dense
from llava_jax.models.partitioning import BATCH, LENGTH, MLP, RESIDUAL, constrain


class Projector(nnx.Module):
    """features [..., vision_width * k] -> [..., text_hidden].

    Linear layers are named linear_1 .. linear_N, as in transformers'
    `LlavaMultiModalProjector` (the original LLaVA's `mm_projector.{0,2,4,...}`).
    """

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        depth = config.projector_depth
        dtype, param_dtype = jnp_dtype(config.dtype), jnp_dtype(config.param_dtype)
        widths = [config.projector_input_size] + [config.text.hidden_size] * depth
        for i in range(depth):
            setattr(self, f"linear_{i + 1}",
                    Dense(widths[i], widths[i + 1], use_bias=config.projector_bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs))
        self.depth = depth
        self.dtype = dtype

    def __call__(self, features: jax.Array) -> jax.Array:
        """features [n, tokens, in] -> [n, tokens, text_hidden]."""
        x = features.astype(self.dtype)
        for i in range(self.depth):
            if i:
                x = jax.nn.gelu(x, approximate=False)
            x = getattr(self, f"linear_{i + 1}")(x)
            # linear_1, 3, .. are column-parallel (outputs over 'tensor'), linear_2, 4, .. row-
            # parallel (llava_jax.sharding.DEFAULT_PARAM_RULES); the last output is the
            # decoder's residual layout, whatever the depth.
            hidden = i % 2 == 0 and i + 1 < self.depth
            x = constrain(x, (BATCH, LENGTH, MLP) if hidden else RESIDUAL)
        return x
