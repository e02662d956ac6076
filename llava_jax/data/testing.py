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


# Special tokens of the byte-level BPE families (Llama 3's tiktoken-style and Qwen2's).
LLAMA_3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_byte_level_tokenizer(family: str, vocab_size: int = 600):
    """A PreTrainedTokenizerFast in the style of Llama 3 ("llama3") or Qwen2 ("qwen2"):
    byte-level BPE (no word-prefix space, "\\n" its own token), the family's special tokens
    after the learned vocabulary, then <image> and <pad>. Llama 3 style prepends
    <|begin_of_text|> (its post-processor); Qwen style adds nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = {"llama3": LLAMA_3_SPECIALS, "qwen2": QWEN_SPECIALS}[family]
    # Paragraph breaks often enough that "\\n\\n" becomes one token, as in both real vocabularies.
    corpus = list(_CORPUS) + [t.system for t in TEMPLATES.values()] + ["one\n\ntwo\n"] * 50
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens(list(specials) + ["<image>", "<pad>"])
    if family == "llama3":
        bos = specials[0]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokenizer.token_to_id(bos))])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos,
                                       eos_token="<|eot_id|>", pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<pad>")


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
