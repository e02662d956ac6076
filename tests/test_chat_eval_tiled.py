"""llava_jax.chat and llava_jax.eval on tiled checkpoints (LLaVA-NeXT "anyres" over CLIP,
OneVision "anyres_max_2" over SigLIP): tiny random models saved with the demo tokenizer. The
CLIs' greedy answers must equal `generate(model, **processor(text=[rendered prompt],
images=[[image]]))`, for images of two aspect ratios (different tile grids and placeholder
counts). The serving engine is flat-only: the server refuses a tiled checkpoint at start-up.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import IMAGE_TOKEN, get_template
from llava_jax.inference.batch import Prompt, build_inputs, load_image
from llava_jax.inference.generation import decode_new_tokens, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What is in the picture?"
TEMPLATE = "vicuna_v1"  # what checkpoint_template gives these (Llama-like, small vocabulary)
NEW_TOKENS = 6
# (height, width): wide and tall, so the tile grids (and placeholder counts) differ.
SIZES = {"wide.png": (50, 90), "tall.png": (90, 50)}


def _next_config(tok):
    from llava_jax.models.config import get_preset

    return get_preset("tiny", text={"vocab_size": len(tok)},
                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                      pad_token_id=tok.pad_token_id, image_aspect="anyres",
                      mm_patch_merge_type="spatial_unpad",
                      image_grid_pinpoints=((64, 32), (32, 64), (64, 64)))


def _onevision_config(tok):
    from llava_jax.models.config import VisionConfig

    # 32 px SigLIP tiles of 8 px patches; 50 x 90 gets 2 x 3 tiles whose unpadded grid is
    # more than 1.1^2 x 2 tiles' worth of features: shrunk (bilinear index / weight).
    siglip = VisionConfig(model_type="siglip_vision_model", hidden_size=48,
                          intermediate_size=80, num_layers=2, num_heads=3, image_size=32,
                          patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                          use_head=False)
    return _next_config(tok).replace(
        vision=siglip, image_aspect="anyres_max_2", vision_feature_layer=-1,
        vision_feature_select_strategy="cls_patch",
        image_grid_pinpoints=tuple((32 * i, 32 * j) for i in range(1, 4) for j in range(1, 4)))


@pytest.fixture(scope="module", params=["next", "onevision"])
def checkpoint(request, tmp_path_factory):
    from llava_jax.checkpoint import save_model
    from llava_jax.data import demo
    from llava_jax.models.llava import create_model

    tok = demo.load_tokenizer()
    config = {"next": _next_config, "onevision": _onevision_config}[request.param](tok)
    assert config.anyres
    return str(save_model(create_model(config, seed=1),
                          tmp_path_factory.mktemp(request.param) / "tiled", tokenizer=tok))


@pytest.fixture(scope="module")
def pretrained(checkpoint):
    from llava_jax.checkpoint import load_pretrained

    return load_pretrained(checkpoint)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (height, width) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
            folder / name)
    return folder


def _run(module, args):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def _rendered(question):
    """The generation prompt chat / eval build for a first turn (no history)."""
    return get_template(TEMPLATE).generation_prompt(question, [])


def _expected(pretrained, rows):
    """Greedy answers through the checkpoint's processor: rows of (user turn, image path or
    None), one processor batch (right-padded, tiles padded to the batch's largest image)."""
    texts = [_rendered(text) for text, _ in rows]
    images = [[Image.open(path)] if path else [] for _, path in rows]
    batch = pretrained.processor(text=texts, images=images)
    tokens = generate(pretrained.model, **batch, max_new_tokens=NEW_TOKENS)
    stop = get_template(TEMPLATE).stop_str
    eos = pretrained.config.eos_token_id
    return [decode_new_tokens(row, pretrained.tokenizer, eos_token_id=eos, stop_strings=[stop])
            for row in tokens]


def test_build_inputs_equal_the_processors(pretrained, images):
    """The tiled path of inference.batch gives the processor's arrays exactly: each image's
    own placeholder count and tiles (not one count for every image)."""
    question = f"{IMAGE_TOKEN}\n{QUESTION}"
    counts = []
    for name in SIZES:
        image = load_image(str(images / name))
        ours = build_inputs([Prompt(question, image=image)], pretrained.tokenizer, TEMPLATE,
                            pretrained.config, pretrained.processor)
        theirs = pretrained.processor(text=[_rendered(question)], images=[[image]])
        np.testing.assert_array_equal(ours.input_ids, theirs["input_ids"])
        np.testing.assert_array_equal(ours.attention_mask, theirs["attention_mask"])
        np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values"])
        np.testing.assert_array_equal(ours.image_feature_index, theirs["image_feature_index"])
        np.testing.assert_array_equal(ours.image_feature_weight, theirs["image_feature_weight"])
        assert ours.image_mask is None
        counts.append(int((ours.input_ids == pretrained.config.image_token_index).sum()))
    assert counts[0] != counts[1]  # the two aspect ratios take different layouts
    assert min(counts) > pretrained.config.num_image_tokens  # tiled: more than one tile's


def test_build_inputs_mixed_batch_and_bad_input(pretrained, images):
    image = load_image(str(images / "wide.png"))
    inputs = build_inputs([Prompt("Hello."), Prompt(f"{IMAGE_TOKEN}\nHi", image=image)],
                          pretrained.tokenizer, TEMPLATE, pretrained.config)
    assert inputs.pixel_values.ndim == 6 and inputs.pixel_values.shape[:2] == (2, 1)
    assert not inputs.image_feature_weight[0].any()  # the text-only row has no sources
    text_only = build_inputs([Prompt("Hello.")], pretrained.tokenizer, TEMPLATE,
                             pretrained.config)
    assert text_only.pixel_values is None and text_only.image_feature_index is None
    size = pretrained.config.vision.image_size
    with pytest.raises(ValueError, match="Prompt.image"):
        build_inputs([Prompt(f"{IMAGE_TOKEN}\nHi", pixels=np.zeros((size, size, 3)))],
                     pretrained.tokenizer, TEMPLATE, pretrained.config)


def test_chat_cli_matches_generate_on_the_processors_inputs(checkpoint, pretrained, images,
                                                            tmp_path):
    wide, tall = str(images / "wide.png"), str(images / "tall.png")
    expected = {path: _expected(pretrained, [(f"{IMAGE_TOKEN}\n{QUESTION}", path)])[0]
                for path in (wide, tall)}
    flags = [f"--checkpoint={checkpoint}", "--temperature=0", f"--max-new-tokens={NEW_TOKENS}"]
    result = _run("llava_jax.chat", [*flags, f"--image={wide}", f"--prompt={QUESTION}"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected[wide]
    # Both aspect ratios in one run (a /image switch per line), and a text-only line.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in (
        {"text": QUESTION, "image": tall}, {"text": QUESTION, "image": wide})))
    result = _run("llava_jax.chat", [*flags, f"--prompts={prompts}"])
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line)["text"] for line in result.stdout.splitlines()]
    assert answers == [expected[tall], expected[wide]]


