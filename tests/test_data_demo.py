"""Demo data: deterministic, answers determined by the image, tokenizable without skips."""

import collections
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import TokenizationError, demo, tokenize_conversation


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return demo.prepare(str(tmp_path_factory.mktemp("demo") / "cache"))


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_generation_is_deterministic_and_cached(prepared, tmp_path):
    again = demo.prepare(str(tmp_path / "other"))
    for key in ("stage1_json", "stage2_json", "eval_file"):
        assert digest(prepared[key]) == digest(again[key])
    tokenizer_json = lambda info: os.path.join(info["tokenizer_dir"], "tokenizer.json")  # noqa: E731
    assert digest(tokenizer_json(prepared)) == digest(tokenizer_json(again))
    stage2_images = [r["image"] for r in json.load(open(prepared["stage2_json"])) if "image" in r]
    for name in ("s1_00000.png", stage2_images[1234], "ev_00399.png"):
        assert digest(os.path.join(prepared["image_root"], name)) == digest(os.path.join(again["image_root"], name))
    stamp = os.path.getmtime(prepared["stage2_json"])
    assert demo.prepare(os.path.dirname(prepared["stage2_json"])) == prepared  # cached: no rewrite
    assert os.path.getmtime(prepared["stage2_json"]) == stamp


def test_formats_and_sizes(prepared):
    stage1 = json.load(open(prepared["stage1_json"]))
    stage2 = json.load(open(prepared["stage2_json"]))
    evaluation = [json.loads(line) for line in open(prepared["eval_file"])]
    assert len(stage1) == prepared["num_stage1"] and len(stage2) == prepared["num_stage2"] <= 20000
    assert all(len(r["conversations"]) == 2 and "<image>" in r["conversations"][0]["value"] for r in stage1)
    text_only = [r for r in stage2 if "image" not in r]
    assert 0.02 < len(text_only) / len(stage2) < 0.1
    # One question per image sample, as eval.jsonl asks them; text-only samples may run longer.
    assert all(len(r["conversations"]) == 2 and "<image>" in r["conversations"][0]["value"]
               for r in stage2 if "image" in r)
    assert any(len(r["conversations"]) >= 4 for r in text_only)
    for record in stage2:
        for turn in record["conversations"][0::2]:
            text = turn["value"].replace("\n<image>", "")  # the image tag may follow the question
            assert text.endswith("\nAnswer the question using a single word or phrase.")
        for turn in record["conversations"][1::2]:
            assert len(turn["value"].split()) == 1
    train_images = {r.get("image") for r in stage1 + stage2}
    assert not train_images & {line["image"] for line in evaluation}  # held out
    assert {"question_id", "image", "text", "answer", "category"} <= set(evaluation[0])
    assert "<image>" not in evaluation[0]["text"]
    # Every category is measured on as many questions, and guessing its most common answer is
    # far from 90%.
    categories = collections.Counter(line["category"] for line in evaluation)
    assert sorted(categories) == sorted(demo.CATEGORIES)
    assert max(categories.values()) - min(categories.values()) <= 1
    best_guess = 0
    for category in demo.CATEGORIES:
        answers = collections.Counter(line["answer"] for line in evaluation if line["category"] == category)
        assert max(answers.values()) / sum(answers.values()) < 0.5
        best_guess += max(answers.values())
    assert best_guess / len(evaluation) < 0.35
    # Each image is asked about each of its question types once: 4 with a position, else 3.
    kind_of = {word: kind for kind, words in (("color", demo.COLORS), ("shape", demo.SHAPES),
                                              ("count", demo.COUNT_WORDS), ("position", demo.POSITIONS))
               for word in words}
    asked = collections.defaultdict(list)
    for record in stage2:
        if "image" in record:
            asked[record["image"]].append(kind_of[record["conversations"][1]["value"]])
    assert all(len(kinds) == len(set(kinds)) and {"color", "shape", "count"} <= set(kinds)
               for kinds in asked.values())
    assert 0.3 < sum("position" in kinds for kinds in asked.values()) / len(asked) < 0.5  # lone shapes


def _read_off(path: str) -> dict:
    """What the image shows, from its pixels: {"color", "count", "position"} (position: where
    the foreground's centre lies, meaningful for a lone shape)."""
    from skimage.measure import label

    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (64, 64, 3)
    foreground = np.abs(pixels.astype(int) - demo.BACKGROUND).sum(-1) > 60
    mean = pixels[foreground].mean(0)
    ys, xs = np.nonzero(foreground)
    dx, dy = xs.mean() - 31.5, ys.mean() - 31.5
    return {
        "color": min(demo.COLORS, key=lambda c: np.abs(np.subtract(demo.COLORS[c], mean)).sum()),
        "count": demo.COUNT_WORDS[label(foreground).max() - 1],
        "position": (("right" if dx > 0 else "left") if abs(dx) > abs(dy)
                     else ("bottom" if dy > 0 else "top")),
    }


def test_answers_can_be_read_off_the_image(prepared):
    for line in map(json.loads, open(prepared["eval_file"])):  # all 400
        if line["category"] != "shape":
            shown = _read_off(os.path.join(prepared["image_root"], line["image"]))
            assert shown[line["category"]] == line["answer"], line


