"""Small builders for tests (here and in other packages' tests): a Llama-like tokenizer made on
the fly, and tiny LLaVA datasets on disk. Nothing here is used by training code."""

from __future__ import annotations

import json
import os
from typing import Sequence

from PIL import Image
from transformers import PreTrainedTokenizerFast

from llava_jax.data.conversation import TEMPLATES
from llava_jax.data.demo import train_llama_like_bpe

_CORPUS = (
    "What is in the image? A cat. What color is it? Black. The dog runs in the park.",
    "Describe the picture in detail. There are two red apples on a wooden table.",
    "USER: ASSISTANT: USER ASSISTANT [INST] [/INST] <<SYS>> <</SYS>> user assistant system",
    "Answer the question using a single word or phrase. yes no left right one two three",
)


def build_test_tokenizer(chatml: bool = False, vocab_size: int = 700):
    """A PreTrainedTokenizerFast that behaves like a (fast, legacy) Llama tokenizer.

    BPE with a Metaspace pre-tokenizer that puts "▁" before *every* split between special
    tokens (so, like the fast Llama tokenizer and unlike the slow one, it writes "▁USER" after
    "</s>"), <unk>=0, <s>=1, </s>=2, BOS added, then <image> and <pad>.
    `chatml=True` instead: <|im_start|> / <|im_end|> special tokens and no BOS (ChatML models).
    """
    corpus = list(_CORPUS) + [t.system for t in TEMPLATES.values()]
    corpus = [text.replace("</s>", " ").replace("<s>", " ") for text in corpus]
    specials = ["<unk>", "<s>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if chatml else [])
    tokenizer = train_llama_like_bpe(corpus, vocab_size, special_tokens=specials,
                                     added_tokens=["<image>", "<pad>"], extra_alphabet="<>|/[]_",
                                     add_bos=not chatml)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=None if chatml else "<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>",
    )


def solid_image(index: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """An RGB image of one colour that encodes `index` (recoverable with `solid_index`)."""
    return Image.new("RGB", size, (index % 256, (index // 256) % 256, 200))


def write_dataset(directory: str, records: Sequence[dict], images: dict, name: str = "data.json") -> dict:
    """Write records as a LLaVA JSON file and `images` ({file name: PIL image or bytes}) into
    directory/images. Returns {"json": path, "image_root": path}."""
    image_root = os.path.join(directory, "images")
    os.makedirs(image_root, exist_ok=True)
    for file_name, image in images.items():
        path = os.path.join(image_root, file_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(image, (bytes, bytearray)):
            with open(path, "wb") as handle:
                handle.write(image)
        else:
            image.save(path)
    json_path = os.path.join(directory, name)
    with open(json_path, "w") as handle:
        json.dump(list(records), handle)
    return {"json": json_path, "image_root": image_root}


def numbered_records(count: int, text_only_every: int = 0, rounds: int = 1) -> tuple[list, dict]:
    """`count` valid records whose answers name their index ("item7"), with a solid image
    encoding the index (every `text_only_every`-th record has no image)."""
    records, images = [], {}
    for index in range(count):
        has_image = not (text_only_every and index % text_only_every == 0)
        conversations = []
        for round_index in range(rounds):
            question = f"Question {round_index} about item{index}?" + " more" * (index % 7)
            if has_image and round_index == 0:
                question = f"<image>\n{question}"
            conversations.append({"from": "human", "value": question})
            conversations.append({"from": "gpt", "value": f"item{index}"})
        record = {"id": f"r{index}", "conversations": conversations}
        if has_image:
            record["image"] = f"img{index}.png"
            images[record["image"]] = solid_image(index)
        records.append(record)
    return records, images
