"""`Processor`: text with `<image>` markers + PIL images -> the model's numpy inputs.

Equal to transformers' LlavaProcessor / LlavaNextProcessor / LlavaOnevisionProcessor (with the
PIL image-processor backend, the one that needs no torchvision) for the same checkpoint: the
same input_ids (each `<image>` expanded to that image's placeholder count, then the
checkpoint's tokenizer), and the same pixels, channels last. It is configured from the
checkpoint's own files: `preprocessor_config.json` (which image processor, sizes, mean / std,
resampling; conversion carries it over) and the model config (placeholder counts, tiling);
without a preprocessor_config.json, `default_preprocessor_config(config)` stands in.

    processor = Processor.from_directory(model_dir, config, tokenizer)
    batch = processor(text=["USER: <image>\\nWhat is it? ASSISTANT:"], images=[[pil_image]])
    logits = model(**batch)
    tokens = llava_jax.generate(model, **batch, max_new_tokens=32)

`batch` holds input_ids int32 [b, s], attention_mask int32 [b, s] and, when there are images,
pixel_values float32: [b, images, S, S, 3] with image_mask bool [b, images] (flat models), or
[b, images, tiles, S, S, 3] with image_feature_index / image_feature_weight [b, P, 4] (tiled
models, data/anyres.py). Rows with fewer images have zero slots (masked / never referenced).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from llava_jax.data import anyres
from llava_jax.data.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resized_size, to_rgb

PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGE_TOKEN = "<image>"
# transformers' image processors (PIL backend) and their defaults where a file omits a key.
_CLIP_DEFAULTS = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                      do_center_crop=True, image_mean=list(OPENAI_CLIP_MEAN),
                      image_std=list(OPENAI_CLIP_STD), do_pad=False)
IMAGE_PROCESSORS = {
    "CLIPImageProcessor": _CLIP_DEFAULTS,
    "LlavaImageProcessor": _CLIP_DEFAULTS,
    "SiglipImageProcessor": dict(size={"height": 224, "width": 224}, crop_size=None,
                                 do_center_crop=False, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, do_pad=False),
    "LlavaNextImageProcessor": dict(_CLIP_DEFAULTS, do_pad=True),
    "LlavaOnevisionImageProcessor": dict(size={"height": 384, "width": 384}, crop_size=None,
                                         do_center_crop=False, image_mean=list(OPENAI_CLIP_MEAN),
                                         image_std=list(OPENAI_CLIP_STD), do_pad=True),
}
_TILED = ("LlavaNextImageProcessor", "LlavaOnevisionImageProcessor")


class ProcessorError(ValueError):
    """A preprocessor_config.json, or a text / images call, that the processor cannot honour."""


def _processor_type(name: str, source: str) -> str:
    for suffix in ("Fast", "Pil"):
        if name.endswith(suffix) and name[:-len(suffix)] in IMAGE_PROCESSORS:
            name = name[:-len(suffix)]
    if name not in IMAGE_PROCESSORS:
        raise ProcessorError(f"{source}: image_processor_type={name!r} is not supported; "
                             f"supported: {sorted(IMAGE_PROCESSORS)}.")
    return name


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """The image half: transformers' PIL-backend steps, in its order and arithmetic.

    Flat processors: (LlavaImageProcessor's do_pad: pad to a square of the mean colour),
    resize (`shortest_edge`: aspect kept, long side `int(size * long / short)`; or exact
    height x width), center crop, rescale (float64, then float32), normalize (float32): the
    last two as one 256-entry table per channel. Tiled processors: data/anyres.py's tiles,
    each then through the same resize / crop / normalize.
    """

    kind: str
    resize_to: tuple[str, Any]  # ("shortest_edge", n) or ("exact", (height, width))
    crop: tuple[int, int] | None
    pad_to_square: bool
    resample: int
    table: np.ndarray  # float32 [3, 256]: each uint8 level's final value per channel
    background: tuple[int, int, int]
    pinpoints: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_dict(cls, settings: dict[str, Any], source: str = PREPROCESSOR_FILE) -> "ImageProcessor":
        kind = _processor_type(settings.get("image_processor_type", "CLIPImageProcessor"), source)
        merged = {**IMAGE_PROCESSORS[kind], **settings}
        size = merged.get("size") or {}
        if not merged.get("do_resize", True):
            raise ProcessorError(f"{source}: do_resize=false is not supported.")
        if "shortest_edge" in size and not size.get("longest_edge"):
            resize_to = ("shortest_edge", int(size["shortest_edge"]))
        elif size.get("height") and size.get("width"):
            resize_to = ("exact", (int(size["height"]), int(size["width"])))
        else:
            raise ProcessorError(f"{source}: size={size!r} is not supported (use "
                                 "{'shortest_edge': n} or {'height': h, 'width': w}).")
        crop = None
        if merged.get("do_center_crop"):
            crop_size = merged.get("crop_size") or {}
            if not (crop_size.get("height") and crop_size.get("width")):
                raise ProcessorError(f"{source}: do_center_crop needs crop_size height / width.")
            crop = (int(crop_size["height"]), int(crop_size["width"]))
        mean = [float(v) for v in merged.get("image_mean")]
        std = [float(v) for v in merged.get("image_std")]
        if len(mean) != 3 or len(std) != 3:
            raise ProcessorError(f"{source}: image_mean / image_std need 3 values.")
        resample = int(merged.get("resample", 3))
        if resample not in (0, 1, 2, 3, 4, 5):
            raise ProcessorError(f"{source}: resample={resample} is not a PIL filter.")
        levels = np.arange(256, dtype=np.float64)
        if merged.get("do_rescale", True):
            levels = levels * float(merged.get("rescale_factor", 1 / 255))
        levels = levels.astype(np.float32)[:, None]
        if merged.get("do_normalize", True):
            levels = (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        table = np.ascontiguousarray(np.broadcast_to(levels, (256, 3)).astype(np.float32).T)
        pinpoints = ()
        if kind in _TILED:
            pinpoints = tuple(tuple(int(v) for v in p)
                              for p in merged.get("image_grid_pinpoints") or ())
        return cls(kind=kind, resize_to=resize_to, crop=crop,
                   pad_to_square=kind == "LlavaImageProcessor" and bool(merged.get("do_pad")),
                   resample=resample, table=table,
                   background=tuple(int(v * 255) for v in mean), pinpoints=pinpoints)

    @classmethod
    def for_model(cls, config, settings: dict[str, Any] | None = None,
                  source: str = PREPROCESSOR_FILE) -> "ImageProcessor":
        """The image processor `settings` (a preprocessor_config.json dict) describe, or
        without them the model config's default one; checked to fit the model."""
        if settings is None:
            settings, source = default_preprocessor_config(config), "default_preprocessor_config"
        image_processor = cls.from_dict(settings, source)
        image_processor.check_fits(config)
        return image_processor

    @property
    def tiled(self) -> bool:
        return self.kind in _TILED

    def check_fits(self, config) -> None:
        """Raises ProcessorError unless this processor's tiling is the model config's."""
        if self.tiled != config.anyres:
            raise ProcessorError(f"image_processor_type={self.kind!r} does not fit a model with "
                                 f"image_aspect={config.image_aspect!r}.")
        if config.anyres and self.pinpoints and \
                self.pinpoints != tuple(tuple(p) for p in config.image_grid_pinpoints):
            raise ProcessorError("preprocessor_config.json's image_grid_pinpoints differ from "
                                 "the model config's image_grid_pinpoints.")

    def resize(self, pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """uint8 [h, w, 3] -> uint8 [height, width, 3] with the configured PIL filter."""
        if pixels.shape[:2] == tuple(size):
            return pixels
        image = Image.fromarray(pixels).resize((size[1], size[0]), resample=self.resample)
        return np.asarray(image)

    def square(self, pixels: np.ndarray) -> np.ndarray:
        """Pads to a square of the background (mean) colour, the image centred."""
        height, width = pixels.shape[:2]
        if height == width:
            return pixels
        side = max(height, width)
        out = np.empty((side, side, 3), np.uint8)
        out[...] = np.asarray(self.background, np.uint8)
        top, left = (side - height) // 2, (side - width) // 2
        out[top:top + height, left:left + width] = pixels
        return out

    def finish(self, pixels: np.ndarray) -> np.ndarray:
        """One image or tile: resize, center crop, normalize -> float32 [H, W, 3]."""
        height, width = pixels.shape[:2]
        if self.resize_to[0] == "shortest_edge":
            new_width, new_height = resized_size(width, height, self.resize_to[1])
        else:
            new_height, new_width = self.resize_to[1]
        pixels = self.resize(pixels, (new_height, new_width))
        if self.crop is not None:
            crop_height, crop_width = self.crop
            if crop_height > new_height or crop_width > new_width:
                raise ProcessorError(f"crop_size {self.crop} exceeds the resized image "
                                     f"{new_height}x{new_width}.")
            top, left = (new_height - crop_height) // 2, (new_width - crop_width) // 2
            pixels = pixels[top:top + crop_height, left:left + crop_width]
        out = np.empty(pixels.shape, np.float32)
        for channel in range(3):
            np.take(self.table[channel], pixels[..., channel], out=out[..., channel])
        return out

    def flat(self, image: Image.Image) -> np.ndarray:
        """A flat model's pixels of one image: float32 [H, W, 3]."""
        pixels = np.asarray(to_rgb(image))
        return self.finish(self.square(pixels) if self.pad_to_square else pixels)

    def tiles(self, image: Image.Image, layout: anyres.ImageLayout,
              spec: anyres.AnyresSpec) -> np.ndarray:
        """A tiled model's pixels of one image: float32 [layout.num_tiles, H, W, 3]."""
        pixels = np.asarray(to_rgb(image))
        if not layout.tiled:  # OneVision, several images in the row: one padded square
            return self.finish(self.square(pixels))[None]
        return np.stack([self.finish(tile) for tile in
                         anyres.tile_image(pixels, layout, spec, self.resize)])


def read_preprocessor_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """`directory`/preprocessor_config.json as a dict, None when there is none; malformed JSON
    is a ProcessorError naming the file."""
    path = Path(directory) / PREPROCESSOR_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ProcessorError(f"{path}: malformed JSON ({e}).") from e


def default_preprocessor_config(config) -> dict[str, Any]:
    """The transformers image-processor settings that go with a model config (what jax-to-hf
    writes, and what `Processor` uses when a checkpoint has no preprocessor_config.json)."""
    size = config.vision.image_size
    siglip = config.vision.model_type == "siglip_vision_model"
    mean, std = ([0.5] * 3, [0.5] * 3) if siglip else (list(OPENAI_CLIP_MEAN),
                                                       list(OPENAI_CLIP_STD))
    common = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
                  do_normalize=True, image_mean=mean, image_std=std, do_convert_rgb=True)
    if config.anyres:
        kind = "LlavaOnevisionImageProcessor" if config.image_aspect != "anyres" else \
            "LlavaNextImageProcessor"
        resize = ({"size": {"height": size, "width": size}, "do_center_crop": False}
                  if siglip or kind == "LlavaOnevisionImageProcessor" else
                  {"size": {"shortest_edge": size}, "do_center_crop": True,
                   "crop_size": {"height": size, "width": size}})
        return dict(image_processor_type=kind, do_pad=True,
                    image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
                    **resize, **common)
    if siglip:
        return dict(image_processor_type="SiglipImageProcessor",
                    size={"height": size, "width": size}, **common)
    return dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": size},
                do_center_crop=True, crop_size={"height": size, "width": size}, **common)