def test_captions_name_what_the_image_shows(prepared):
    # "a red circle at the top." (a lone shape) or "three red circles.": every position is
    # "at the <side>", one word choosing among the four, as the stage-2 answer does.
    for record in json.load(open(prepared["stage1_json"]))[:300]:
        words = record["conversations"][1]["value"].rstrip(".").split()
        shown = _read_off(os.path.join(prepared["image_root"], record["image"]))
        assert shown["color"] == words[1], record
        if words[0] == "a":
            assert words[2] in demo.SHAPES and words[3:5] == ["at", "the"], record
            assert shown["count"] == "one" and shown["position"] == words[5], record
        else:
            assert words[2] in demo.PLURAL.values() and shown["count"] == words[0], record


def test_demo_tokenizer_and_no_skips(prepared):
    tokenizer = demo.load_tokenizer(prepared["tokenizer_dir"])
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    image_id, pad_id = tokenizer.convert_tokens_to_ids(["<image>", "<pad>"])
    assert (image_id, pad_id) == (len(tokenizer) - 2, len(tokenizer) - 1) and tokenizer.pad_token_id == pad_id
    assert tokenizer("a red circle")["input_ids"][0] == 1
    for name, key in (("plain", "stage1_json"), ("vicuna_v1", "stage2_json")):
        for record in json.load(open(prepared[key])):
            try:
                out = tokenize_conversation(record["conversations"], tokenizer, name, 16, image_id, None)
            except TokenizationError as error:
                pytest.fail(f"{record['id']} skipped under {name}: {error}")
            answers = [t["value"] for t in record["conversations"][1::2]]
            trained = tokenizer.decode(out["labels"][out["labels"] != -100])
            assert all(answer in trained for answer in answers)


# ----------------------------------------------------------------------------------------------
# Multi-round variant (mix665k form)


@pytest.fixture(scope="module")
def multiround(tmp_path_factory):
    return demo.prepare_multiround(str(tmp_path_factory.mktemp("demo_mr") / "cache"))


def test_multiround_is_deterministic_and_leaves_the_single_round_demo_alone(multiround, prepared, tmp_path):
    again = demo.prepare_multiround(str(tmp_path / "other"))
    for key in ("stage1_json", "stage2_json", "eval_file"):
        assert digest(multiround[key]) == digest(again[key])
        assert digest(multiround[key]) != digest(prepared[key])
    assert demo.multiround_paths(os.path.dirname(multiround["eval_file"]))["eval_file"] == multiround["eval_file"]
    # The single-round demo's files are the ones its figures were measured on (data version 6).
    assert digest(prepared["stage2_json"]).startswith("1029f30fc4c08fb3")
    assert digest(prepared["eval_file"]).startswith("85a456c8ee3bdd03")


def _kind(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yesno"
    return next(kind for kind, values in demo.VALUES.items() if answer in values)


def test_multiround_conversations_are_in_mix665k_form(multiround):
    stage2 = json.load(open(multiround["stage2_json"]))
    images = [r for r in stage2 if "image" in r]
    text_only = [r for r in stage2 if "image" not in r]
    assert len(images) == demo.NUM_MR_IMAGES and 0.02 < len(text_only) / len(stage2) < 0.1
    assert len({r["image"] for r in images}) == len(images)  # one conversation per image
    kinds, first = collections.Counter(), collections.Counter()
    for record in images:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) >= 4
        assert "<image>" in turns[0]["value"]
        assert all("<image>" not in t["value"] for t in turns[1:])
        for index, turn in enumerate(turns[0::2]):
            text = turn["value"].replace("\n<image>", "")
            assert text.endswith("\n" + demo.SHORT_ANSWER_PROMPT)
        answers = [t["value"] for t in turns[1::2]]
        kinds.update(_kind(a) for a in answers)
        first[_kind(answers[0])] += 1
        attributes = [a for a in answers if a not in ("yes", "no")]
        assert len(attributes) == len({_kind(a) for a in attributes})  # each asked at most once
    total = sum(kinds.values())
    assert 0.35 < kinds["yesno"] / total < 0.5  # VQAv2-like share of yes/no
    assert set(first) == set(demo.MULTIROUND_CATEGORIES)  # order shuffled: no type always first
    assert any(len(t["value"].split()) > 10 for r in text_only for t in r["conversations"][1::2])


def test_multiround_answers_agree_with_the_image(multiround):
    scene_of = {}
    for record in json.load(open(multiround["stage2_json"]))[:400]:
        if "image" not in record:
            continue
        shown = _read_off(os.path.join(multiround["image_root"], record["image"]))
        for question, answer in zip(record["conversations"][0::2], record["conversations"][1::2]):
            kind = _kind(answer["value"])
            if kind in ("color", "count") or (kind == "position" and shown["count"] == "one"):
                assert shown[kind] == answer["value"], record
            if kind == "yesno" and "color" not in question["value"] and any(
                    c in question["value"] for c in demo.COLORS):
                named = next(c for c in demo.COLORS if c in question["value"])
                assert (named == shown["color"]) == (answer["value"] == "yes"), record
        scene_of[record["image"]] = shown
    assert scene_of


