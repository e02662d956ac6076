"""llava_jax.chat: the CLI driven through stdin (subprocess) and the session in-process, on a
tiny random checkpoint saved with the demo tokenizer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llava_jax import chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What color is the shape?"


@pytest.fixture(scope="module")
def checkpoint(tiny_demo_checkpoint):
    return tiny_demo_checkpoint


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def pretrained(checkpoint):
    from llava_jax.checkpoint import load_pretrained

    return load_pretrained(checkpoint)


def _run_cli(args, stdin=""):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llava_jax.chat", *args], input=stdin,
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _expected_greedy(pretrained, image_path, question, history=(), max_new_tokens=6,
                     template="vicuna_v1"):
    """The answer computed directly with generate(), the way the CLI should compute it."""
    from llava_jax.data import (decode_image, get_template, preprocess_image,
                                tokenize_generation_prompt)
    from llava_jax.inference.generation import decode_new_tokens, generate

    config = pretrained.config
    ids = tokenize_generation_prompt(question, pretrained.tokenizer, template,
                                     config.num_image_tokens, config.image_token_index,
                                     history=history)
    pixels = preprocess_image(decode_image(image_path), config.vision.image_size,
                              config.image_aspect)[None, None]
    tokens = generate(pretrained.model, ids[None], pixels, max_new_tokens=max_new_tokens)
    stop = get_template(template).stop_str
    return decode_new_tokens(tokens[0], pretrained.tokenizer, stop_strings=[stop] if stop else [])


def test_prompt_flag_prints_the_greedy_answer(checkpoint, image_path, pretrained):
    result = _run_cli([f"--checkpoint={checkpoint}", f"--image={image_path}",
                       f"--prompt={QUESTION}", "--temperature=0", "--max-new-tokens=6"])
    assert result.returncode == 0, result.stderr
    expected = _expected_greedy(pretrained, image_path, f"<image>\n{QUESTION}")
    assert result.stdout.rstrip("\n") == expected


def test_interactive_stdin_with_reset_and_quit(checkpoint, image_path):
    script = f"{QUESTION}\nAre you sure?\n/reset\n{QUESTION}\n/bogus\n/quit\nnot asked\n"
    result = _run_cli([f"--checkpoint={checkpoint}", f"--image={image_path}",
                       "--temperature=0", "--max-new-tokens=6"], stdin=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    answers = [part.split("\n")[0] for part in out.split("ASSISTANT: ")[1:]]
    assert len(answers) == 3  # nothing after /quit
    assert "[conversation reset]" in out and "commands: /image PATH" in out
    # After /reset the same question meets the same (empty) history: same greedy answer.
    assert answers[2] == answers[0]


def test_session_history_streaming_and_image_turns(pretrained, image_path):
    session = chat.ChatSession(pretrained.model, pretrained.tokenizer, temperature=0.0,
                               max_new_tokens=6)
    session.set_image(image_path)
    pieces = []
    first = session.ask(QUESTION, on_text=pieces.append)
    assert "".join(pieces) == first
    assert first == _expected_greedy(pretrained, image_path, f"<image>\n{QUESTION}")
    second = session.ask("Are you sure?")
    assert [q for q, _ in session.history] == [f"<image>\n{QUESTION}", "Are you sure?"]
    # The second turn is generated with the first round (and its image) in the prompt.
    assert second == _expected_greedy(pretrained, image_path, "Are you sure?",
                                      history=[(f"<image>\n{QUESTION}", first)])
    session.set_image(image_path)
    assert session.history == []


def test_prompts_file_answers_each_line(checkpoint, image_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question_id": "a", "text": QUESTION}) + "\n"
                       + json.dumps({"text": "Which shape?", "image": image_path}) + "\n")
    assert chat.main([f"--checkpoint={checkpoint}", f"--image={image_path}",
                      f"--prompts={prompts}", "--temperature=0", "--max-new-tokens=4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["question_id"] for line in lines] == ["a", 1]
    assert [line["prompt"] for line in lines] == [QUESTION, "Which shape?"]
    assert all(isinstance(line["text"], str) for line in lines)


def test_clear_errors(checkpoint, tmp_path, capsys):
    assert chat.main([f"--checkpoint={tmp_path / 'absent'}", "--prompt=hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert chat.main([f"--checkpoint={checkpoint}", f"--image={tmp_path / 'x.png'}",
                      "--prompt=hi"]) == 2
    assert "not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG garbage")
    assert chat.main([f"--checkpoint={checkpoint}", f"--image={corrupt}", "--prompt=hi"]) == 2
    assert "cannot decode image" in capsys.readouterr().err


def _workdir_with_template(checkpoint, directory, template):
    """A copy of the checkpoint that says, as a training workdir does, which template it
    trained with."""
    import shutil

    shutil.copytree(checkpoint, directory)
    (directory / "train_config.json").write_text(json.dumps({"data": {"template": template}}))
    return directory


def test_the_template_defaults_to_the_one_the_checkpoint_trained_with(
        checkpoint, image_path, pretrained, tmp_path, capsys):
    # A random model's greedy answer depends on the prompt, so the two templates must give
    # different answers here for the check below to mean anything.
    question = f"<image>\n{QUESTION}"
    plain = _expected_greedy(pretrained, image_path, question, template="plain")
    assert plain != _expected_greedy(pretrained, image_path, question)
    workdir = _workdir_with_template(checkpoint, tmp_path / "plain_run", "plain")
    args = [f"--checkpoint={workdir}", f"--image={image_path}", f"--prompt={QUESTION}",
            "--temperature=0", "--max-new-tokens=6"]
    assert chat.main(args) == 0
    assert capsys.readouterr().out.rstrip("\n") == plain

    bad = _workdir_with_template(checkpoint, tmp_path / "typo_run", "vicuna_v9")
    assert chat.main([f"--checkpoint={bad}", "--prompt=hi"]) == 2
    error = capsys.readouterr().err
    assert "vicuna_v9" in error and "--template" in error
    # An explicit --template overrides what the workdir says.
    assert chat.main([f"--checkpoint={bad}", "--template=vicuna_v1", "--prompt=hi",
                      "--max-new-tokens=2"]) == 0


@pytest.mark.parametrize("preset,template", [
    ("llava-v1.5-7b", "vicuna_v1"), ("llava-llama-3-8b", "llava_llama_3"),
    ("llava-mistral-7b", "mistral_instruct"), ("llava-qwen2-0.5b", "qwen_1_5")])
def test_a_converted_model_gets_its_decoder_familys_template(preset, template, tmp_path):
    from llava_jax.checkpoint import CONFIG_FILE, checkpoint_template
    from llava_jax.models.config import get_preset

    (tmp_path / CONFIG_FILE).write_text(json.dumps(get_preset(preset).to_dict()))
    assert checkpoint_template(tmp_path) == template
