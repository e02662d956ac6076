"""LLaVA-NeXT / LLaVA-OneVision "anyres" layout, computed on the host (pure Python / numpy).

An anyres image is cut into tiles of the vision tower's size: the whole image squashed to one
tile (the "base" tile), then the image resized (aspect kept) into the best of
`image_grid_pinpoints` (heights x widths, multiples of the tile), padded with black to exactly
that resolution and split row-major into `rows x cols` tiles. The model sees, per image:

    base tile's features (tokens_per_tile of them)
    then the `rows*p x cols*p` feature grid of the other tiles (p = patches per tile side),
      with the padding's rows or columns cropped off ("unpad"),
      (OneVision, `anyres_max_N`: bilinearly shrunk when larger than ~N tiles' worth),
      each grid row followed by the learned `image_newline` vector.

A OneVision image that shares its row with other images is not tiled: it is padded to a square
(mean colour), resized to one tile, and contributes tokens_per_tile features plus one newline.

Every number here follows transformers' float64 arithmetic (`select_best_resolution`,
`get_patch_output_size`, `unpad_image`, OneVision's `pack_image_features`), so the placeholder
counts equal its processors' and the features land where its models put them.

Static shapes: `feature_map` turns a batch's layouts into two small arrays indexed by
placeholder number k, `index` int32 [b, P, 4] and `weight` float32 [b, P, 4]: the k-th
placeholder of a row receives sum_j weight[k, j] * features[index[k, j]] from the row's flat
feature table (all tile features of all image slots, then the newline). A plain tile feature
is one index with weight 1; an interpolated one mixes its 2 x 2 bilinear neighbours with
torch's `interpolate(mode="bilinear", align_corners=False)` weights (float32, as torch).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


def is_anyres(aspect: str) -> bool:
    """True for 'anyres' and 'anyres_max_N' (the tiled modes)."""
    return aspect == "anyres" or ANYRES_MAX.fullmatch(aspect) is not None


def max_patches(aspect: str) -> int | None:
    """N of 'anyres_max_N' (OneVision's feature budget in tiles), None for plain 'anyres'."""
    match = ANYRES_MAX.fullmatch(aspect)
    return int(match.group(1)) if match else None


def best_resolution(height: int, width: int,
                    pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) among `pinpoints` that keeps most of the image's pixels after an
    aspect-preserving fit (capped at the original pixel count), ties broken by least waste;
    the first such pinpoint wins (transformers' `select_best_resolution`)."""
    best, best_effective, best_waste = None, 0, float("inf")
    for target_height, target_width in pinpoints:
        scale = min(target_width / width, target_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = target_width * target_height - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(target_height), int(target_width)), effective, waste
    if best is None:
        raise ValueError(f"no usable resolution in image_grid_pinpoints={list(pinpoints)}")
    return best


def fit_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """(height, width) of the image resized, aspect kept, to fit inside the target (the longer
    relative side fills it exactly; the other rounds up, capped): `get_patch_output_size`."""
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return min(math.ceil(height * scale_width), target_height), target_width
    return target_height, min(math.ceil(width * scale_height), target_width)


def unpad_crop(height: int, width: int, grid_height: int,
               grid_width: int) -> tuple[int, int, int, int]:
    """(top, left, kept_height, kept_width) of a `grid_height x grid_width` feature grid once
    the rows or columns that cover the letterbox padding are dropped (`unpad_image`)."""
    if width / height > grid_width / grid_height:
        kept = int(round(height * (grid_width / width), 7))
        pad = (grid_height - kept) // 2
        return pad, 0, grid_height - 2 * pad, grid_width
    kept = int(round(width * (grid_height / height), 7))
    pad = (grid_width - kept) // 2
    return 0, pad, grid_height, grid_width - 2 * pad


def interpolated_size(height: int, width: int, budget: int | None,
                      patches_per_side: int) -> tuple[int, int]:
    """OneVision's shrink of an unpadded grid: when it holds more than 1.1^2 x `budget`
    tiles' worth of features, both sides are divided by sqrt(area / (budget * p^2)) and
    floored; otherwise (or budget None) unchanged."""
    if budget is None:
        return height, width
    ratio = math.sqrt(height * width / (budget * patches_per_side**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


@dataclasses.dataclass(frozen=True)
class AnyresSpec:
    """What the layout of one model needs.

    pinpoints: ((height, width), ...) candidate resolutions, multiples of tile_size.
    tile_size: the vision tower's image_size (pixels per tile side).
    patches_per_side: tile_size // patch_size (features per tile side).
    budget: N of 'anyres_max_N', None for plain 'anyres'.
    tile_single_only: tile an image only when it is its row's only image (OneVision); others
      get one padded-square tile and a single newline.
    """

    pinpoints: tuple[tuple[int, int], ...]
    tile_size: int
    patches_per_side: int
    budget: int | None = None
    tile_single_only: bool = False

    @property
    def tokens_per_tile(self) -> int:
        return self.patches_per_side**2

    @property
    def max_tiles(self) -> int:
        """Tile slots an image can need: the base tile plus the largest grid."""
        return 1 + max((h // self.tile_size) * (w // self.tile_size) for h, w in self.pinpoints)

    @classmethod
    def from_config(cls, config) -> "AnyresSpec":
        """The spec of an anyres LlavaConfig (models/config.py)."""
        if not is_anyres(config.image_aspect):
            raise ValueError(f"image_aspect={config.image_aspect!r} is not an anyres mode.")
        vision = config.vision
        budget = max_patches(config.image_aspect)
        return cls(pinpoints=tuple(tuple(p) for p in config.image_grid_pinpoints),
                   tile_size=vision.image_size,
                   patches_per_side=vision.image_size // vision.patch_size,
                   budget=budget, tile_single_only=budget is not None)


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """How one image of `height x width` pixels becomes features.

    tiled: False for a OneVision image in a multi-image row (one tile, one newline).
    grid: (rows, cols) of tiles after the base tile; (0, 0) when not tiled.
    crop: (top, left, height, width) kept of the rows*p x cols*p feature grid.
    shape: (height, width) of the grid after OneVision's interpolation (== crop's otherwise).
    """

    height: int
    width: int
    tiled: bool
    resolution: tuple[int, int]
    grid: tuple[int, int]
    crop: tuple[int, int, int, int]
    shape: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    def num_tokens(self, spec: AnyresSpec) -> int:
        """Placeholder tokens this image takes: base tile + grid rows each with a newline."""
        if not self.tiled:
            return spec.tokens_per_tile + 1
        rows, cols = self.shape
        return spec.tokens_per_tile + rows * (cols + 1)


def image_layout(height: int, width: int, spec: AnyresSpec, tiled: bool = True) -> ImageLayout:
    """The layout of an image of `height x width` pixels (both >= 1)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive; got {height}x{width}.")
    if not tiled:
        return ImageLayout(height, width, False, (spec.tile_size, spec.tile_size), (0, 0),
                           (0, 0, 0, 0), (0, 0))
    resolution = best_resolution(height, width, spec.pinpoints)
    rows, cols = resolution[0] // spec.tile_size, resolution[1] // spec.tile_size
    p = spec.patches_per_side
    crop = unpad_crop(height, width, rows * p, cols * p)
    shape = interpolated_size(crop[2], crop[3], spec.budget, p)
    return ImageLayout(height, width, True, resolution, (rows, cols), crop, shape)


def row_layouts(sizes: Sequence[tuple[int, int]], spec: AnyresSpec) -> list[ImageLayout]:
    """Layouts of one row's images ((height, width) each), in order: OneVision tiles an image
    only when it is alone in its row."""
    tiled = not (spec.tile_single_only and len(sizes) > 1)
    return [image_layout(h, w, spec, tiled) for h, w in sizes]


def number_of_image_tokens(height: int, width: int, spec: AnyresSpec, tiled: bool = True) -> int:
    """Placeholders one image of `height x width` pixels takes (what the processors count)."""
    return image_layout(height, width, spec, tiled).num_tokens(spec)


def _bilinear(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of `target` outputs along one axis: (low index, high index, high weight), as
    torch's bilinear (align_corners=False) computes them in float32."""
    if source == target:
        index = np.arange(target)
        return index, index, np.zeros(target, np.float32)
    scale = np.float32(source) / np.float32(target)
    real = scale * (np.arange(target, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    real = np.maximum(real, np.float32(0)).astype(np.float32)
    low = np.minimum(np.floor(real).astype(np.int64), source - 1)
    high = low + (low < source - 1)
    weight = np.clip(real - low.astype(np.float32), 0, 1).astype(np.float32)
    return low, high, weight


def image_sources(layout: ImageLayout, spec: AnyresSpec, first_feature: int,
                  newline: int) -> tuple[np.ndarray, np.ndarray]:
    """The placeholders of one image: (index int64 [n, 4], weight float32 [n, 4]) into a flat
    feature table whose tile t, token j of this image is at first_feature + t * tokens + j,
    and whose newline vector is at `newline`; n = layout.num_tokens(spec)."""
    tokens, p = spec.tokens_per_tile, spec.patches_per_side
    n = layout.num_tokens(spec)
    index = np.zeros((n, 4), np.int64)
    weight = np.zeros((n, 4), np.float32)
    index[:tokens, 0] = first_feature + np.arange(tokens)
    weight[:tokens, 0] = 1
    if not layout.tiled:
        index[tokens, 0], weight[tokens, 0] = newline, 1
        return index, weight
    top, left, crop_height, crop_width = layout.crop
    out_height, out_width = layout.shape
    cols = layout.grid[1]

    def feature(y: np.ndarray, x: np.ndarray) -> np.ndarray:  # grid coords -> table index
        y, x = y + top, x + left
        tile = 1 + (y // p) * cols + x // p
        return first_feature + tile * tokens + (y % p) * p + x % p

    y0, y1, wy = _bilinear(crop_height, out_height)
    x0, x1, wx = _bilinear(crop_width, out_width)
    ys, xs = np.meshgrid(np.arange(out_height), np.arange(out_width), indexing="ij")
    grid_index = np.stack([feature(y0[ys], x0[xs]), feature(y0[ys], x1[xs]),
                           feature(y1[ys], x0[xs]), feature(y1[ys], x1[xs])], axis=-1)
    hy, hx = wy[ys], wx[xs]
    one = np.float32(1)
    grid_weight = np.stack([(one - hy) * (one - hx), (one - hy) * hx, hy * (one - hx), hy * hx],
                           axis=-1).astype(np.float32)
    # Each grid row, then the newline: [rows, cols + 1, 4].
    row_index = np.concatenate(
        [grid_index, np.broadcast_to([newline, 0, 0, 0], (out_height, 1, 4))], axis=1)
    row_weight = np.concatenate(
        [grid_weight, np.broadcast_to(np.float32([1, 0, 0, 0]), (out_height, 1, 4))], axis=1)
    index[tokens:] = row_index.reshape(-1, 4)
    weight[tokens:] = row_weight.reshape(-1, 4)
    return index, weight


def feature_map(rows: Sequence[Sequence[ImageLayout]], spec: AnyresSpec, *, images: int,
                tiles: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The batch's placeholder -> feature map for the model.

    Args:
      rows: each row's image layouts, in placeholder order (empty for a text-only row).
      images, tiles: the pixel_values slots per row and tile slots per image (the model's
        flat feature table per row is [images * tiles * tokens_per_tile + 1], newline last).
      length: placeholders per row to allocate (default: the longest row, at least 1).
    Returns:
      index int32 [b, length, 4], weight float32 [b, length, 4]; rows past their own
      placeholders are zeros (weight 0).
    """
    tokens = spec.tokens_per_tile
    newline = images * tiles * tokens
    per_row = []
    for layouts in rows:
        if len(layouts) > images:
            raise ValueError(f"a row has {len(layouts)} images but only {images} image slots.")
        parts = []
        for slot, layout in enumerate(layouts):
            if layout.num_tiles > tiles:
                raise ValueError(f"an image of {layout.height}x{layout.width} needs "
                                 f"{layout.num_tiles} tiles but only {tiles} tile slots exist.")
            parts.append(image_sources(layout, spec, slot * tiles * tokens, newline))
        per_row.append(parts)
    counts = [sum(len(i) for i, _ in parts) for parts in per_row]
    width = max(counts + [1]) if length is None else length
    if max(counts + [0]) > width:
        raise ValueError(f"a row needs {max(counts)} placeholders; length={width} is too short.")
    index = np.zeros((len(rows), width, 4), np.int32)
    weight = np.zeros((len(rows), width, 4), np.float32)
    for row, parts in enumerate(per_row):
        if parts:
            index[row, :counts[row]] = np.concatenate([i for i, _ in parts])
            weight[row, :counts[row]] = np.concatenate([w for _, w in parts])
    return index, weight


def tile_image(pixels: np.ndarray, layout: ImageLayout, spec: AnyresSpec, resize) -> list:
    """The uint8 tiles [tile, tile, 3] of one image, base tile first.

    Args:
      pixels: uint8 [H, W, 3] (RGB).
      resize: (uint8 [h, w, 3], (height, width)) -> uint8 [height, width, 3], the processor's
        resampling (PIL bicubic for transformers' processors).
    """
    size = spec.tile_size
    base = resize(pixels, (size, size))
    if not layout.tiled:
        return [base]
    target_height, target_width = layout.resolution
    new_height, new_width = fit_size(layout.height, layout.width, target_height, target_width)
    fitted = resize(pixels, (new_height, new_width))
    top, extra_y = divmod(target_height - new_height, 2)
    left, extra_x = divmod(target_width - new_width, 2)
    padded = np.pad(fitted, ((top, top + extra_y), (left, left + extra_x), (0, 0)))
    rows, cols = layout.grid
    return [base] + [padded[r * size:(r + 1) * size, c * size:(c + 1) * size]
                     for r in range(rows) for c in range(cols)]
