"""Built-in demo data: synthetic shape scenes in the LLaVA formats, plus a tiny tokenizer.

Generated deterministically on first use (a few seconds) into a cache directory
(`cache_dir` argument, else $LLAVA_JAX_CACHE/demo, else ~/.cache/llava_jax/demo):

    images/                 64x64 PNG scenes: 1-4 large solid shapes of one colour on grey
    stage1.json             LLaVA-Pretrain-like captions ({"id","image","conversations"}, plain),
                            one per image (16000), naming colour, shape, count or position
    stage2.json             instruction data: single-round short-answer questions with
                            LLaVA-1.5's "Answer the question using a single word or phrase.",
                            one per question type of each image, plus ~5% text-only samples
                            (no "image" key)
    eval.jsonl              held-out images, one question each, as many per category,
                            model_vqa-like lines:
                            {"question_id", "image", "text", "answer", "category"} ("text" has
                            no <image>; prepend "<image>\\n" as model_vqa does)
    tokenizer/tokenizer.json  a Llama-like BPE tokenizer trained on this corpus

Every answer is one word that only the image determines: colour (6), shape (4), count (one ..
four) or position (left/right/top/bottom, single-shape scenes, 40% of the images so that where
a shape is gets asked often). The best constant answer per category scores 0.33 on eval.jsonl.

Stage 1 carries most of the visual learning: a caption ("a red circle at the top.", "three
red circles.") names colour, shape and count or position in ~5 target tokens, where a stage-2
sample spends ~60 tokens on one answer, so there are many captions (each image seen once: fresh
images generalise, repeated ones are memorised). Every position phrase is "at the <side>", so
the caption names the side with one 4-way word, as the one-word answer must.

Stage 2 asks every image each of its question types (3, or 4 for a lone shape), each question
its own sample, as eval.jsonl asks them (training puts the image right before it): in
multi-round conversations a fixed question order becomes a cue for the type of answer.
What each of these choices was measured to change: BUILD_NOTES.md, "Demo accuracy".

The tokenizer imitates SentencePiece Llama: Metaspace "▁" word prefix, <unk>=0, <s>=1, </s>=2,
BOS added by the post-processor, and <image>, <pad> as the last two ids. It is built with the
`tokenizers` library on the demo corpus and the template strings, so the package ships no
third-party vocabulary.

`prepare_multiround()` writes a second data set beside this one (demo_multiround/): the same
kind of scenes in llava_v1_5_mix665k.json's form (all questions of an image in one multi-round
conversation, yes/no questions among them); see the section "Multi-round variant" below.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llava_jax.data.conversation import IMAGE_TOKEN, SHORT_ANSWER_PROMPT, TEMPLATES
from llava_jax.data.sources import cache_root
from llava_jax.data.tokenize import load_tokenizer as load_tokenizer_dir

VERSION = 6  # bump when the generated data change
IMAGE_SIZE = 64
BACKGROUND = (235, 235, 235)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
QUADRANTS = ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73))
COUNT_WORDS = ("one", "two", "three", "four")
QUESTIONS = {
    "color": ("What color is the shape?", "What is the color of the objects?",
              "Which color do the shapes have?"),
    "shape": ("What shape is shown?", "What kind of shape is in the image?",
              "Which shape can you see?"),
    "count": ("How many shapes are there?", "How many objects are in the image?",
              "Count the shapes."),
    "position": ("Where is the shape?", "Where is the object located?",
                 "In which part of the image is the shape?"),
}
CAPTION_PROMPTS = ("Describe the image briefly.", "Render a clear and concise summary of the photo.",
                   "Give a short caption of the image.")
NUM_STAGE1, NUM_STAGE2_IMAGES, NUM_TEXT_ONLY, NUM_EVAL = 16000, 4000, 700, 400
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
EXTRA_TOKENS = (IMAGE_TOKEN, "<pad>")


def default_cache_dir() -> str:
    return os.path.join(cache_root(), "demo")


# ----------------------------------------------------------------------------------------------
# Scenes


CATEGORIES = ("color", "shape", "count", "position")


def random_scene(rng: random.Random, single: bool = False) -> dict:
    """A scene: one shape (40%, or always when `single`) or 2-4 of them, one colour."""
    count = 1 if single else rng.choice((1, 1, 2, 3, 4))
    return {
        "color": rng.choice(sorted(COLORS)),
        "shape": rng.choice(SHAPES),
        "count": COUNT_WORDS[count - 1],
        "position": rng.choice(sorted(POSITIONS)) if count == 1 else None,
        "slots": rng.sample(range(4), count),
        "jitter": [(rng.randint(-2, 2), rng.randint(-2, 2), rng.randint(-2, 2)) for _ in range(count)],
    }


def draw_scene(scene: dict, size: int = IMAGE_SIZE) -> Image.Image:
    """Render a scene: one big shape at its position, or 2-4 smaller ones in quadrants."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    color = COLORS[scene["color"]]
    if scene["position"] is not None:
        centres, radius = [POSITIONS[scene["position"]]], 0.2 * size
    else:
        # 0.15: with the +-2 px jitter, shapes in neighbouring quadrants never touch (at 0.17
        # about 2% of the multi-shape scenes had two touching shapes: a wrong count to the eye).
        centres, radius = [QUADRANTS[slot] for slot in scene["slots"]], 0.15 * size
    for (cx, cy), (dx, dy, dr) in zip(centres, scene["jitter"]):
        x, y, r = cx * size + dx, cy * size + dy, radius + dr
        shape = scene["shape"]
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        elif shape == "square":
            s = r * 0.85
            draw.rectangle((x - s, y - s, x + s, y + s), fill=color)
        elif shape == "triangle":
            draw.polygon(((x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)), fill=color)
        else:  # cross
            w = r * 0.38
            draw.rectangle((x - r, y - w, x + r, y + w), fill=color)
            draw.rectangle((x - w, y - r, x + w, y + r), fill=color)
    return image


