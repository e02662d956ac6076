"""tokenize_conversation reproduces what the original LLaVA trained on (slow Llama tokenizer,
legacy=False), with labels on answers + closing separators only."""

import re
from pathlib import Path

import numpy as np
import pytest

from llava_jax.data import TokenizationError, tokenize_conversation, tokenize_generation_prompt
from llava_jax.data.conversation import TEMPLATES, VICUNA_SYSTEM, get_template
from llava_jax.data.testing import build_test_tokenizer
from llava_jax.data.tokenize import IGNORE_INDEX, span_encoder

LLAMA_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/assets/llama2-tokenizer/tokenizer.json"
IMAGE_ID = 32000
TWO_ROUNDS = [
    {"from": "human", "value": "What is in the image?\n<image>"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "What color is it?"},
    {"from": "gpt", "value": "Black."},
]


@pytest.fixture(scope="module")
def llama():
    if not LLAMA_TOKENIZER.exists():
        pytest.skip(f"{LLAMA_TOKENIZER} not present (../shared is absent)")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(LLAMA_TOKENIZER), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def test_tokenizer():
    return build_test_tokenizer()


@pytest.fixture(scope="module")
def chatml_tokenizer():
    return build_test_tokenizer(chatml=True)


def pieces_to_ids(tokenizer, pieces):
    return [IMAGE_ID if piece == "IMG" else tokenizer.convert_tokens_to_ids(piece) for piece in pieces]


# ---- real Llama-2 / Vicuna v1.5 tokenizer -----------------------------------------------------


def test_vicuna_v1_ids_and_labels_match_the_slow_tokenizer(llama):
    out = tokenize_conversation(TWO_ROUNDS, llama, "vicuna_v1", num_image_tokens=3,
                                image_token_index=IMAGE_ID, max_length=None)
    # What LLaVA-1.5 trained on: the slow tokenizer prefixes "▁" at the start of each
    # tokenizer_image_token chunk ("▁" "<0x0A>" after the image) and never after "</s>" ("USER").
    system = llama.tokenize(VICUNA_SYSTEM)
    masked_head = ["<s>", *system, "▁US", "ER", ":", "▁", "IMG", "IMG", "IMG", "▁", "<0x0A>", "What",
                   "▁is", "▁in", "▁the", "▁image", "?", "▁A", "SS", "IST", "ANT", ":"]
    answer1 = ["▁A", "▁cat", ".", "</s>"]
    masked_mid = ["USER", ":", "▁What", "▁color", "▁is", "▁it", "?", "▁A", "SS", "IST", "ANT", ":"]
    answer2 = ["▁Black", ".", "</s>"]
    expected = pieces_to_ids(llama, masked_head + answer1 + masked_mid + answer2)
    assert out["input_ids"].dtype == np.int32 and out["labels"].dtype == np.int32
    np.testing.assert_array_equal(out["input_ids"], expected)
    trained = [False] * len(masked_head) + [True] * 4 + [False] * len(masked_mid) + [True] * 3
    np.testing.assert_array_equal(out["labels"], np.where(trained, expected, IGNORE_INDEX))
    # The fast tokenizer over the whole prompt writes "▁US" "ER" after "</s>" instead.
    fast = llama(get_template("vicuna_v1").render([("q", "A cat."), ("r", "b")]))["input_ids"]
    assert llama.convert_tokens_to_ids("USER") in expected and 11889 not in fast


def original_v1_labels(prompt, encode):
    """The original preprocess_v1 masking arithmetic (legacy=False, tokenizers >= 0.14)."""
    ids = encode(prompt)
    target = list(ids)
    cur_len = 1
    target[:1] = [IGNORE_INDEX]
    for index, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        parts[0] += " ASSISTANT: "
        round_len, instruction_len = len(encode(rou)), len(encode(parts[0])) - 2
        if index != 0:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    assert cur_len == len(ids), "the original would have masked this sample entirely"
    return ids, target


def test_vicuna_v1_labels_equal_the_original_masking_arithmetic(llama):
    conversations = TWO_ROUNDS + [{"from": "human", "value": "Is it  happy?"},
                                  {"from": "gpt", "value": "Yes, 2 of them.\nDone"}]
    out = tokenize_conversation(conversations, llama, "vicuna_v1", 1, IMAGE_ID, None)
    template = get_template("vicuna_v1")
    from llava_jax.data.tokenize import normalize_conversation

    prompt = template.render(normalize_conversation(conversations, template))
    encoder = span_encoder(llama)
    ids, labels = original_v1_labels(prompt, lambda text: encoder.encode_prompt(text, IMAGE_ID, 1))
    np.testing.assert_array_equal(out["input_ids"], ids)
    np.testing.assert_array_equal(out["labels"], labels)


