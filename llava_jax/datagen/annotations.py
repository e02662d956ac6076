"""What the text-only LLM is told about an image: captions and labelled boxes.

Two inputs:

  * COCO-format files (`captions_*.json`, `instances_*.json`, given together, comma-separated):
    `images` [{id, file_name, width, height}], caption `annotations` [{image_id, caption}],
    instance `annotations` [{image_id, bbox: [x, y, w, h] in pixels, category_id}] and
    `categories` [{id, name}]. A file's kind is read from its annotations (caption / bbox).
    Boxes become [x1, y1, x2, y2] divided by the image's width and height: in [0, 1], origin
    at the top left, 3 decimals (as the paper shows them to GPT-4).
  * JSONL for other sources, one image a line:
    {"image": "path/in/image/root.jpg", "captions": ["...", ...] (or one string),
     "boxes": [{"label": "dog", "box": [x1, y1, x2, y2]}, ...]} with boxes already in [0, 1]
    ("category" / "name" for "label" and "bbox" for "box" are accepted too).

`format_context` renders one image's annotations as the text the prompts' examples use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence


@dataclasses.dataclass
class Box:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float

    def coordinates(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


@dataclasses.dataclass
class ImageAnnotation:
    """One image: its file name (relative to the image root, as the LLaVA JSON names it)."""

    image: str
    captions: list[str] = dataclasses.field(default_factory=list)
    boxes: list[Box] = dataclasses.field(default_factory=list)


def format_context(annotation: ImageAnnotation) -> str:
    """The image as the LLM reads it (the layout of the prompts' NNN_context.txt files):

        Captions:
        <one caption a line>

        Objects:
        <label>: [x1, y1, x2, y2]
    """
    parts = []
    if annotation.captions:
        parts.append("Captions:\n" + "\n".join(annotation.captions))
    if annotation.boxes:
        parts.append("Objects:\n" + "\n".join(
            f"{box.label}: [{', '.join(f'{v:.3f}' for v in box.coordinates())}]"
            for box in annotation.boxes))
    return "\n\n".join(parts)


def _clip(value: float) -> float:
    return round(min(1.0, max(0.0, value)), 3)


def _coco_box(bbox: Sequence[float], width: float, height: float, label: str) -> Box:
    x, y, w, h = (float(v) for v in bbox)
    return Box(label, _clip(x / width), _clip(y / height), _clip((x + w) / width),
               _clip((y + h) / height))


def read_coco(paths: Sequence[str]) -> list[ImageAnnotation]:
    """Captions and boxes of COCO-format files, per image, in the first file's image order."""
    images: dict[Any, dict] = {}
    annotations: dict[Any, ImageAnnotation] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error}).") from None
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise ValueError(f"{path}: not a COCO annotation file (needs 'images' and "
                             "'annotations'); for other sources write JSONL "
                             "{image, captions, boxes}.")
        for image in data["images"]:
            images.setdefault(image["id"], image)
            if image["id"] not in annotations:
                annotations[image["id"]] = ImageAnnotation(image["file_name"])
        categories = {c["id"]: c["name"] for c in data.get("categories", [])}
        for number, entry in enumerate(data["annotations"]):
            image_id = entry.get("image_id")
            if image_id not in annotations:
                raise ValueError(f"{path}: annotations[{number}] names image_id {image_id!r}, "
                                 "which is not in any file's 'images'.")
            target = annotations[image_id]
            if "caption" in entry:
                caption = " ".join(str(entry["caption"]).split())
                if caption:
                    target.captions.append(caption)
            elif "bbox" in entry:
                if entry.get("category_id") not in categories:
                    raise ValueError(f"{path}: annotations[{number}] has category_id "
                                     f"{entry.get('category_id')!r}, not in 'categories'.")
                image = images[image_id]
                width, height = float(image["width"]), float(image["height"])
                if width <= 0 or height <= 0:
                    raise ValueError(f"{path}: image {image_id!r} has no size.")
                target.boxes.append(_coco_box(entry["bbox"], width, height,
                                              categories[entry["category_id"]]))
    return [a for a in annotations.values() if a.captions or a.boxes]


def _jsonl_box(value: Any, where: str) -> Box:
    if isinstance(value, dict):
        label = value.get("label", value.get("category", value.get("name")))
        coordinates = value.get("box", value.get("bbox"))
    elif isinstance(value, (list, tuple)) and len(value) == 5:  # [label, x1, y1, x2, y2]
        label, coordinates = value[0], value[1:]
    else:
        label = coordinates = None
    if not isinstance(label, str) or not isinstance(coordinates, (list, tuple)) \
            or len(coordinates) != 4:
        raise ValueError(f"{where}: a box is {{\"label\": str, \"box\": [x1, y1, x2, y2]}}; "
                         f"got {value!r}.")
    try:
        x1, y1, x2, y2 = (float(v) for v in coordinates)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: box coordinates must be numbers; got {coordinates!r}.") \
            from None
    if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in (x1, y1, x2, y2)) \
            or x2 < x1 or y2 < y1:
        raise ValueError(f"{where}: box {coordinates!r} must be [x1, y1, x2, y2] with "
                         "0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1 (normalised by the "
                         "image's width and height).")
    return Box(label, *(_clip(v) for v in (x1, y1, x2, y2)))


def read_jsonl(path: str) -> list[ImageAnnotation]:
    """{image, captions, boxes} lines -> annotations (a repeated image is merged)."""
    by_image: dict[str, ImageAnnotation] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ValueError(f"{where}: each line needs an 'image' string (and "
                                 "'captions' / 'boxes').")
            captions = record.get("captions", record.get("caption", []))
            captions = [captions] if isinstance(captions, str) else captions
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"{where}: 'captions' must be a string or a list of strings.")
            boxes = record.get("boxes", [])
            if not isinstance(boxes, list):
                raise ValueError(f"{where}: 'boxes' must be a list.")
            target = by_image.setdefault(record["image"], ImageAnnotation(record["image"]))
            target.captions += [" ".join(c.split()) for c in captions if c.strip()]
            target.boxes += [_jsonl_box(box, where) for box in boxes]
    return [a for a in by_image.values() if a.captions or a.boxes]


def read_annotations(spec: str) -> list[ImageAnnotation]:
    """--annotations: one .jsonl file, or comma-separated COCO-format JSON files."""
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    if not paths:
        raise ValueError("--annotations names no file.")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"annotation file {path} does not exist.")
    jsonl = [p for p in paths if p.endswith(".jsonl")]
    if jsonl and len(paths) > 1:
        raise ValueError("--annotations takes one JSONL file or COCO JSON files, not both.")
    annotations = read_jsonl(paths[0]) if jsonl else read_coco(paths)
    if not annotations:
        raise ValueError(f"{spec}: no image has captions or boxes.")
    return annotations
