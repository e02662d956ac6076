"""Template renderings equal the original llava/conversation.py strings (original-llava.md §4)."""

import pytest

from llava_jax.data import conversation
from llava_jax.data.conversation import get_template

S = conversation.VICUNA_SYSTEM
ONE = [("<image>\nWhat is in the image?", "A cat.")]
TWO = ONE + [("What color is it?", "Black.")]


def test_vicuna_v1_renderings():
    template = get_template("vicuna_v1")
    assert template.render(ONE) == S + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
    assert template.render(TWO) == (
        S + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
        "USER: What color is it? ASSISTANT: Black.</s>"
    )
    assert template.generation_prompt("<image>\nWhat is in the image?") == (
        S + " USER: <image>\nWhat is in the image? ASSISTANT:"
    )
    assert template.generation_prompt("What color is it?", history=ONE) == (
        template.render(ONE) + "USER: What color is it? ASSISTANT:"
    )
    assert template.stop_str == "</s>"
    assert get_template("v1").render(TWO) == template.render(TWO)


def test_llava_v1_uses_the_human_system_prompt():
    rendered = get_template("llava_v1").render(ONE)
    assert rendered.startswith("A chat between a curious human and an artificial intelligence")
    assert rendered.endswith(" USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>")


def test_plain_training_and_generation():
    template = get_template("plain")
    # preprocess_plain: the human text is discarded, "<image>" + caption + "\n".
    assert template.render([("anything <image>", "A cat.")]) == "<image>A cat.\n"
    assert template.generation_prompt("<image>\nWhat is in the image?") == "<image>\nWhat is in the image?\n"
    with pytest.raises(ValueError):  # the original raises TypeError: sep2 is None
        template.generation_prompt("again?", history=[("<image>", "A cat.")])
    assert template.stop_str == "\n"


def test_llava_llama_2_renderings():
    template = get_template("llava_llama_2")
    system = conversation.LLAVA_LLAMA_2_SYSTEM
    first = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST]"
    assert template.render(ONE) == first + " A cat. </s>"
    assert template.render(TWO) == first + " A cat. </s><s>[INST] What color is it? [/INST] Black. </s>"
    assert template.generation_prompt("<image>\nWhat is in the image?") == first
    assert template.generation_prompt("What color is it?", history=ONE).endswith(
        "A cat. </s><s>[INST] What color is it? [/INST]"
    )
    assert system.endswith("using natural language.")
    assert get_template("llama_2").render(ONE).startswith(
        "[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant."
    )


def test_mistral_instruct_has_no_system_and_no_bos_between_rounds():
    template = get_template("mistral_instruct")
    assert template.render(TWO) == (
        "[INST] <image>\nWhat is in the image? [/INST] A cat. </s>[INST] What color is it? [/INST] Black. </s>"
    )


@pytest.mark.parametrize("name, system", [
    ("chatml_direct", "<|im_start|>system\nAnswer the questions."),
    ("mpt", conversation.MPT_SYSTEM),
])
def test_chatml_renderings(name, system):
    template = get_template(name)
    assert template.render(ONE) == (
        system + "<|im_end|><|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>"
    )
    assert template.generation_prompt("Hi?") == (
        system + "<|im_end|><|im_start|>user\nHi?<|im_end|><|im_start|>assistant\n"
    )
    assert template.stop_str == "<|im_end|>"


@pytest.mark.parametrize("name", sorted(conversation.TEMPLATES))
def test_segments_concatenate_to_the_rendering_and_train_only_answers(name):
    template = get_template(name)
    rounds = ONE if name == "plain" else TWO
    segments = template.segments(rounds)
    assert "".join(s.text for s in segments) == template.render(rounds)
    trained = [s.text for s in segments if s.trained]
    assert len(trained) == len(rounds)
    for text, (_, answer) in zip(trained, rounds):
        assert answer in text and "<image>" not in text
        closing = {"two": "</s>", "llama_2": " </s>", "mpt": "<|im_end|>", "plain": "\n",
                   "llama_3": "<|eot_id|>", "chatml": "<|im_end|>\n"}[template.style]
        assert text.endswith(answer + closing)


def test_unknown_template_names_the_choices():
    with pytest.raises(ValueError, match="vicuna_v1"):
        get_template("vicuna_v2")