def test_multiround_eval_is_single_round_and_held_out(multiround):
    evaluation = [json.loads(line) for line in open(multiround["eval_file"])]
    categories = collections.Counter(line["category"] for line in evaluation)
    assert categories == {kind: demo.NUM_MR_EVAL_PER_CATEGORY for kind in demo.MULTIROUND_CATEGORIES}
    train = {r.get("image") for key in ("stage1_json", "stage2_json")
             for r in json.load(open(multiround[key]))}
    assert not train & {line["image"] for line in evaluation}
    for line in evaluation:
        assert "<image>" not in line["text"] and line["text"].endswith(demo.SHORT_ANSWER_PROMPT)
        if line["category"] in ("color", "count", "position"):
            assert _read_off(os.path.join(multiround["image_root"], line["image"]))[line["category"]] == line["answer"]
    yes = sum(line["answer"] == "yes" for line in evaluation if line["category"] == "yesno")
    assert 35 <= yes <= 65


def test_multiround_targets_are_exactly_the_answers(multiround):
    # Every assistant turn's tokens (and the "</s>" closing it) are targets, and nothing else.
    tokenizer = demo.load_tokenizer(multiround["tokenizer_dir"])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for record in json.load(open(multiround["stage2_json"])):
        out = tokenize_conversation(record["conversations"], tokenizer, "vicuna_v1", 16, image_id, 256)
        labels, ids = out["labels"], out["input_ids"]
        expected = []
        for turn in record["conversations"][1::2]:
            expected += tokenizer(turn["value"], add_special_tokens=False)["input_ids"]
            expected.append(tokenizer.eos_token_id)
        assert labels[labels != -100].tolist() == expected, record["id"]
        assert (labels[labels != -100] == ids[labels != -100]).all()


def test_easy_vqa_conversion(tmp_path):
    # easy-VQA (pip install easy-vqa) ships its images and questions: data we did not make.
    pytest.importorskip("easy_vqa")
    from llava_jax.data import easy_vqa

    info = easy_vqa.prepare(str(tmp_path / "easy_vqa"))
    data_dir = easy_vqa.package_data_dir()
    train = json.load(open(os.path.join(data_dir, "train", "questions.json")))
    labels = easy_vqa.labels_of(train)
    for text, answer, image in train:  # the derived labels agree with every question
        kind, label = easy_vqa.category(answer), labels[image]
        if kind != "yesno":
            assert label[kind] == answer
    stage1 = json.load(open(info["stage1_json"]))
    stage2 = json.load(open(info["stage2_json"]))
    assert len(stage2) == 4000 and sum(len(r["conversations"]) // 2 for r in stage2) == len(train)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in stage2)
    assert all(os.path.isfile(os.path.join(info["image_root"], r["image"])) for r in stage1[:50])
    for record in stage1[:200]:
        label = labels[int(record["image"].split("/")[-1][:-4])]
        assert record["conversations"][1]["value"] == f"a {label['color']} {label['shape']}."
    evaluation = [json.loads(line) for line in open(info["eval_file"])]
    assert len(evaluation) == easy_vqa.NUM_EVAL
    assert all(line["image"].startswith("test/") for line in evaluation)
    assert {line["category"] for line in evaluation} == {"color", "shape", "yesno"}


def test_multiround_tokenizer_splits_punctuation(multiround):
    # The word that ends a yes/no question ("Is the shape red?") or a caption ("... at the
    # top.") must be the very token the answer word is: data version 1 fused the mark on
    # ("▁red?", "▁top."), tokens never tied to the image nor to an answer.
    tokenizer = demo.load_tokenizer(multiround["tokenizer_dir"])
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    answer_id = {}
    for value in [v for values in demo.VALUES.values() for v in values] + ["yes", "no"]:
        ids = encode(value)
        assert len(ids) == 1, (value, tokenizer.convert_ids_to_tokens(ids))
        answer_id[value] = ids[0]
    for kind, phrasings in demo.YES_NO_QUESTIONS.items():
        for phrasing in phrasings:
            for value in demo.VALUES[kind]:
                question = phrasing.format(value)
                assert answer_id[value] in encode(question), (question, tokenizer.tokenize(question))
    for record in json.load(open(multiround["stage1_json"]))[:300]:
        text = record["conversations"][1]["value"]
        named = [word for word in text.rstrip(".").split() if word in answer_id]
        assert named and all(answer_id[word] in encode(text) for word in named), tokenizer.tokenize(text)
    # Decoding gives every text of the data back (each chunk between "<image>" tags, which is
    # what tokenize_conversation encodes).
    texts = {turn["value"] for key in ("stage1_json", "stage2_json")
             for record in json.load(open(multiround[key])) for turn in record["conversations"]}
    texts |= {json.loads(line)["text"] for line in open(multiround["eval_file"])}
    for text in texts:
        for chunk in text.split("<image>"):
            assert tokenizer.decode(encode(chunk)) == chunk, repr(chunk)
