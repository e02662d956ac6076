"""easy-VQA (a public VQA set of simple coloured shapes, `pip install easy-vqa`, MIT) in LLaVA form.

Data we did not make: 4000 train / 1000 test 64x64 PNG images, one shape (circle, rectangle,
triangle) of one of 8 colours each, and 38575 / 9673 questions (74% yes/no, 13% colour, 13%
shape; 24 phrasings, "is there not a blue shape?" among them). The package ships the files;
nothing is downloaded. `prepare()` writes, next to nothing but JSON (the images stay in the
package):

    stage1.json   one caption per training image, "a blue rectangle.", derived from that image's
                  own question labels (easy-VQA has no captions)
    stage2.json   all questions of a training image in one multi-round conversation, in the
                  order the file lists them, each with LLaVA-1.5's short-answer prompt, as
                  llava_v1_5_mix665k.json merges VQAv2 per image; "<image>" in the first turn
    eval.jsonl    a fixed sample of the test questions (single round, as the demo eval asks
                  them), categories color / shape / yesno
    tokenizer/    a Llama-like BPE trained on these texts (data.demo.build_tokenizer)

The image root is the package's data folder (images are "train/images/N.png", "test/...").
"""

from __future__ import annotations

import importlib.util
import json
import os
import random

from llava_jax.data import demo
from llava_jax.data.conversation import IMAGE_TOKEN, SHORT_ANSWER_PROMPT
from llava_jax.data.sources import cache_root

VERSION = 1
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
NUM_EVAL = 1200  # test questions evaluated (a fixed random sample; all 9673 take ~8x longer)


def package_data_dir() -> str:
    """The installed easy_vqa package's data folder (FileNotFoundError if not installed)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.origin:
        raise FileNotFoundError("easy-VQA is not installed: pip install easy-vqa")
    return os.path.join(os.path.dirname(spec.origin), "data")


def category(answer: str) -> str:
    return "yesno" if answer in ("yes", "no") else "color" if answer in COLORS else "shape"


def labels_of(questions) -> dict[int, dict]:
    """{image id: {"color", "shape"}} (where the questions settle it): from the questions that
    ask for them, else from yes/no answers (each image holds one shape of one colour, so a
    value is there, or is the only one not ruled out)."""
    present: dict[int, dict] = {}
    absent: dict[int, dict] = {}
    for text, answer, image in questions:
        kind = category(answer)
        if kind != "yesno":
            present.setdefault(image, {})[kind] = answer
            continue
        words = text.rstrip("?").split()
        negated = "not" in words or "no" in words
        for kind, values in (("color", COLORS), ("shape", SHAPES)):
            for word in words:
                if word in values:
                    if (answer == "yes") != negated:
                        present.setdefault(image, {}).setdefault(kind, word)
                    else:
                        absent.setdefault(image, {}).setdefault(kind, set()).add(word)
    labels = {}
    for image in set(present) | set(absent):
        label = dict(present.get(image, {}))
        for kind, values in (("color", COLORS), ("shape", SHAPES)):
            left = set(values) - absent.get(image, {}).get(kind, set())
            if kind not in label and len(left) == 1:
                label[kind] = left.pop()
        labels[image] = label
    return labels


def paths(cache_dir: str | None = None, data_dir: str | None = None) -> dict:
    directory = os.path.abspath(cache_dir or os.path.join(cache_root(), "easy_vqa"))
    return {"stage1_json": os.path.join(directory, "stage1.json"),
            "stage2_json": os.path.join(directory, "stage2.json"),
            "eval_file": os.path.join(directory, "eval.jsonl"),
            "image_root": data_dir or "",
            "tokenizer_dir": os.path.join(directory, "tokenizer"),
            "image_size": 64, "image_token": IMAGE_TOKEN}


def _convert(data_dir: str):
    def generate(directory: str) -> dict:
        rng = random.Random(14)
        train = json.load(open(os.path.join(data_dir, "train", "questions.json")))
        test = json.load(open(os.path.join(data_dir, "test", "questions.json")))
        by_image: dict[int, list] = {}
        for text, answer, image in train:
            by_image.setdefault(image, []).append((text, answer))
        labels = labels_of(train)
        stage1, stage2 = [], []
        for image in sorted(by_image):
            name = f"train/images/{image}.png"
            label = labels.get(image, {})
            if {"color", "shape"} <= set(label):
                prompt = rng.choice(demo.CAPTION_PROMPTS)
                stage1.append({"id": f"cap-{image}", "image": name, "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
                    {"from": "gpt", "value": f"a {label['color']} {label['shape']}."}]})
            turns = []
            for index, (text, answer) in enumerate(by_image[image]):
                question = f"{text[0].upper()}{text[1:]}\n{SHORT_ANSWER_PROMPT}"
                turns.append({"from": "human",
                              "value": f"{IMAGE_TOKEN}\n{question}" if index == 0 else question})
                turns.append({"from": "gpt", "value": answer})
            stage2.append({"id": f"train-{image}", "image": name, "conversations": turns})
        rng.shuffle(stage2)
        picked = sorted(rng.sample(range(len(test)), min(NUM_EVAL, len(test))))
        evaluation = [{"question_id": index, "image": f"test/images/{test[index][2]}.png",
                       "text": f"{test[index][0][0].upper()}{test[index][0][1:]}\n{SHORT_ANSWER_PROMPT}",
                       "answer": test[index][1], "category": category(test[index][1])}
                      for index in picked]
        for name, records in (("stage1.json", stage1), ("stage2.json", stage2)):
            with open(os.path.join(directory, name), "w") as handle:
                json.dump(records, handle)
        with open(os.path.join(directory, "eval.jsonl"), "w") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in evaluation)
        demo.build_tokenizer(demo._corpus(stage1, stage2, evaluation),
                             os.path.join(directory, "tokenizer"))
        return {"num_stage1": len(stage1), "num_stage2": len(stage2), "num_eval": len(evaluation)}
    return generate


def prepare(cache_dir: str | None = None, data_dir: str | None = None) -> dict:
    """Convert the installed easy-VQA (or `data_dir`) once; `paths(...)` + counts."""
    data_dir = os.path.abspath(data_dir or package_data_dir())
    info = paths(cache_dir, data_dir)
    directory = os.path.dirname(info["stage2_json"])
    demo._generate_once(directory, VERSION, _convert(data_dir))
    with open(os.path.join(directory, "counts.json")) as handle:
        return {**info, **json.load(handle)}
