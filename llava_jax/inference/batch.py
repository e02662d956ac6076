"""Prompts and images -> the arrays `generate` / `stream` take (chat, evaluation, serving).

    prompt = Prompt(text="<image>\\nWhat is this?", pixels=load_pixels(path, 336, "pad"))
    inputs = build_inputs([prompt, ...], tokenizer, template, model.config)
    tokens = generate(model, inputs.input_ids, inputs.pixel_values,
                      attention_mask=inputs.attention_mask, image_mask=inputs.image_mask, ...)

A prompt is one user turn (plus earlier rounds) in a conversation template; its "<image>" tags
become `num_image_tokens` placeholder ids each (`data.tokenize_generation_prompt`). Rows are
right-padded to the longest; rows without an image get an empty, masked image slot, so a
batch mixing image and text-only prompts runs as one call.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from llava_jax.data import (
    ImageDecodeError,
    decode_image,
    get_template,
    preprocess_image,
    tokenize_generation_prompt,
)
from llava_jax.models.config import LlavaConfig


@dataclasses.dataclass
class Prompt:
    """One row: the user turn `text`, earlier (question, answer) rounds, and its image."""

    text: str
    pixels: np.ndarray | None = None  # float32 [H, W, 3], from `load_pixels`
    history: Sequence[tuple[str, str]] = ()


@dataclasses.dataclass
class ModelInputs:
    """A batch in the layout `generate` takes (rows right-padded)."""

    input_ids: np.ndarray  # int32 [batch, seq]
    attention_mask: np.ndarray  # int32 [batch, seq], 1 for real tokens
    pixel_values: np.ndarray | None  # float32 [batch, 1, H, W, 3], or None for a text-only batch
    image_mask: np.ndarray | None  # bool [batch, 1], which rows have an image


def load_pixels(path: str, image_size: int, aspect: str) -> np.ndarray:
    """float32 [image_size, image_size, 3] for an image file; errors name the file."""
    try:
        return preprocess_image(decode_image(path), image_size, aspect)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found.") from None
    except ImageDecodeError as error:
        raise ImageDecodeError(f"{path}: {error}") from error


def encode_prompt(prompt: Prompt, tokenizer, template: str, config: LlavaConfig) -> np.ndarray:
    """The generation prompt's ids int32 [n] (ending with the assistant role)."""
    return tokenize_generation_prompt(prompt.text, tokenizer, get_template(template),
                                      config.num_image_tokens, config.image_token_index,
                                      history=list(prompt.history))


def build_inputs(prompts: Sequence[Prompt], tokenizer, template: str,
                 config: LlavaConfig) -> ModelInputs:
    """Tokenizes every prompt and stacks the rows and their images into one batch."""
    if not prompts:
        raise ValueError("build_inputs needs at least one prompt.")
    ids = [encode_prompt(prompt, tokenizer, template, config) for prompt in prompts]
    length = max(len(row) for row in ids)
    input_ids = np.zeros((len(ids), length), np.int32)
    attention_mask = np.zeros((len(ids), length), np.int32)
    for index, row in enumerate(ids):
        input_ids[index, :len(row)], attention_mask[index, :len(row)] = row, 1
    has_image = np.array([prompt.pixels is not None for prompt in prompts])
    if not has_image.any():
        return ModelInputs(input_ids, attention_mask, None, None)
    size = config.vision.image_size
    pixel_values = np.zeros((len(prompts), 1, size, size, 3), np.float32)
    for index, prompt in enumerate(prompts):
        if prompt.pixels is not None:
            pixel_values[index, 0] = prompt.pixels
    return ModelInputs(input_ids, attention_mask, pixel_values, has_image[:, None])