def test_plain_with_llama(llama):
    out = tokenize_conversation(TWO_ROUNDS[:2], llama, "plain", 2, IMAGE_ID, None)
    expected = pieces_to_ids(llama, ["<s>", "IMG", "IMG", "▁A", "▁cat", ".", "<0x0A>"])
    np.testing.assert_array_equal(out["input_ids"], expected)
    np.testing.assert_array_equal(out["labels"], [IGNORE_INDEX] * 3 + expected[3:])


def test_llava_llama_2_second_round_with_llama(llama):
    out = tokenize_conversation(TWO_ROUNDS, llama, "llava_llama_2", 1, IMAGE_ID, None)
    tail = ["</s>", "<s>", "[", "INST", "]", "▁What", "▁color", "▁is", "▁it", "?", "▁[", "/", "INST",
            "]", "▁Black", ".", "▁", "</s>"]
    np.testing.assert_array_equal(out["input_ids"][-len(tail):], pieces_to_ids(llama, tail))
    trained = pieces_to_ids(llama, ["▁A", "▁cat", ".", "▁", "</s>", "▁Black", ".", "▁", "</s>"])
    np.testing.assert_array_equal(out["labels"][out["labels"] != IGNORE_INDEX], trained)


def test_mpt_on_a_llama_tokenizer_is_refused_not_mislabelled(llama):
    # "<|im_end|><|im_start|>" is plain text for Llama: the "><" merge crosses a turn boundary.
    with pytest.raises(TokenizationError) as error:
        tokenize_conversation(TWO_ROUNDS, llama, "mpt", 1, IMAGE_ID, None)
    assert error.value.reason == "unfaithful_tokenization"


# ---- tokenizers built here (always run) --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_trains_exactly_answers_and_separators(name, test_tokenizer, chatml_tokenizer):
    style = TEMPLATES[name].style
    tokenizer = chatml_tokenizer if style == "mpt" else test_tokenizer
    if style in ("llama_3", "chatml"):  # byte-level vocabularies (test_data_next_templates.py)
        from llava_jax.data.testing import build_byte_level_tokenizer

        tokenizer = build_byte_level_tokenizer("llama3" if style == "llama_3" else "qwen2")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    conversations = TWO_ROUNDS[:2] if name == "plain" else TWO_ROUNDS
    out = tokenize_conversation(conversations, tokenizer, name, 5, image_id, None)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.shape == labels.shape and ids.ndim == 1
    # One run of 5 image placeholders, never trained.
    runs = np.flatnonzero(ids == image_id)
    np.testing.assert_array_equal(runs, np.arange(runs[0], runs[0] + 5))
    assert (labels[runs] == IGNORE_INDEX).all()
    trained = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[trained], ids[trained])
    text = tokenizer.decode(labels[trained])
    expected = {"plain": "A cat.\n", "two": "A cat.</s> Black.</s>",
                "llama_2": "A cat. </s> Black. </s>", "mpt": "A cat.<|im_end|>Black.<|im_end|>",
                # Whole assistant messages plus the turn-structure tokens of every turn.
                "llama_3": "<|start_header_id|><|end_header_id|><|eot_id|><|start_header_id|>"
                           "<|end_header_id|><|eot_id|><|start_header_id|>assistant"
                           "<|end_header_id|>\n\nA cat.<|eot_id|><|start_header_id|>"
                           "<|end_header_id|><|eot_id|><|start_header_id|>assistant"
                           "<|end_header_id|>\n\nBlack.<|eot_id|>"}
    if style == "chatml":
        assert "<|im_start|>assistant\nA cat.<|im_end|>\n" in text
        assert text.endswith("<|im_start|>assistant\nBlack.<|im_end|>\n")
    else:
        assert text == expected[style]
    bos = tokenizer.bos_token_id
    assert (ids[0] == bos) == (bos is not None) and labels[0] == IGNORE_INDEX


def test_after_eos_the_next_turn_has_no_word_prefix(test_tokenizer):
    # Like the slow tokenizer: "</s>USER" -> "USER", where the fast tokenizer writes "▁USER".
    out = tokenize_conversation(TWO_ROUNDS, test_tokenizer, "vicuna_v1", 1, 999, None)
    eos_positions = np.flatnonzero(out["input_ids"] == test_tokenizer.eos_token_id)
    after_eos = test_tokenizer.convert_ids_to_tokens(int(out["input_ids"][eos_positions[0] + 1]))
    assert not after_eos.startswith("▁")
    fast = test_tokenizer(get_template("vicuna_v1").render([("a", "b"), ("c", "d")]))["input_ids"]
    fast_after = test_tokenizer.convert_ids_to_tokens(fast[fast.index(test_tokenizer.eos_token_id) + 1])
    assert fast_after.startswith("▁")


