"""LLaVA-NeXT-era templates (llava_llama_3, qwen_1_5, mistral_instruct, chatml_direct): ids and
labels equal what LLaVA-NeXT's preprocessing trains on, re-derived here its way (message by
message for Llama 3 / Qwen, the separator-splitting arithmetic for the other two), with
tokenizers built in the real ones' style."""

import numpy as np
import pytest

from llava_jax.data import tokenize_conversation, tokenize_generation_prompt
from llava_jax.data.conversation import IMAGE_TOKEN, get_template
from llava_jax.data.testing import build_byte_level_tokenizer, build_test_tokenizer
from llava_jax.data.tokenize import IGNORE_INDEX, normalize_conversation, span_encoder

IMAGE_ID = 9999
ROUNDS = [
    {"from": "human", "value": "What is in the image?\n<image>"},
    {"from": "gpt", "value": "A cat.\n\nIt is black. "},  # trailing space: Llama 3 strips it
    {"from": "human", "value": "What color\nis it?"},
    {"from": "gpt", "value": "Black."},
]


def next_placement(text):
    """LLaVA-NeXT's preprocess_multimodal: a lone <image> goes to the front of its turn."""
    if text.count(IMAGE_TOKEN) == 1 and not text.startswith(IMAGE_TOKEN):
        text = (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()
    return text


def next_chat_reference(conversations, tokenizer, family):
    """preprocess_llama3 / preprocess_qwen as LLaVA-NeXT runs them: each message rendered by
    the chat template and tokenized alone; assistant messages trained whole; then the unmask
    list's ids trained wherever they occur."""
    if family == "llama3":
        render = lambda role, text: (f"<|start_header_id|>{role}<|end_header_id|>\n\n"
                                     f"{text.strip()}<|eot_id|>")
        system = "<|begin_of_text|>" + render("system", get_template("llava_llama_3").system)
        unmask = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "\n\n"]
        unmask_ids = [tokenizer.convert_tokens_to_ids(t) for t in unmask]  # "\n\n": not a token
    else:
        render = lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n"
        system = render("system", "You are a helpful assistant.")
        unmask_ids = [198, *tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])]
        assert tokenizer.convert_ids_to_tokens(198) == "Ċ"  # "\n", as in Qwen's vocabulary
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    ids = encode(system)
    labels = [IGNORE_INDEX] * len(ids)
    for turn in conversations:
        role = {"human": "user", "gpt": "assistant"}[turn["from"]]
        message = encode(render(role, next_placement(turn["value"])))
        ids += message
        labels += message if role == "assistant" else [IGNORE_INDEX] * len(message)
    labels = [token if token in unmask_ids else label for token, label in zip(ids, labels)]
    image = tokenizer.convert_tokens_to_ids("<image>")
    return [IMAGE_ID if t == image else t for t in ids], labels


@pytest.mark.parametrize("name,family", [("llava_llama_3", "llama3"), ("qwen_1_5", "qwen2")])
def test_llama_3_and_qwen_labels_equal_llava_next_preprocessing(name, family):
    tokenizer = build_byte_level_tokenizer(family)
    out = tokenize_conversation(ROUNDS, tokenizer, name, 1, IMAGE_ID, None)
    ids, labels = next_chat_reference(ROUNDS, tokenizer, family)
    np.testing.assert_array_equal(out["input_ids"], ids)
    # The original also labels the first token (<|begin_of_text|> / <|im_start|>); no position
    # predicts it, so it is -100 here and the loss is the same.
    assert labels[0] == ids[0] and out["labels"][0] == IGNORE_INDEX
    np.testing.assert_array_equal(out["labels"][1:], labels[1:])
    trained = tokenizer.decode(out["input_ids"][out["labels"] != IGNORE_INDEX])
    if family == "qwen2":
        # Assistant messages whole, plus <|im_start|>, <|im_end|> and every "\n" of the other turns.
        assert "<|im_start|>assistant\nA cat.\n\nIt is black. <|im_end|>\n" in trained
        assert trained.count("\n") > 6
    else:
        assert "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.\n\nIt is black.<|eot_id|>" \
            in trained and "system" not in trained and "user" not in trained


