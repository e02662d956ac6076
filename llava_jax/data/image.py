"""Image decoding and CLIP preprocessing, equal to transformers' CLIPImageProcessor (PIL path).

The processor's steps, reproduced exactly: convert to RGB (alpha composited onto white),
resize the shortest edge to `image_size` with PIL bicubic (the long edge becomes
`int(image_size * long / short)`), center crop `image_size` x `image_size` with the top-left
corner at `(size - crop) // 2`, rescale by 1/255 (in float64, then float32) and normalize with
the OpenAI CLIP mean/std in float32. The last two steps are a 256-entry lookup table per
channel here, computed with the processor's own arithmetic, so the output matches it bit for
bit and costs one gather instead of four passes over the image.

Aspect modes of the original LLaVA (`image_aspect_ratio`):
    "pad"     expand to a square filled with the mean colour (122, 116, 104), then as above
              (LLaVA-1.5 stage 2, `expand2square`)
    "square"  the processor alone: resize + center crop (the original's default, stage 1)

Output is channels-last float32[image_size, image_size, 3] (the model's layout), where the
processor returns channels-first.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# `tuple(int(x * 255) for x in image_mean)`, the original's expand2square background.
PAD_COLOR = tuple(int(x * 255) for x in OPENAI_CLIP_MEAN)
ASPECT_MODES = ("pad", "square")


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (corrupt, truncated or not an image)."""


def _lookup_table() -> np.ndarray:
    """float32[256, 3]: normalized value of each uint8 level per channel, computed the way
    transformers does (`rescale`: float64 multiply then float32; `normalize`: float32)."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[:, None]
    mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)
    std = np.asarray(OPENAI_CLIP_STD, np.float32)
    return ((levels - mean) / std).astype(np.float32)


# [3, 256]: one contiguous row per channel, so `np.take` gathers from a small cached table.
_NORMALIZED = np.ascontiguousarray(_lookup_table().T)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL mode: alpha (RGBA, LA, palette transparency) is composited onto
    white as transformers' `convert_to_rgb` does; 16/32-bit integer and float grayscale are
    scaled to 8 bit (PIL's own `convert` clips them, turning most 16-bit images white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit PNG/TIFF grayscale arrives as I;16 or I (int32 holding 0..65535).
        values = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        eight_bit = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: Union[bytes, str, os.PathLike], exif_transpose: bool = True) -> Image.Image:
    """Decode image bytes (or a file path) fully into an RGB PIL image.

    `exif_transpose` applies the EXIF orientation so the pixels are upright as a viewer (and
    an annotator) saw them; the original LLaVA did not, which only matters for the rare
    EXIF-rotated photo. Raises ImageDecodeError for anything PIL cannot decode completely;
    a missing file raises FileNotFoundError.
    """
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(data))
        else:
            image = Image.open(data)
        image.load()  # decode now: truncated files fail here, not later in a worker
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"cannot decode image: {error}") from error


def expand_to_square(image: Image.Image, fill=PAD_COLOR) -> Image.Image:
    """The original's `expand2square`: paste centred on a square of `fill` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after resizing the shortest edge, as transformers computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


def preprocess_image(image: Image.Image, image_size: int, aspect: str = "pad") -> np.ndarray:
    """CLIP pixels of one image: float32[image_size, image_size, 3], channels last.

    Args:
      image: a PIL image of any mode (converted as `to_rgb` describes).
      image_size: shortest-edge resize and square crop size (336 for LLaVA-1.5, 224 for v1).
      aspect: "pad" (LLaVA-1.5 stage 2) or "square" (stage 1, crop only).
    """
    if aspect not in ASPECT_MODES:
        if aspect.startswith("anyres"):
            raise ValueError(
                f"image_aspect={aspect!r} is a tiled (LLaVA-NeXT / OneVision) model: build its "
                "inputs with the checkpoint's processor (`load_pretrained(path).processor`); "
                "this one-tile path (chat, serve, eval, training data) takes 'pad' / 'square'.")
        raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {aspect!r}")
    image = to_rgb(image)
    if aspect == "pad":
        image = expand_to_square(image)
    width, height = resized_size(*image.size, image_size)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    left, top = (width - image_size) // 2, (height - image_size) // 2
    if (left, top, width, height) != (0, 0, image_size, image_size):
        image = image.crop((left, top, left + image_size, top + image_size))
    pixels = np.asarray(image)  # uint8[H, W, 3]
    out = np.empty(pixels.shape, np.float32)
    for channel in range(3):
        np.take(_NORMALIZED[channel], pixels[..., channel], out=out[..., channel])
    return out
