"""llava_jax.datagen: reply parsing on hand-written replies, the COCO / JSONL readers, the
prompt files, a run against a scripted endpoint (counters, rejects, failures) through to LLaVA
JSON that the data pipeline loads, resuming after a killed run, deduplication."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from llava_jax import datagen  # noqa: F401  (the package imports)
from llava_jax.data import IMAGE_TOKEN
from llava_jax.datagen import __main__ as cli
from llava_jax.datagen.annotations import (
    Box,
    ImageAnnotation,
    format_context,
    read_annotations,
)
from llava_jax.datagen.llava import to_llava_records
from llava_jax.datagen.parse import parse_reply
from llava_jax.datagen.prompts import KINDS, build_messages, load_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETAIL = "Describe this image in detail."
GOOD_CONVERSATION = """Question: What is on the table?
Answer: A bowl of red apples sits in the middle of the table.

Question: How many apples are there?
Answer: There are five apples in the bowl."""


# ----------------------------------------------------------------------------------------------
# Parsing


def test_well_formed_conversations_in_several_layouts():
    parsed = parse_reply("conversation", GOOD_CONVERSATION)
    assert parsed.ok and parsed.notes == []
    assert parsed.turns == [("What is on the table?",
                             "A bowl of red apples sits in the middle of the table."),
                            ("How many apples are there?", "There are five apples in the bowl.")]
    # The original's layout: markers on their own line, "===" separators.
    own_lines = ("Question:\nWhat is on the table?\n===\nAnswer:\nA bowl of apples.\n===\n"
                 "Question:\nWhat colour are they?\n===\nAnswer:\nThey are red.")
    assert parse_reply("conversation", own_lines).turns == [
        ("What is on the table?", "A bowl of apples."), ("What colour are they?", "They are red.")]
    markdown = "**Question:** Is it sunny?\n**Answer:** Yes, the sky is clear.\n\nQ: Any people?\nA: No."
    assert parse_reply("conversation", markdown).turns == [
        ("Is it sunny?", "Yes, the sky is clear."), ("Any people?", "No.")]
    numbered = "1. Question: Is it day?\nAnswer: Yes.\nQuestion 2: Is it warm?\nAnswer 2: It seems so."
    assert parse_reply("conversation", numbered).turns == [
        ("Is it day?", "Yes."), ("Is it warm?", "It seems so.")]
    roles = "User: Where is the cat?\nAssistant: On the sofa, <image> near the window."
    assert parse_reply("conversation", roles).turns == [
        ("Where is the cat?", "On the sofa,  near the window.")]


def test_conversations_with_stray_text_and_broken_structure():
    stray = "Sure! Here is a conversation about the image:\n\n" + GOOD_CONVERSATION
    parsed = parse_reply("conversation", stray)
    assert parsed.ok and len(parsed.turns) == 2 and parsed.notes == ["stray_text"]
    dangling = GOOD_CONVERSATION + "\n\nQuestion: What is behind the bowl?"
    parsed = parse_reply("conversation", dangling)
    assert len(parsed.turns) == 2 and "dangling_question" in parsed.notes
    for text, reason in [("", "empty"), ("   \n ", "empty"), (None, "empty"),
                         ("The image shows a table with apples.", "no_turns"),
                         ("Question: A?\nQuestion: B?\nAnswer: C.", "not_alternating"),
                         ("Answer: Yes.\nQuestion: Why?\nAnswer: Because.", "not_alternating"),
                         ("Question: \nAnswer: Yes.", "empty_turn"),
                         ("Question: What is there?", "no_turns")]:
        parsed = parse_reply("conversation", text)
        assert not parsed.ok and parsed.reason == reason, (text, parsed)


def test_truncated_and_leaking_replies_lose_what_is_broken():
    cut = GOOD_CONVERSATION + "\n\nQuestion: Why are they there?\nAnswer: Probably because the"
    parsed = parse_reply("conversation", cut, truncated=True)
    assert [q for q, _ in parsed.turns] == ["What is on the table?", "How many apples are there?"]
    one = "Question: What is it?\nAnswer: It is a bowl of"
    assert parse_reply("conversation", one, truncated=True).reason == "truncated"
    # Cut while asking: the answers before it are complete.
    asking = GOOD_CONVERSATION + "\n\nQuestion: Why are"
    assert len(parse_reply("conversation", asking, truncated=True).turns) == 2
    leak = GOOD_CONVERSATION + ("\n\nQuestion: Where is the bowl?\nAnswer: Its bounding box is "
                                "[0.2, 0.3, 0.6, 0.8].")
    parsed = parse_reply("conversation", leak)
    assert len(parsed.turns) == 2 and "dropped_rounds_mentioning_annotations" in parsed.notes
    only_leak = "Question: Where is the dog?\nAnswer: At [0.12, 0.5, 0.3, 0.9]."
    assert parse_reply("conversation", only_leak).reason == "mentions_annotations"


def test_detail_paragraphs():
    text = ("A wooden table stands in a bright kitchen. On it, a white bowl holds five red "
            "apples.\n\nSunlight falls through the window behind it.")
    parsed = parse_reply("detail", text, instruction=DETAIL)
    assert parsed.ok and parsed.turns == [(DETAIL, text)]
    lead_in = "Here is a detailed description of the image:\n" + text
    parsed = parse_reply("detail", lead_in, instruction=DETAIL)
    assert parsed.turns == [(DETAIL, text)] and parsed.notes == ["stray_text"]
    parsed = parse_reply("detail", "Answer: " + text, instruction=DETAIL)
    assert parsed.turns == [(DETAIL, text)]
    parsed = parse_reply("detail", text + " A cat sleeps on the", instruction=DETAIL,
                         truncated=True)
    assert parsed.turns[0][1] == text and "cut_to_last_sentence" in parsed.notes
    for reply, reason, truncated in [
            ("", "empty", False), ("A table.", "too_short", False),
            ("A bowl of apples on a table in the", "truncated", True),
            (GOOD_CONVERSATION, "not_a_description", False),
            ("Going by the captions, a bowl of apples sits on the table.",
             "mentions_annotations", False)]:
        parsed = parse_reply("detail", reply, instruction=DETAIL, truncated=truncated)
        assert parsed.reason == reason, (reply, parsed)
    with pytest.raises(ValueError, match="instruction"):
        parse_reply("detail", text)


def test_complex_reasoning_answers():
    text = ("Question: Why might the apples be on the table?\nAnswer: First, the bowl sits in "
            "the middle of a kitchen table. Second, fruit is often kept within reach. "
            "Therefore the apples are probably a snack for the family.")
    parsed = parse_reply("complex", text)
    assert parsed.ok and len(parsed.turns) == 1
    assert parsed.turns[0][1].startswith("First, the bowl") and parsed.turns[0][1].endswith(
        "family.")
    parsed = parse_reply("complex", "Okay.\n" + text + "\n\n" + GOOD_CONVERSATION)
    assert len(parsed.turns) == 1 and {"stray_text", "kept_first_round"} <= set(parsed.notes)
    assert parse_reply("complex", "I cannot help with that.").reason == "no_turns"


# ----------------------------------------------------------------------------------------------
# Prompts and annotations


@pytest.mark.parametrize("kind", KINDS)
def test_package_prompts_load_and_their_examples_parse(kind):
    prompts = load_prompts(kind)
    assert prompts.system and len(prompts.examples) >= 2
    instruction = prompts.instructions[0] if kind == "detail" else None
    for context, reply in prompts.examples:
        assert context.startswith("Captions:\n") and "\n\nObjects:\n" in context
        parsed = parse_reply(kind, reply, instruction=instruction)
        assert parsed.ok and parsed.notes == [], (kind, reply, parsed)
    if kind == "detail":
        assert len(prompts.instructions) >= 10
        assert not any(line.startswith("#") for line in prompts.instructions)
    messages = build_messages(prompts, "Captions:\nA cat.", few_shot=1)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == "Captions:\nA cat."
    assert len(build_messages(prompts, "x")) == 2 + 2 * len(prompts.examples)


def test_prompt_folder_override(tmp_path):
    folder = tmp_path / "prompts" / "conversation"
    folder.mkdir(parents=True)
    (folder / "system.txt").write_text("Be brief.\n")
    (folder / "002_context.txt").write_text("Captions:\nB")
    (folder / "002_reply.txt").write_text("Question: b?\nAnswer: b.")
    (folder / "001_context.txt").write_text("Captions:\nA")
    (folder / "001_reply.txt").write_text("Question: a?\nAnswer: a.")
    prompts = load_prompts("conversation", str(tmp_path / "prompts"))
    assert prompts.system == "Be brief."
    assert prompts.examples == [("Captions:\nA", "Question: a?\nAnswer: a."),
                                ("Captions:\nB", "Question: b?\nAnswer: b.")]
    with pytest.raises(FileNotFoundError, match="detail/system.txt"):
        load_prompts("detail", str(tmp_path / "prompts"))
    (folder / "003_context.txt").write_text("orphan")
    with pytest.raises(FileNotFoundError, match="003_reply.txt"):
        load_prompts("conversation", str(tmp_path / "prompts"))


def write_coco(folder, names, *, size=(64, 48)):
    """captions_x.json + instances_x.json for images `names` (each w x h), and the images."""
    width, height = size
    images = [{"id": 100 + i, "file_name": name, "width": width, "height": height}
              for i, name in enumerate(names)]
    captions = [{"id": j, "image_id": 100 + i, "caption": f" Picture {i}  shows   a dog {j}. "}
                for i in range(len(names)) for j in range(2)]
    instances = [{"id": i, "image_id": 100 + i, "category_id": 18, "iscrowd": 0,
                  "bbox": [16.0, 12.0, 32.0, 24.0], "area": 768.0} for i in range(len(names))]
    categories = [{"id": 18, "name": "dog", "supercategory": "animal"}]
    paths = []
    for kind, annotations in (("captions", captions), ("instances", instances)):
        path = os.path.join(folder, f"{kind}_x.json")
        with open(path, "w") as handle:
            json.dump({"images": images, "annotations": annotations,
                       **({"categories": categories} if kind == "instances" else {})}, handle)
        paths.append(path)
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
            os.path.join(folder, "images", name))
    return ",".join(paths)


def test_coco_and_jsonl_readers(tmp_path):
    spec = write_coco(str(tmp_path), ["a.png", "b.png"])
    annotations = read_annotations(spec)
    assert [a.image for a in annotations] == ["a.png", "b.png"]
    first = annotations[0]
    assert first.captions == ["Picture 0 shows a dog 0.", "Picture 0 shows a dog 1."]
    assert first.boxes == [Box("dog", 0.25, 0.25, 0.75, 0.75)]  # [16, 12, 32, 24] of 64 x 48
    assert format_context(first) == ("Captions:\nPicture 0 shows a dog 0.\nPicture 0 shows a "
                                     "dog 1.\n\nObjects:\ndog: [0.250, 0.250, 0.750, 0.750]")
    assert format_context(ImageAnnotation("x", ["Only a caption."])) == \
        "Captions:\nOnly a caption."

    lines = tmp_path / "other.jsonl"
    lines.write_text(
        json.dumps({"image": "x/1.jpg", "captions": "One caption.",
                    "boxes": [{"label": "cat", "box": [0.1, 0.2, 0.3, 0.4]},
                              {"category": "mat", "bbox": [0, 0.5, 1, 1]}]}) + "\n\n"
        + json.dumps({"image": "x/2.jpg", "captions": ["A.", "B."], "boxes": [["tree", 0, 0, 1, 1]]})
        + "\n" + json.dumps({"image": "x/3.jpg", "captions": []}) + "\n")
    annotations = read_annotations(str(lines))
    assert [a.image for a in annotations] == ["x/1.jpg", "x/2.jpg"]  # x/3 has nothing to say
    assert annotations[0].boxes == [Box("cat", 0.1, 0.2, 0.3, 0.4), Box("mat", 0, 0.5, 1, 1)]
    assert annotations[1].captions == ["A.", "B."]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "y.jpg", "captions": "c",
                               "boxes": [{"label": "dog", "box": [10, 20, 30, 40]}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: box .*normalised"):
        read_annotations(str(bad))
    with pytest.raises(ValueError, match="not both"):
        read_annotations(str(tmp_path / "captions_x.json") + "," + str(lines))
    (tmp_path / "llava.json").write_text("[]")
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        read_annotations(str(tmp_path / "llava.json"))
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_annotations(str(tmp_path / "absent.json"))


# ----------------------------------------------------------------------------------------------
# A run against a scripted endpoint


def _image_of(body):
    """Which picture a request is about: its last user message says "Picture N"."""
    return int(body["messages"][-1]["content"].split("Picture ")[1].split()[0])


def _scripted():
    """Picture 1: an unusable reply; 2: HTTP 500 every time; 3: 429 once, then a reply; the
    others: a conversation (with stray text, and a question asked twice)."""
    calls = {}

    def behave(body, call):
        number = _image_of(body)
        calls[number] = calls.get(number, 0) + 1
        if number == 1:
            return ("reply", "I am sorry, I cannot see images.")
        if number == 2:
            return ("status", 500)
        if number == 3 and calls[number] == 1:
            return ("status", 429)
        return ("reply", f"Sure!\nQuestion: What is in picture {number}?\nAnswer: A dog.\n\n"
                         f"Question: What is the dog doing?\nAnswer: It sits still.\n\n"
                         f"Question: what is in picture {number}\nAnswer: A repeated question.")

    return behave


def _lines(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _args(spec, url, output, *extra):
    return [f"--annotations={spec}", "--kind=conversation", f"--endpoint={url}",
            "--model=fake", f"--output={output}", "--no-progress", "--retry-delay=0.01",
            "--max-retry-delay=0.02", "--retries=2", "--concurrency=3", *extra]


def test_generate_counts_rejects_and_failures_then_loads_in_the_pipeline(tmp_path, fake_llm):
    from llava_jax.data import default_data_config, make_dataset, skip_counts
    from llava_jax.data.testing import build_test_tokenizer

    names = [f"img{i}.png" for i in range(6)]
    spec = write_coco(str(tmp_path), names)
    server = fake_llm(_scripted())
    output, llava = str(tmp_path / "conv.jsonl"), str(tmp_path / "llava.json")
    summary = cli.run(cli.parse_args(_args(spec, server.url, output, f"--to-llava={llava}")))
    assert (summary["ok"], summary["unparsable"], summary["failed"]) == (4, 1, 1)
    assert summary["retried"] == 2 + 1 and summary["reasons"] == {"no_turns": 1}
    assert summary["tokens"] == 15 * 5
    written = _lines(output)
    assert sorted(r["image"] for r in written) == ["img0.png", "img3.png", "img4.png", "img5.png"]
    for record in written:
        assert record["kind"] == "conversation" and record["model"] == "fake"
        assert [t["from"] for t in record["conversations"]] == ["human", "gpt"] * 3
        assert record["notes"] == ["stray_text"]
    rejected = _lines(str(tmp_path / "conv.rejected.jsonl"))
    assert [(r["image"], r["reason"]) for r in rejected] == [("img1.png", "no_turns")]
    assert rejected[0]["reply"] == "I am sorry, I cannot see images."
    # The system prompt and both few-shot examples went out with every request.
    body = server.requests[0][0]
    assert [m["role"] for m in body["messages"]] == ["system"] + ["user", "assistant"] * 2 + ["user"]
    assert body["model"] == "fake"

    samples = json.load(open(llava))
    assert len(samples) == 4 and summary["llava"]["repeated_questions"] == 4
    for sample in samples:
        assert sample["id"] == os.path.splitext(sample["image"])[0] + "-conversation"
        values = [t["value"] for t in sample["conversations"]]
        assert len(values) == 4 and sum(v.count(IMAGE_TOKEN) for v in values) == 1
        assert values[0].startswith(IMAGE_TOKEN + "\n") or values[0].endswith("\n" + IMAGE_TOKEN)

    # The project's data pipeline reads the file as it is: every sample, nothing skipped.
    config = default_data_config(stage=2)
    config.json_paths = (llava,)
    config.image_roots = (str(tmp_path / "images"),)
    config.update(aspect="square", max_length=256, buckets=(256,), packing=False,
                  max_images_per_row=1, use_index_cache=False, shuffle=False)
    tokenizer = build_test_tokenizer()
    iterator = make_dataset(config, tokenizer, num_image_tokens=4,
                            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                            image_size=16, batch_size=2, shard_index=0, shard_count=1)
    rows = sum(int((batch["segment_ids"] > 0).any(axis=1).sum()) for batch in iterator)
    assert rows == 4 and skip_counts(iterator) == {}

    # Resuming: only the failed image is asked again; rejected ones are not (unless asked to).
    server.requests.clear()
    again = cli.run(cli.parse_args(_args(spec, server.url, output)))
    assert again["already_done"] == 5 and again["failed"] == 1 and again["ok"] == 0
    assert {_image_of(b) for b, _ in server.requests} == {2}
    server.requests.clear()
    again = cli.run(cli.parse_args(_args(spec, server.url, output, "--retry-unparsable")))
    assert {_image_of(b) for b, _ in server.requests} == {1, 2}
    assert len(_lines(output)) == 4  # no duplicates


def test_detail_pairs_each_image_with_a_seeded_instruction(tmp_path, fake_llm):
    spec = write_coco(str(tmp_path), [f"d{i}.png" for i in range(8)])
    server = fake_llm(lambda body, call: (
        "reply", "A brown dog sits on a green lawn in the middle of a sunny garden."))
    output = str(tmp_path / "detail.jsonl")
    args = _args(spec, server.url, output, "--few-shot=0", "--sampling-seed=5")
    args[1] = "--kind=detail"
    assert cli.main(args) == 0
    seeds = {_image_of(body): body["seed"] for body, _ in server.requests}
    assert len(seeds) == 8 and len(set(seeds.values())) == 8
    prompts = load_prompts("detail")
    records = _lines(output)
    questions = {r["image"]: r["conversations"][0]["value"] for r in records}
    assert len(records) == 8 and set(questions.values()) <= set(prompts.instructions)
    assert len(set(questions.values())) > 1  # chosen per image
    assert all(len(body["messages"]) == 2 for body, _ in server.requests)  # --few-shot=0
    os.remove(output)
    server.requests.clear()
    assert cli.main(args) == 0
    assert {r["image"]: r["conversations"][0]["value"] for r in _lines(output)} == questions
    assert {_image_of(body): body["seed"] for body, _ in server.requests} == seeds


def test_interrupted_run_resumes_without_duplicates(tmp_path, fake_llm):
    names = [f"k{i}.png" for i in range(8)]
    spec = write_coco(str(tmp_path), names)
    answer = "Question: What is here?\nAnswer: A dog on the grass."
    # The first three replies come at once, then the endpoint hangs: the run is killed.
    server = fake_llm(lambda body, call: ("reply", answer) if call < 3
                      else ("sleep", 60, ("reply", answer)))
    output = str(tmp_path / "run.jsonl")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [sys.executable, "-m", "llava_jax.datagen", *_args(spec, server.url, output,
                                                          "--concurrency=1")],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(output) and len(_lines(output)) == 3):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        while len(server.requests) < 4:  # the fourth request is in flight
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    first = {r["image"] for r in _lines(output)}
    with open(output, "a") as handle:
        handle.write('{"image": "k3.png", "kind": "conv')  # a line torn by the kill

    server = fake_llm(lambda body, call: ("reply", answer))
    summary = cli.run(cli.parse_args(_args(spec, server.url, output)))
    assert summary["already_done"] == 3 and summary["ok"] == 5
    records = _lines(output)
    assert sorted(r["image"] for r in records) == names  # each image once
    assert {r["image"] for r in records[:3]} == first
    assert len(server.requests) == 5


def test_to_llava_deduplicates_and_places_the_image_tag(tmp_path):
    def record(image, kind, *questions):
        turns = []
        for q in questions:
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": f"About {q}"}]
        return {"image": image, "kind": kind, "conversations": turns}

    records = [record(f"p{i}.jpg", "conversation", "Q one?", "Q two?") for i in range(40)]
    records += [record("p0.jpg", "conversation", "Other?"),  # a duplicate (kind, image)
                record("p0.jpg", "detail", "Describe it."),  # another kind: kept
                record("p1.jpg", "complex", "Why?", "why"),  # repeated question
                {"image": "p2.jpg", "kind": "detail", "conversations": [{"from": "gpt"}]}]
    samples, stats = to_llava_records(records, seed=3, image_prefix="coco/")
    assert stats == {"samples": 42, "duplicates": 1, "repeated_questions": 1, "malformed": 1}
    assert samples[0]["image"] == "coco/p0.jpg" and samples[0]["conversations"][2]["value"] == \
        "Q two?"
    firsts = [s["conversations"][0]["value"] for s in samples]
    before = sum(v.startswith(IMAGE_TOKEN + "\n") for v in firsts)
    after = sum(v.endswith("\n" + IMAGE_TOKEN) for v in firsts)
    assert before + after == 42 and before > 5 and after > 5  # both placements, at random
    assert to_llava_records(records, seed=3, image_prefix="coco/")[0] == samples  # seeded

    # Convert-only mode merges several generated files.
    for name, part in (("a.jsonl", records[:20]), ("b.jsonl", records[20:])):
        with open(tmp_path / name, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in part)
    out = tmp_path / "merged.json"
    assert cli.main([f"--output={tmp_path / 'a.jsonl'}", f"--merge={tmp_path / 'b.jsonl'}",
                     f"--to-llava={out}", "--seed=3", "--image-prefix=coco/"]) == 0
    assert json.load(open(out)) == samples


def test_command_line_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli.parse_args(["--output=x.jsonl"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--annotations=a.json", "--output=x.jsonl", "--kind=detail"])
    base = ["--kind=detail", "--endpoint=http://127.0.0.1:9/v1", "--model=m",
            f"--output={tmp_path / 'o.jsonl'}", "--no-progress"]
    assert cli.main([f"--annotations={tmp_path / 'none.json'}", *base]) == 2
    assert "does not exist" in capsys.readouterr().err
    spec = write_coco(str(tmp_path), ["e.png"])
    monkeypatch.delenv("LLAVA_NO_SUCH_KEY", raising=False)
    assert cli.main([f"--annotations={spec}", *base, "--api-key-env=LLAVA_NO_SUCH_KEY"]) == 2
    assert "LLAVA_NO_SUCH_KEY" in capsys.readouterr().err
    # Nothing listens on port 9: the request fails (retried), the run finishes with status 1.
    assert cli.main([f"--annotations={spec}", *base, "--retries=1", "--retry-delay=0.01"]) == 1
    assert "failed 1" in capsys.readouterr().out


def test_datagen_and_the_judge_client_do_not_import_jax():
    # Generating data or judging answers needs no accelerator stack.
    code = ("import sys, llava_jax.datagen.__main__, llava_jax.evaluation.llava_bench; "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_prompt_files_are_package_data():
    import ast
    import fnmatch

    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    package_data = next(ast.literal_eval(k.value) for node in ast.walk(tree)
                        if isinstance(node, ast.Call) for k in node.keywords
                        if k.arg == "package_data")
    patterns = package_data["llava_jax.datagen"]
    root = os.path.join(REPO, "llava_jax", "datagen")
    files = [os.path.relpath(os.path.join(folder, name), root)
             for folder, _, names in os.walk(os.path.join(root, "prompts")) for name in names
             if "__pycache__" not in folder]
    assert files and all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files), files