class Processor:
    """Text + images -> model inputs for one model (see the module docstring)."""

    def __init__(self, config, tokenizer, image_processor: ImageProcessor | None = None):
        if tokenizer is None:
            raise ProcessorError("the processor needs the checkpoint's tokenizer (none found).")
        self.config = config
        self.tokenizer = tokenizer
        if image_processor is None:
            image_processor = ImageProcessor.for_model(config)
        else:
            image_processor.check_fits(config)
        self.image_processor = image_processor
        self.spec = anyres.AnyresSpec.from_config(config) if config.anyres else None
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id != config.image_token_index:
            raise ProcessorError(f"the tokenizer's {IMAGE_TOKEN} is id {image_id}, the model's "
                                 f"image_token_index is {config.image_token_index}.")

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, config, tokenizer) -> "Processor":
        """Configured from `directory`/preprocessor_config.json when present."""
        settings = read_preprocessor_config(directory)
        image_processor = None
        if settings is not None:
            image_processor = ImageProcessor.from_dict(
                settings, str(Path(directory) / PREPROCESSOR_FILE))
        return cls(config, tokenizer, image_processor)

    def number_of_image_tokens(self, height: int, width: int, tiled: bool = True) -> int:
        """Placeholders one image of height x width takes."""
        if self.spec is None:
            return self.config.num_image_tokens
        return anyres.number_of_image_tokens(height, width, self.spec, tiled)

    def __call__(self, text: str | Sequence[str], images: Sequence[Sequence[Image.Image]] | None = None,
                 *, pad_tiles_to: int | None = None, padding_side: str | None = None
                 ) -> dict[str, np.ndarray]:
        """Model inputs for a batch.

        Args:
          text: one prompt or a list; each `<image>` marks where an image goes.
          images: per prompt, its images in `<image>` order (an empty list for text only);
            a flat list of images is taken as one image per prompt.
          pad_tiles_to: tile slots per image (tiled models; default: the batch's largest
            image). `config.max_tiles` keeps one compiled shape for every image.
          padding_side: 'left' / 'right' (default: the tokenizer's).
        """
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = [[] for _ in texts]
        images = [list(row) if isinstance(row, (list, tuple)) else [row] for row in images]
        if len(images) != len(texts):
            raise ProcessorError(f"{len(texts)} prompts but images for {len(images)} rows.")
        expanded, layouts = [], []
        for row, (prompt, row_images) in enumerate(zip(texts, images)):
            pieces = prompt.split(IMAGE_TOKEN)
            if len(pieces) - 1 != len(row_images):
                raise ProcessorError(f"prompt {row} has {len(pieces) - 1} {IMAGE_TOKEN} markers "
                                     f"but {len(row_images)} images.")
            if self.spec is not None:
                layouts.append(self.row_layouts(row_images))
                counts = [layout.num_tokens(self.spec) for layout in layouts[-1]]
            else:
                counts = [self.config.num_image_tokens] * len(row_images)
            out = pieces[0]
            for count, piece in zip(counts, pieces[1:]):
                out += IMAGE_TOKEN * count + piece
            expanded.append(out)
        kwargs = {} if padding_side is None else {"padding_side": padding_side}
        tokens = self.tokenizer(expanded, padding=True, return_tensors="np", **kwargs)
        batch = {"input_ids": np.asarray(tokens["input_ids"], np.int32),
                 "attention_mask": np.asarray(tokens["attention_mask"], np.int32)}
        slots = max(len(row) for row in images)
        if not slots:
            return batch
        size = self.config.vision.image_size
        if self.spec is None:
            pixels = np.zeros((len(texts), slots, size, size, 3), np.float32)
            mask = np.zeros((len(texts), slots), bool)
            for row, row_images in enumerate(images):
                for slot, image in enumerate(row_images):
                    pixels[row, slot] = self._check(self.image_processor.flat(image))
                    mask[row, slot] = True
            batch.update(pixel_values=pixels, image_mask=mask)
            return batch
        batch.update(self.tiled_images(images, layouts, pad_tiles_to=pad_tiles_to))
        return batch

    def row_layouts(self, images: Sequence[Image.Image]) -> list[anyres.ImageLayout]:
        """A tiled model: the layouts of one row's images, in `<image>` order (OneVision tiles
        an image only when it is alone in its row); `layout.num_tokens(self.spec)` is the
        image's placeholder count."""
        if self.spec is None:
            raise ProcessorError("row_layouts is for tiled (anyres) models.")
        return anyres.row_layouts([(image.height, image.width) for image in images], self.spec)

    def tiled_images(self, images: Sequence[Sequence[Image.Image]],
                     layouts: Sequence[Sequence[anyres.ImageLayout]], *,
                     pad_tiles_to: int | None = None) -> dict[str, np.ndarray]:
        """A tiled model's image inputs of a batch (at least one image in it).

        Args:
          images: per row, its images (an empty list for a text-only row).
          layouts: per row, `row_layouts` of those images.
          pad_tiles_to: tile slots per image (default: the batch's largest image).
        Returns:
          pixel_values float32 [b, images, tiles, S, S, 3] (unused slots zero),
          image_feature_index int32 / image_feature_weight float32 [b, P, 4].
        """
        size = self.config.vision.image_size
        slots = max(len(row) for row in images)
        tiles = max(layout.num_tiles for row in layouts for layout in row)
        if pad_tiles_to is not None:
            if pad_tiles_to < tiles:
                raise ProcessorError(f"pad_tiles_to={pad_tiles_to} but an image needs {tiles}.")
            tiles = pad_tiles_to
        pixels = np.zeros((len(images), slots, tiles, size, size, 3), np.float32)
        for row, row_images in enumerate(images):
            for slot, (image, layout) in enumerate(zip(row_images, layouts[row])):
                pixels[row, slot, :layout.num_tiles] = self._check(
                    self.image_processor.tiles(image, layout, self.spec))
        index, weight = anyres.feature_map(layouts, self.spec, images=slots, tiles=tiles)
        return dict(pixel_values=pixels, image_feature_index=index, image_feature_weight=weight)

    def _check(self, pixels: np.ndarray) -> np.ndarray:
        size = self.config.vision.image_size
        if pixels.shape[-3:] != (size, size, 3):
            raise ProcessorError(f"the image processor makes {pixels.shape[-3]}x"
                                 f"{pixels.shape[-2]} images; the vision tower takes "
                                 f"{size}x{size}.")
        return pixels
