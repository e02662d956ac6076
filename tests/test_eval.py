"""llava_jax.eval: demo / scienceqa / vqa / pope end to end on a tiny random model saved with
the demo tokenizer (answers are garbage: we check formats, counts, resume and scoring)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from llava_jax import eval as llava_eval
from llava_jax.data import SHORT_ANSWER_PROMPT
from llava_jax.evaluation import (
    Question,
    evaluate_demo,
    merge_shards,
    read_answers,
    score_demo,
    scorers,
    shard_path,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "scorers")
COMMON = ["--batch-size=4", "--max-new-tokens=4", "--no-progress"]


@pytest.fixture(scope="module")
def demo_tokenizer():
    from llava_jax.data import demo

    return demo.load_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(demo_tokenizer):
    from llava_jax.models.config import get_preset
    from llava_jax.models.llava import create_model

    tok = demo_tokenizer
    config = get_preset("tiny", text={"vocab_size": len(tok)},
                        image_token_index=tok.convert_tokens_to_ids("<image>"),
                        pad_token_id=tok.pad_token_id)
    return create_model(config, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model, demo_tokenizer):
    from llava_jax.checkpoint import save_model

    return str(save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny",
                          tokenizer=demo_tokenizer))


def _lines(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_images(folder, names):
    rng = np.random.default_rng(0)
    for name in names:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path)


def test_score_demo_counts_exact_matches_per_category():
    questions = [Question(i, "q", None, "q", ref, cat)
                 for i, (ref, cat) in enumerate([("red", "color"), ("two", "count"),
                                                 ("blue", "color")])]
    result = score_demo(list(zip(questions, ["Red.", "three", "blue"])))
    assert result["num_correct"] == 2 and result["num_examples"] == 3
    assert result["per_category"] == {"color": 1.0, "count": 0.0}


def test_evaluate_demo_library_call(tiny_model, demo_tokenizer):
    result = evaluate_demo(tiny_model, demo_tokenizer, batch_size=8, limit=10, max_new_tokens=4)
    assert result["num_examples"] == 10
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["num_correct"] == round(result["accuracy"] * 10)
    assert set(result["per_category"]) <= {"color", "shape", "count", "position"}
    assert all(isinstance(prediction, str) for _, prediction, _ in result["examples"])


def test_demo_cli_writes_resumes_and_scores(tmp_path, checkpoint):
    output = str(tmp_path / "demo.jsonl")
    argv = ["--task=demo", f"--checkpoint={checkpoint}", f"--output={output}", *COMMON]
    assert llava_eval.main(argv + ["--limit=6"]) == 0
    first = _lines(output)
    assert [r["question_id"] for r in first] == list(range(6))
    assert all(set(r) >= {"question_id", "prompt", "text", "answer"} for r in first)
    results = json.load(open(tmp_path / "demo_results.json"))
    assert results["num_examples"] == 6 and 0.0 <= results["accuracy"] <= 1.0

    # A killed run leaves a torn last line; the resumed run drops it and answers the rest only.
    with open(output, "a") as handle:
        handle.write('{"question_id": 6, "te')
    assert llava_eval.main(argv + ["--limit=9"]) == 0
    resumed = _lines(output)
    assert resumed[:6] == first
    assert [r["question_id"] for r in resumed] == list(range(9))
    assert json.load(open(tmp_path / "demo_results.json"))["num_examples"] == 9


def test_scienceqa_end_to_end(tmp_path, checkpoint):
    source = os.path.join(FIXTURES, "scienceqa")
    questions = json.load(open(os.path.join(source, "llava_test_CQM-A.json")))
    images = tmp_path / "images"
    _write_images(images, [q["image"] for q in questions if "image" in q])
    output = str(tmp_path / "sqa.jsonl")
    assert llava_eval.main([
        "--task=scienceqa", f"--checkpoint={checkpoint}", f"--output={output}",
        f"--data={os.path.join(source, 'llava_test_CQM-A.json')}", f"--image-folder={images}",
        f"--problems={os.path.join(source, 'problems.json')}",
        f"--pid-splits={os.path.join(source, 'pid_splits.json')}", *COMMON]) == 0
    answers = _lines(output)
    assert [str(a["question_id"]) for a in answers] == [q["id"] for q in questions]
    for answer, question in zip(answers, questions):
        assert answer["prompt"] == scorers.build_scienceqa_prompt(question)
        assert set(answer) >= {"question_id", "prompt", "text", "answer_id", "model_id"}
    results = json.load(open(tmp_path / "sqa_results.json"))
    split = json.load(open(os.path.join(source, "pid_splits.json")))["test"]
    assert results["num_examples"] == len(split)
    answered_in_split = len({q["id"] for q in questions} & set(split))
    assert results["num_missing"] == len(split) - answered_in_split
    assert results["num_img_examples"] == sum("image" in q for q in questions if q["id"] in split)
    assert set(results["groups"]) == set(scorers.SCIENCEQA_GROUPS)


def test_vqa_end_to_end_with_ground_truth(tmp_path, checkpoint):
    truth = json.load(open(os.path.join(FIXTURES, "vqa", "textvqa_val.json")))["data"]
    questions = tmp_path / "questions.jsonl"
    with open(questions, "w") as handle:
        for entry in truth:
            handle.write(json.dumps({"question_id": entry["question_id"],
                                     "image": f"{entry['image_id']}.jpg",
                                     "text": entry["question"]}) + "\n")
    _write_images(tmp_path / "images", [f"{e['image_id']}.jpg" for e in truth])
    output = str(tmp_path / "vqa.jsonl")
    assert llava_eval.main([
        "--task=vqa", f"--checkpoint={checkpoint}", f"--output={output}", f"--data={questions}",
        f"--image-folder={tmp_path / 'images'}",
        f"--ground-truth={os.path.join(FIXTURES, 'vqa', 'textvqa_val.json')}", *COMMON]) == 0
    answers = _lines(output)
    assert len(answers) == len(truth)
    assert all(a["prompt"].endswith("\n" + SHORT_ANSWER_PROMPT) for a in answers)
    results = json.load(open(tmp_path / "vqa_results.json"))
    assert results["num_examples"] == len(truth) and results["num_missing"] == 0
    assert 0.0 <= results["accuracy"] <= 1.0


def test_pope_end_to_end(tmp_path, checkpoint):
    source = os.path.join(FIXTURES, "pope")
    questions = scorers.read_jsonl(os.path.join(source, "llava_pope_test.jsonl"))
    _write_images(tmp_path / "images", sorted({q["image"] for q in questions}))
    output = str(tmp_path / "pope.jsonl")
    assert llava_eval.main([
        "--task=pope", f"--checkpoint={checkpoint}", f"--output={output}",
        f"--data={os.path.join(source, 'llava_pope_test.jsonl')}",
        f"--image-folder={tmp_path / 'images'}",
        f"--pope-annotations={os.path.join(source, 'coco')}", *COMMON]) == 0
    assert len(_lines(output)) == len(questions)
    results = json.load(open(tmp_path / "pope_results.json"))
    categories = {q["category"] for q in questions}
    assert set(results["per_category"]) == categories
    for category, metrics in results["per_category"].items():
        assert metrics["num_examples"] == sum(q["category"] == category for q in questions)
        assert metrics["tp"] + metrics["fp"] + metrics["tn"] + metrics["fn"] == metrics["num_examples"]


def test_missing_inputs_are_clear_errors(tmp_path, checkpoint, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": "nope.png", "text": "Hi?"}) + "\n")
    base = ["--task=vqa", f"--output={tmp_path / 'a.jsonl'}", f"--data={questions}", *COMMON]
    assert llava_eval.main(base + [f"--checkpoint={tmp_path / 'absent'}"]) == 2
    assert "llava_config.json" in capsys.readouterr().err
    assert llava_eval.main(base + [f"--checkpoint={checkpoint}",
                                   f"--image-folder={tmp_path}"]) == 2
    assert "nope.png not found" in capsys.readouterr().err
    (tmp_path / "nope.png").write_bytes(b"not a png")
    assert llava_eval.main(base + [f"--checkpoint={checkpoint}",
                                   f"--image-folder={tmp_path}"]) == 2
    assert "cannot decode image" in capsys.readouterr().err


def test_shard_files_merge_in_question_order(tmp_path):
    output = str(tmp_path / "answers.jsonl")
    questions = [Question(i, "q", None, "q") for i in range(5)]
    assert shard_path(output, 0, 1) == output
    for index in range(2):
        with open(shard_path(output, index, 2), "w") as handle:
            for q in questions[index::2]:
                handle.write(json.dumps({"question_id": q.question_id, "text": str(index)}) + "\n")
    merge_shards(output, 2, questions)
    merged = read_answers(output, questions)
    assert [r["question_id"] for r in merged] == [0, 1, 2, 3, 4]
    assert [r["text"] for r in merged] == ["0", "1", "0", "1", "0"]
    shutil.rmtree(tmp_path)