@pytest.mark.parametrize("name,family", [("llava_llama_3", "llama3"), ("qwen_1_5", "qwen2")])
def test_generation_prompt_is_the_training_prefix(name, family):
    tokenizer = build_byte_level_tokenizer(family)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    out = tokenize_conversation(ROUNDS[:2], tokenizer, name, 3, image_id, None)
    prompt = tokenize_generation_prompt("<image>\nWhat is in the image?", tokenizer, name, 3,
                                        image_id)
    header = span_encoder(tokenizer).encode(
        "<|start_header_id|>assistant<|end_header_id|>\n\n" if family == "llama3"
        else "<|im_start|>assistant\n", call_start=False)[0]
    first_answer = int(np.flatnonzero(out["input_ids"] == image_id)[-1])
    start = next(i for i in range(first_answer, len(out["input_ids"]))
                 if list(out["input_ids"][i:i + len(header)]) == header)
    np.testing.assert_array_equal(prompt, out["input_ids"][:start + len(header)])
    assert get_template(name).stop_str == ("<|eot_id|>" if family == "llama3" else "<|im_end|>")


def test_several_images_stay_in_place_for_next_templates():
    conversations = [{"from": "human", "value": "Compare <image> and <image>."},
                     {"from": "gpt", "value": "Same."}]
    rounds = normalize_conversation(conversations, get_template("qwen_1_5"))
    assert rounds[0][0] == "Compare <image> and <image>."
    assert normalize_conversation(conversations, get_template("vicuna_v1"))[0][0] \
        .startswith("<image>\n<image>\n")


def separator_arithmetic_labels(prompt, encode, *, split, instruction_end, offset):
    """LLaVA-NeXT's preprocess_llama_2 (mistral_instruct) and preprocess_mpt (chatml_direct)
    masking: split the prompt into rounds, count each round's and instruction's tokens alone,
    mask the instructions; the sample must add up or the original masks it all."""
    ids = encode(prompt)
    target = list(ids)
    target[:1] = [IGNORE_INDEX]
    cur = 1
    pieces = prompt.split(split)
    if split == "<|im_end|>":  # mpt: system + first user turn + first answer, then pairs
        pieces = [split.join(pieces[:3])] + [split.join(pieces[i:i + 2])
                                             for i in range(3, len(pieces), 2)]
    for rou in pieces:
        if rou == "":
            break
        parts = rou.split(instruction_end)
        if len(parts) != 2:
            break
        round_len = len(encode(rou))
        instruction_len = len(encode(parts[0] + instruction_end)) - offset
        target[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "the original would have masked this sample entirely"
    return ids, target


@pytest.fixture(scope="module")
def llama_style():
    """Mistral's tokenizer is Llama's SentencePiece style: the Llama-2 tokenizer in ../shared."""
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    path = Path(__file__).resolve().parents[1].parent / "shared/assets/llama2-tokenizer/tokenizer.json"
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is absent)")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("name", ["mistral_instruct", "chatml_direct"])
def test_mistral_instruct_and_chatml_direct_labels_equal_llava_next_arithmetic(name, request):
    chatml = name == "chatml_direct"
    tokenizer = build_test_tokenizer(chatml=True) if chatml else request.getfixturevalue(
        "llama_style")
    # chatml_direct: one round (a ChatML tokenizer without BOS makes the original's second-round
    # count one short, and it masks such samples entirely).
    conversations = ROUNDS[:2] if chatml else ROUNDS
    template = get_template(name)
    out = tokenize_conversation(conversations, tokenizer, name, 1, IMAGE_ID, None)
    prompt = template.render(normalize_conversation(conversations, template))
    encoder = span_encoder(tokenizer)
    encode = lambda text: encoder.encode_prompt(text, IMAGE_ID, 1)
    if chatml:
        ids, labels = separator_arithmetic_labels(
            prompt, encode, split="<|im_end|>", instruction_end="<|im_end|><|im_start|>assistant\n",
            offset=1)
    else:
        ids, labels = separator_arithmetic_labels(prompt, encode, split="</s>",
                                                  instruction_end="[/INST] ", offset=2)
    np.testing.assert_array_equal(out["input_ids"], ids)
    np.testing.assert_array_equal(out["labels"], labels)
