"""Prompts and images -> the arrays `generate` / `stream` take (chat, evaluation).

    prompt = Prompt(text="<image>\\nWhat is this?", image=load_image(path))
    inputs = build_inputs([prompt, ...], tokenizer, template, model.config, processor)
    tokens = generate(model, inputs.input_ids, inputs.pixel_values, **inputs.image_kwargs(),
                      attention_mask=inputs.attention_mask, ...)

A prompt is one user turn (plus earlier rounds) in a conversation template, with at most one
image; its "<image>" tag becomes that image's placeholder ids (`data.tokenize_generation_prompt`):
`config.num_image_tokens` of them for a flat model (LLaVA-1.5), or, for a tiled one
(LLaVA-NeXT "anyres", OneVision "anyres_max_N"), as many as the image's anyres layout takes,
which depends on its size. Rows are right-padded to the longest; rows without an image get an
empty, masked image slot (flat) or no placeholder sources (tiled), so a batch mixing image and
text-only prompts runs as one call.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image

from llava_jax.data import (
    ImageDecodeError,
    decode_image,
    get_template,
    preprocess_image,
    tokenize_generation_prompt,
)
from llava_jax.data.processor import Processor
from llava_jax.models.config import LlavaConfig


@dataclasses.dataclass
class Prompt:
    """One row: the user turn `text`, earlier (question, answer) rounds, and its image.

    The image is either `image`, the decoded RGB image (`load_image`; any model: a tiled
    model needs it whole, to choose its tiles from its size), or `pixels`, a flat model's
    preprocessed image (`load_pixels`).
    """

    text: str
    pixels: np.ndarray | None = None  # float32 [H, W, 3], from `load_pixels` (flat models)
    history: Sequence[tuple[str, str]] = ()
    image: Image.Image | None = None  # RGB, from `load_image`

    @property
    def has_image(self) -> bool:
        return self.pixels is not None or self.image is not None


@dataclasses.dataclass
class ModelInputs:
    """A batch in the layout `generate` takes (rows right-padded)."""

    input_ids: np.ndarray  # int32 [batch, seq]
    attention_mask: np.ndarray  # int32 [batch, seq], 1 for real tokens
    # float32 [batch, 1, H, W, 3] (flat) or [batch, 1, tiles, H, W, 3] (tiled); None for a
    # text-only batch.
    pixel_values: np.ndarray | None
    image_mask: np.ndarray | None  # flat: bool [batch, 1], which rows have an image
    image_feature_index: np.ndarray | None = None  # tiled: int32 [batch, P, 4]
    image_feature_weight: np.ndarray | None = None  # tiled: float32 [batch, P, 4]

    def image_kwargs(self) -> dict[str, np.ndarray | None]:
        """The image keywords of `generate` / `stream` beside pixel_values."""
        return dict(image_mask=self.image_mask, image_feature_index=self.image_feature_index,
                    image_feature_weight=self.image_feature_weight)


def load_image(path: str) -> Image.Image:
    """The decoded RGB image of a file; errors name the file."""
    try:
        return decode_image(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found.") from None
    except ImageDecodeError as error:
        raise ImageDecodeError(f"{path}: {error}") from error


def load_pixels(path: str, image_size: int, aspect: str) -> np.ndarray:
    """float32 [image_size, image_size, 3] for an image file (flat models); errors name the
    file."""
    return preprocess_image(load_image(path), image_size, aspect)


def encode_prompt(prompt: Prompt, tokenizer, template: str, config: LlavaConfig,
                  num_image_tokens: int | Sequence[int] | None = None) -> np.ndarray:
    """The generation prompt's ids int32 [n] (ending with the assistant role).

    `num_image_tokens`: placeholders per image, one count or one per "<image>" of the history
    and question in order (default: the flat `config.num_image_tokens`)."""
    if num_image_tokens is None:
        num_image_tokens = config.num_image_tokens
    return tokenize_generation_prompt(prompt.text, tokenizer, get_template(template),
                                      num_image_tokens, config.image_token_index,
                                      history=list(prompt.history))


def build_inputs(prompts: Sequence[Prompt], tokenizer, template: str, config: LlavaConfig,
                 processor: Processor | None = None) -> ModelInputs:
    """Tokenizes every prompt and stacks the rows and their images into one batch.

    processor: a tiled model's `Processor` (the checkpoint's:
      `load_pretrained(...).processor`), which tiles the images; default: one configured
      from the model config (`default_preprocessor_config`). Flat models do not use it.
    """
    if not prompts:
        raise ValueError("build_inputs needs at least one prompt.")
    if config.anyres:
        return _build_tiled(prompts, tokenizer, template, config, processor)
    ids = [encode_prompt(prompt, tokenizer, template, config) for prompt in prompts]
    input_ids, attention_mask = _stack(ids)
    has_image = np.array([prompt.has_image for prompt in prompts])
    if not has_image.any():
        return ModelInputs(input_ids, attention_mask, None, None)
    size = config.vision.image_size
    pixel_values = np.zeros((len(prompts), 1, size, size, 3), np.float32)
    for index, prompt in enumerate(prompts):
        if prompt.pixels is not None:
            pixel_values[index, 0] = prompt.pixels
        elif prompt.image is not None:
            pixel_values[index, 0] = preprocess_image(prompt.image, size, config.image_aspect)
    return ModelInputs(input_ids, attention_mask, pixel_values, has_image[:, None])


def _build_tiled(prompts: Sequence[Prompt], tokenizer, template: str, config: LlavaConfig,
                 processor: Processor | None) -> ModelInputs:
    """`build_inputs` of a tiled model: each image's placeholder count and tiles come from its
    size (the processor's anyres layout, so they equal `Processor.__call__`'s)."""
    if processor is None:
        processor = Processor(config, tokenizer)
    rows = []
    for number, prompt in enumerate(prompts):
        if prompt.pixels is not None and prompt.image is None:
            raise ValueError(f"prompt {number}: a tiled model (image_aspect="
                             f"{config.image_aspect!r}) tiles the image from its original "
                             "size: give Prompt.image (load_image), not preprocessed pixels.")
        rows.append([prompt.image] if prompt.image is not None else [])
    layouts = [processor.row_layouts(row) for row in rows]
    ids = [encode_prompt(prompt, tokenizer, template, config,
                         [layout.num_tokens(processor.spec) for layout in row_layouts])
           for prompt, row_layouts in zip(prompts, layouts)]
    input_ids, attention_mask = _stack(ids)
    if not any(rows):
        return ModelInputs(input_ids, attention_mask, None, None)
    images = processor.tiled_images(rows, layouts)
    return ModelInputs(input_ids, attention_mask, images["pixel_values"], None,
                       images["image_feature_index"], images["image_feature_weight"])


def _stack(ids: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded input_ids and attention_mask int32 [len(ids), longest]."""
    length = max(len(row) for row in ids)
    input_ids = np.zeros((len(ids), length), np.int32)
    attention_mask = np.zeros((len(ids), length), np.int32)
    for index, row in enumerate(ids):
        input_ids[index, :len(row)], attention_mask[index, :len(row)] = row, 1
    return input_ids, attention_mask