def caption(scene: dict) -> str:
    if scene["position"] is not None:
        # "at the <side>" for every side: one word picks among the four, as the answer does.
        return f"a {scene['color']} {scene['shape']} at the {scene['position']}."
    return f"{scene['count']} {scene['color']} {PLURAL[scene['shape']]}."


def question_types(scene: dict) -> list[str]:
    return [kind for kind in CATEGORIES if kind != "position" or scene["position"]]


def _first_turn(rng: random.Random, question: str) -> str:
    # LLaVA's data put the image before or after the question; training moves it to the front.
    return f"{IMAGE_TOKEN}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_TOKEN}"


def _text_only_sample(rng: random.Random, index: int) -> dict:
    rounds = []
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.5:
            number = rng.randrange(3)
            rounds.append((f"Which number comes after {COUNT_WORDS[number]}?", COUNT_WORDS[number + 1]))
        else:
            color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
            pair = [color, shape] if rng.random() < 0.5 else [shape, color]
            rounds.append((f"Which word is a color: {pair[0]} or {pair[1]}?", color))
    conversations = []
    for question, answer in rounds:
        conversations.append({"from": "human", "value": f"{question}\n{SHORT_ANSWER_PROMPT}"})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": f"text-{index:05d}", "conversations": conversations}


def _image_writer(rng: random.Random, image_dir: str):
    """new_image(prefix, index, single=False) -> (file name, scene): draws a random scene
    into image_dir (created here)."""
    os.makedirs(image_dir)

    def new_image(prefix: str, index: int, single: bool = False) -> tuple[str, dict]:
        scene = random_scene(rng, single)
        name = f"{prefix}_{index:05d}.png"
        draw_scene(scene).save(os.path.join(image_dir, name), compress_level=1)
        return name, scene

    return new_image


def _caption_samples(rng: random.Random, new_image, count: int) -> list[dict]:
    """Stage 1: `count` new images, each with a caption prompt and its caption."""
    samples = []
    for index in range(count):
        name, scene = new_image("s1", index)
        samples.append({"id": f"s1-{index:05d}", "image": name, "conversations": [
            {"from": "human", "value": _first_turn(rng, rng.choice(CAPTION_PROMPTS))},
            {"from": "gpt", "value": caption(scene)},
        ]})
    return samples