def test_image_moves_to_the_front_and_multiple_images(test_tokenizer):
    conversations = [{"from": "human", "value": "Compare <image> and <image> please"},
                     {"from": "gpt", "value": "Same."}]
    out = tokenize_conversation(conversations, test_tokenizer, "vicuna_v1", 2, 999, None)
    ids = out["input_ids"].tolist()
    first = ids.index(999)
    assert ids[first : first + 2] == [999, 999] and ids[first + 2] != 999  # "\n" between images
    assert ids.count(999) == 4
    from llava_jax.data.tokenize import normalize_conversation

    rounds = normalize_conversation(conversations, get_template("vicuna_v1"))
    assert rounds[0][0] == "<image>\n<image>\nCompare  and  please"  # as preprocess_multimodal


def test_truncation_keeps_images_whole(test_tokenizer):
    full = tokenize_conversation(TWO_ROUNDS, test_tokenizer, "vicuna_v1", 4, 999, None)
    n = len(full["input_ids"])
    cut = tokenize_conversation(TWO_ROUNDS, test_tokenizer, "vicuna_v1", 4, 999, n - 3)
    np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][: n - 3])
    image_end = int(np.flatnonzero(full["input_ids"] == 999)[-1])
    with pytest.raises(TokenizationError) as error:
        tokenize_conversation(TWO_ROUNDS, test_tokenizer, "vicuna_v1", 4, 999, image_end)
    assert error.value.reason == "too_long"


@pytest.mark.parametrize("conversations, reason", [
    ([], "empty_conversation"),
    ([{"from": "gpt", "value": "orphan answer"}], "empty_conversation"),
    ([{"from": "human", "value": "q"}], "non_alternating"),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}], "non_alternating"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}], "image_in_answer"),
    ([{"from": "human"}, {"from": "gpt", "value": "a"}], "malformed_sample"),
    ([{"from": "system", "value": "q"}, {"from": "gpt", "value": "a"}], "malformed_sample"),
    ("not a list", "malformed_sample"),
])
def test_bad_conversations_raise_with_a_reason(conversations, reason, test_tokenizer):
    with pytest.raises(TokenizationError) as error:
        tokenize_conversation(conversations, test_tokenizer, "vicuna_v1", 1, 999, None)
    assert error.value.reason == reason


def test_leading_gpt_turn_is_dropped_like_the_original(test_tokenizer):
    with_lead = [{"from": "gpt", "value": "hello"}] + TWO_ROUNDS
    a = tokenize_conversation(with_lead, test_tokenizer, "vicuna_v1", 1, 999, None)
    b = tokenize_conversation(TWO_ROUNDS, test_tokenizer, "vicuna_v1", 1, 999, None)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_generation_prompt_ids_equal_the_training_prefix(test_tokenizer):
    out = tokenize_conversation(TWO_ROUNDS[:2], test_tokenizer, "vicuna_v1", 3, 999, None)
    prompt = tokenize_generation_prompt("<image>\nWhat is in the image?", test_tokenizer,
                                        "vicuna_v1", 3, 999)
    first_trained = int(np.flatnonzero(out["labels"] != IGNORE_INDEX)[0])
    np.testing.assert_array_equal(prompt, out["input_ids"][:first_trained])
    assert re.search(r"ASSISTANT:$", test_tokenizer.decode(prompt))


def test_one_placeholder_count_per_image():
    """Tiled models: each <image> takes its own count, in order; a wrong number of counts is a
    counted skip reason, not an IndexError."""
    from llava_jax.data.testing import build_test_tokenizer
    from llava_jax.data.tokenize import TokenizationError, tokenize_conversation

    tokenizer = build_test_tokenizer()
    image = tokenizer.convert_tokens_to_ids("<image>")
    conversations = [{"from": "human", "value": "<image>\n<image>\nWhich is the cat?"},
                     {"from": "gpt", "value": "The left one."}]
    out = tokenize_conversation(conversations, tokenizer, "vicuna_v1", [3, 5], image, None)
    ids = out["input_ids"]
    runs = np.split(np.flatnonzero(ids == image),
                    np.flatnonzero(np.diff(np.flatnonzero(ids == image)) > 1) + 1)
    assert [len(run) for run in runs] == [3, 5]
    assert (out["labels"][ids == image] == -100).all()
    same = tokenize_conversation(conversations, tokenizer, "vicuna_v1", 4, image, None)
    assert len(same["input_ids"]) == len(ids)  # 4 + 4 == 3 + 5
    with pytest.raises(TokenizationError) as error:
        tokenize_conversation(conversations, tokenizer, "vicuna_v1", [3], image, None)
    assert error.value.reason == "image_count_mismatch"