def test_chat_session_second_turn_repeats_the_tiled_image(pretrained, images):
    from llava_jax import chat

    session = chat.ChatSession(pretrained.model, pretrained.tokenizer, template=TEMPLATE,
                               temperature=0.0, max_new_tokens=NEW_TOKENS,
                               processor=pretrained.processor)
    session.set_image(str(images / "tall.png"))
    first = session.ask(QUESTION)
    second = session.ask("Are you sure?")
    history = [(f"{IMAGE_TOKEN}\n{QUESTION}", first)]
    batch = pretrained.processor(
        text=[get_template(TEMPLATE).generation_prompt("Are you sure?", history)],
        images=[[Image.open(images / "tall.png")]])
    tokens = generate(pretrained.model, **batch, max_new_tokens=NEW_TOKENS)
    assert second == decode_new_tokens(tokens[0], pretrained.tokenizer,
                                       eos_token_id=pretrained.config.eos_token_id,
                                       stop_strings=[get_template(TEMPLATE).stop_str])


def test_chat_missing_and_corrupt_images_are_chat_errors(checkpoint, tmp_path, capsys):
    from llava_jax import chat

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG garbage")
    assert chat.main([f"--checkpoint={checkpoint}", f"--image={corrupt}", "--prompt=hi"]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    assert chat.main([f"--checkpoint={checkpoint}", f"--image={tmp_path / 'x.png'}",
                      "--prompt=hi"]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_cli_matches_generate_on_the_processors_inputs(checkpoint, pretrained, images,
                                                            tmp_path):
    questions = [{"question_id": "wide", "image": "wide.png", "text": QUESTION},
                 {"question_id": "tall", "image": "tall.png", "text": QUESTION},
                 {"question_id": "text", "text": "Say something."}]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    output = tmp_path / "answers.jsonl"
    result = _run("llava_jax.eval", [
        "--task=vqa", f"--checkpoint={checkpoint}", f"--data={data}",
        f"--image-folder={images}", f"--output={output}", "--batch-size=3",
        f"--max-new-tokens={NEW_TOKENS}", "--no-short-answer-prompt", "--no-progress"])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    answers = {record["question_id"]: record["text"] for record in records}
    # The same three rows as one processor batch (eval's batch of 3).
    expected = _expected(pretrained, [(f"{IMAGE_TOKEN}\n{QUESTION}", images / "wide.png"),
                                      (f"{IMAGE_TOKEN}\n{QUESTION}", images / "tall.png"),
                                      ("Say something.", None)])
    assert [answers["wide"], answers["tall"], answers["text"]] == expected


def test_the_server_refuses_a_tiled_checkpoint_at_start_up(checkpoint, pretrained):
    from llava_jax.inference.engine import Engine

    result = _run("llava_jax.serve", [f"--checkpoint={checkpoint}", "--port=0"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "tiled" in lines[0], \
        result.stderr
    with pytest.raises(ValueError, match="flat models only"):
        Engine(pretrained.model, pretrained.tokenizer)