def _generate(directory: str) -> dict:
    rng = random.Random(20261122)
    new_image = _image_writer(rng, os.path.join(directory, "images"))
    stage1 = _caption_samples(rng, new_image, NUM_STAGE1)

    stage2 = []
    for index in range(NUM_STAGE2_IMAGES):
        name, scene = new_image("s2", index)
        for kind in question_types(scene):
            question = f"{rng.choice(QUESTIONS[kind])}\n{SHORT_ANSWER_PROMPT}"
            stage2.append({"id": f"s2-{index:05d}-{kind}", "image": name, "conversations": [
                {"from": "human", "value": _first_turn(rng, question)},
                {"from": "gpt", "value": scene[kind]},
            ]})
    stage2.extend(_text_only_sample(rng, index) for index in range(NUM_TEXT_ONLY))
    rng.shuffle(stage2)

    evaluation = []
    for index in range(NUM_EVAL):
        kind = CATEGORIES[index % len(CATEGORIES)]
        name, scene = new_image("ev", index, single=kind == "position")
        evaluation.append({"question_id": index, "image": name, "category": kind,
                           "text": f"{rng.choice(QUESTIONS[kind])}\n{SHORT_ANSWER_PROMPT}",
                           "answer": scene[kind]})

    with open(os.path.join(directory, "stage1.json"), "w") as handle:
        json.dump(stage1, handle)
    with open(os.path.join(directory, "stage2.json"), "w") as handle:
        json.dump(stage2, handle)
    with open(os.path.join(directory, "eval.jsonl"), "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in evaluation)
    build_tokenizer(_corpus(stage1, stage2, evaluation), os.path.join(directory, "tokenizer"))
    return {"num_stage1": len(stage1), "num_stage2": len(stage2), "num_eval": len(evaluation)}


def _corpus(stage1, stage2, evaluation) -> list[str]:
    """Training text for the tokenizer: every template string and every demo prompt."""
    texts = [t.system for t in TEMPLATES.values()] + [
        "USER: ASSISTANT: [INST] <<SYS>>\n\n<</SYS>>\n\n [/INST] <|im_start|>user\n"
        "<|im_start|>assistant\n<|im_end|>"
    ]
    for record in stage1 + stage2:
        texts.extend(turn["value"] for turn in record["conversations"])
    texts.extend(line["text"] for line in evaluation)
    # Special strings must not be learned as text pieces: "<image>" has to get the id after the
    # learned vocabulary (as in llava-hf tokenizers), and "</s>" must stay the EOS id.
    return [text.replace(IMAGE_TOKEN, " ").replace("</s>", " ") for text in texts]


_ALPHABET = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-\n"


def train_llama_like_bpe(corpus: list[str], vocab_size: int, *, special_tokens, added_tokens,
                         extra_alphabet: str = "", add_bos: bool = True,
                         split_punctuation: bool = False):
    """A `tokenizers.Tokenizer` that behaves like SentencePiece Llama, trained on `corpus`.

    special_tokens get the first ids (<unk>, <s>, </s>, ...); added_tokens the ids after the
    learned vocabulary (as llava-hf appends <image> and <pad>). add_bos: prepend <s> (id 1).
    split_punctuation: every punctuation mark is its own piece, so "red?" and "top." are
    "▁red" "?" and "▁top" "." -- the same word token as the answer "red" (Llama's vocabulary
    splits them off the same way). Off by default: the single-round demo's and easy-VQA's
    tokenizers (and every figure measured on them) stay as they were.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    # Words start at "▁" (SentencePiece style) and "\n" stands alone, so no merge crosses a
    # line break (Llama's vocabulary has no such pieces either).
    steps = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
             pre_tokenizers.Split("\n", behavior="isolated")]
    if split_punctuation:
        # After the Metaspace: "▁red?" -> "▁red", "?" (no "▁" before the mark, so decoding
        # gives "red?" back). Before it, each mark would get its own "▁" and decode as "red ?".
        steps.append(pre_tokenizers.Punctuation(behavior="isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    alphabet = sorted(set("".join(corpus)) | set(_ALPHABET) | set(extra_alphabet))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens),
        initial_alphabet=[char.replace(" ", "▁") for char in alphabet], show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens(list(added_tokens))
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return tokenizer


def build_tokenizer(corpus: list[str], output_dir: str, vocab_size: int = 1024,
                    split_punctuation: bool = False) -> str:
    """Train the Llama-like demo BPE tokenizer on `corpus`; write output_dir/tokenizer.json.
    split_punctuation: see `train_llama_like_bpe`."""
    tokenizer = train_llama_like_bpe(corpus, vocab_size, special_tokens=SPECIAL_TOKENS,
                                     added_tokens=EXTRA_TOKENS, split_punctuation=split_punctuation)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "tokenizer.json")
    tokenizer.save(path)
    return path


def load_tokenizer(tokenizer_dir: str | None = None):
    """The demo tokenizer as a transformers PreTrainedTokenizerFast (bos/eos/unk/pad set).
    `tokenizer_dir` defaults to the prepared demo's tokenizer (preparing it if needed)."""
    return load_tokenizer_dir(tokenizer_dir or prepare()["tokenizer_dir"])


def paths(cache_dir: str | None = None) -> dict:
    """Where `prepare` puts everything, without generating anything (for configs).

    A dict: stage1_json, stage2_json, eval_file, image_root, tokenizer_dir, image_size,
    image_token (the tokenizer's "<image>" string).
    """
    directory = os.path.abspath(cache_dir or default_cache_dir())
    return {
        "stage1_json": os.path.join(directory, "stage1.json"),
        "stage2_json": os.path.join(directory, "stage2.json"),
        "eval_file": os.path.join(directory, "eval.jsonl"),
        "image_root": os.path.join(directory, "images"),
        "tokenizer_dir": os.path.join(directory, "tokenizer"),
        "image_size": IMAGE_SIZE,
        "image_token": IMAGE_TOKEN,
    }


def prepare(cache_dir: str | None = None) -> dict:
    """Generate the demo data once (atomically) and return where everything is.

    Returns `paths(cache_dir)` and the sample counts (num_stage1, num_stage2, num_eval).
    """
    directory = os.path.abspath(cache_dir or default_cache_dir())
    _generate_once(directory, VERSION, _generate)
    with open(os.path.join(directory, "counts.json")) as handle:
        counts = json.load(handle)
    return {**paths(directory), **counts}


def _generate_once(directory: str, version: int, generate) -> None:
    """Runs generate(staging_dir) and moves the result to `directory`, unless it is there."""
    marker = os.path.join(directory, "DONE")
    if os.path.isfile(marker) and open(marker).read().strip() == str(version):
        return
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    try:
        counts = generate(staging)
        with open(os.path.join(staging, "counts.json"), "w") as handle:
            json.dump(counts, handle)
        with open(os.path.join(staging, "DONE"), "w") as handle:
            handle.write(str(version))
        if os.path.exists(directory):
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.replace(staging, directory)
        except OSError:  # another process finished first
            if not os.path.isfile(marker):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Multi-round variant (issue 14): the same kind of scenes in llava_v1_5_mix665k.json's form
#
#     demo_multiround/stage1.json   captions, as stage1.json above (16000 new images)
#     demo_multiround/stage2.json   one multi-round conversation per image: every question about
#                                   it (attribute questions and yes/no questions, shuffled), the
#                                   short-answer prompt on each, "<image>" in the first human
#                                   turn only; plus ~5% text-only conversations, some with
#                                   sentence-long answers (standing in for ShareGPT)
#     demo_multiround/eval.jsonl    held-out images, one single-round question each, 100 per
#                                   category: color, shape, count, position, yesno
#
# The question mixture is fixed a priori to look like VQAv2's (~40% yes/no) and was not tuned:
# each attribute question is asked with probability 0.75, plus 1-3 yes/no questions, each about
# a random attribute and true half of the time. As in real merged VQA data, a yes/no answer can
# give another round's answer away ("Is the shape red?" "yes" ... "What color is the shape?").

MULTIROUND_VERSION = 2  # 2: the tokenizer splits punctuation off words
MULTIROUND_CATEGORIES = CATEGORIES + ("yesno",)
NUM_MR_STAGE1, NUM_MR_IMAGES, NUM_MR_TEXT_ONLY, NUM_MR_EVAL_PER_CATEGORY = 16000, 4000, 200, 100
YES_NO_QUESTIONS = {
    "color": ("Is there a {} shape in the image?", "Is the shape {}?", "Are the objects {}?"),
    "shape": ("Is there a {} in the image?", "Does the image contain a {}?"),
    "count": ("Are there {} shapes?", "Does the image show {} objects?"),
    "position": ("Is the shape at the {}?", "Is the object at the {} of the image?"),
}
VALUES = {"color": tuple(sorted(COLORS)), "shape": SHAPES, "count": COUNT_WORDS,
          "position": tuple(sorted(POSITIONS))}
SHAPE_FACTS = {"circle": "no corners and one round edge", "square": "four equal sides and four corners",
               "triangle": "three sides and three corners", "cross": "two bars that meet in the middle"}


def default_multiround_cache_dir() -> str:
    return os.path.join(cache_root(), "demo_multiround")


def multiround_paths(cache_dir: str | None = None) -> dict:
    """Where `prepare_multiround` puts everything (same keys as `paths`), generating nothing."""
    return paths(cache_dir or default_multiround_cache_dir())


def yes_no_question(rng: random.Random, scene: dict) -> tuple[str, str]:
    """A yes/no question about one attribute of `scene`, true half of the time."""
    kind = rng.choice(question_types(scene))
    truth = rng.random() < 0.5
    value = scene[kind] if truth else rng.choice([v for v in VALUES[kind] if v != scene[kind]])
    return rng.choice(YES_NO_QUESTIONS[kind]).format(value), "yes" if truth else "no"


def multiround_conversation(rng: random.Random, scene: dict) -> list[dict]:
    """Every question asked about `scene`, one round each, in random order (at least 2)."""
    rounds = [(rng.choice(QUESTIONS[kind]), scene[kind])
              for kind in question_types(scene) if rng.random() < 0.75]
    rounds += [yes_no_question(rng, scene) for _ in range(rng.randint(1, 3))]
    if len(rounds) < 2:
        kind = rng.choice(question_types(scene))
        rounds.append((rng.choice(QUESTIONS[kind]), scene[kind]))
    rng.shuffle(rounds)
    conversation = []
    for index, (question, answer) in enumerate(rounds):
        text = f"{question}\n{SHORT_ANSWER_PROMPT}"
        conversation.append({"from": "human", "value": _first_turn(rng, text) if index == 0 else text})
        conversation.append({"from": "gpt", "value": answer})
    return conversation


def _text_only_conversation(rng: random.Random, index: int) -> dict:
    """1-3 rounds without an image: short answers (with the prompt) or a sentence or two."""
    conversation = []
    for _ in range(rng.randint(1, 3)):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        pick = rng.randrange(4)
        if pick == 0:
            number = rng.randrange(3)
            question = f"Which number comes after {COUNT_WORDS[number]}?\n{SHORT_ANSWER_PROMPT}"
            answer = COUNT_WORDS[number + 1]
        elif pick == 1:
            pair = [color, shape] if rng.random() < 0.5 else [shape, color]
            question = f"Which word is a color: {pair[0]} or {pair[1]}?\n{SHORT_ANSWER_PROMPT}"
            answer = color
        elif pick == 2:
            question = f"Describe a {color} {shape}."
            answer = (f"A {color} {shape} is a flat {shape} filled with {color}. A {shape} has "
                      f"{SHAPE_FACTS[shape]}, so you can tell it from the other shapes.")
        else:
            question = "Which colors and shapes can a picture show?"
            answer = (f"It can show {', '.join(sorted(COLORS)[:-1])} or {sorted(COLORS)[-1]} "
                      f"shapes, and each one is a {', '.join(SHAPES[:-1])} or {SHAPES[-1]}.")
        conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": f"mr-text-{index:05d}", "conversations": conversation}


def _generate_multiround(directory: str) -> dict:
    rng = random.Random(20261203)
    new_image = _image_writer(rng, os.path.join(directory, "images"))
    stage1 = _caption_samples(rng, new_image, NUM_MR_STAGE1)

    stage2 = []
    for index in range(NUM_MR_IMAGES):
        name, scene = new_image("mr", index)
        stage2.append({"id": f"mr-{index:05d}", "image": name,
                       "conversations": multiround_conversation(rng, scene)})
    stage2.extend(_text_only_conversation(rng, index) for index in range(NUM_MR_TEXT_ONLY))
    rng.shuffle(stage2)

    evaluation = []
    for index in range(NUM_MR_EVAL_PER_CATEGORY * len(MULTIROUND_CATEGORIES)):
        kind = MULTIROUND_CATEGORIES[index % len(MULTIROUND_CATEGORIES)]
        name, scene = new_image("ev", index, single=kind == "position")
        if kind == "yesno":
            question, answer = yes_no_question(rng, scene)
        else:
            question, answer = rng.choice(QUESTIONS[kind]), scene[kind]
        evaluation.append({"question_id": index, "image": name, "category": kind,
                           "text": f"{question}\n{SHORT_ANSWER_PROMPT}", "answer": answer})

    with open(os.path.join(directory, "stage1.json"), "w") as handle:
        json.dump(stage1, handle)
    with open(os.path.join(directory, "stage2.json"), "w") as handle:
        json.dump(stage2, handle)
    with open(os.path.join(directory, "eval.jsonl"), "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in evaluation)
    # Punctuation split off: the word that ends a question ("Is the shape red?") or a caption
    # ("three red squares.") is the same token as the answer word (version 1 had "▁red?",
    # "▁square?", "▁top." as tokens of their own, never tied to the image or to an answer).
    build_tokenizer(_corpus(stage1, stage2, evaluation), os.path.join(directory, "tokenizer"),
                    split_punctuation=True)
    return {"num_stage1": len(stage1), "num_stage2": len(stage2), "num_eval": len(evaluation)}


def prepare_multiround(cache_dir: str | None = None) -> dict:
    """Generate the multi-round demo data once (atomically); `multiround_paths` + counts."""
    directory = os.path.abspath(cache_dir or default_multiround_cache_dir())
    _generate_once(directory, MULTIROUND_VERSION, _generate_multiround)
    with open(os.path.join(directory, "counts.json")) as handle:
        counts = json.load(handle)
    return {**multiround_paths(directory), **counts}
