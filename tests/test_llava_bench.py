"""LLaVA-Bench: judge-score parsing, relative-score arithmetic on a table worked out by hand,
and `python -m llava_jax.eval --task=llava_bench` with a tiny model and a scripted judge
(reference answers written, unparsable judgements as -1 / -1, failures, resume)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax import eval as llava_eval
from llava_jax.evaluation import llava_bench
from llava_jax.evaluation.llava_bench import judge_prompt, parse_judge_scores, summarize


@pytest.mark.parametrize("text,expected", [
    ("8 7", (8.0, 7.0)),
    ("8, 7", (8.0, 7.0)),
    ("8,7\nAssistant 1 gave a more detailed answer.", (8.0, 7.0)),
    ("  7.5 6\n\nBoth are fine.", (7.5, 6.0)),
    ("9 10.", (9.0, 10.0)),
    ("Assistant 1: 8\nAssistant 2: 7", (8.0, 7.0)),
    ("Scores -> Assistant 1 score: 8/10, Assistant 2 score: 6/10", (8.0, 6.0)),
    ("garbage", None),
    ("", None),
    (None, None),
    ("8", None),
    ("Scores: 8 7", None),  # three words on the first line, no labels: the original's -1
    ("11 3", None),  # not a 1-10 score
    ("Assistant 1 is better than Assistant 2.", None),
    ("Assistant 1: 8", None),
])
def test_parse_judge_scores(text, expected):
    assert parse_judge_scores(text) == expected


def test_relative_scores_on_a_table_worked_out_by_hand():
    reviews = [
        {"category": "conv", "scores": [8, 6], "parsed": True},
        {"category": "conversation", "scores": [6, 6], "parsed": True},
        {"category": "detail", "scores": [10, 5], "parsed": True},
        {"category": "detail", "scores": [-1, -1], "parsed": False},
        {"category": "complex", "scores": [4, 8], "parsed": True},
    ]
    result = summarize(reviews)
    assert list(result["per_category"]) == ["conversation", "detail", "complex"]
    conv = result["per_category"]["conversation"]
    # reference (8 + 6) / 2 = 7, model (6 + 6) / 2 = 6: 6 / 7 x 100 = 85.71
    assert conv["reference_mean"] == 7 and conv["model_mean"] == 6
    assert conv["relative_score"] == pytest.approx(600 / 7)
    detail = result["per_category"]["detail"]
    # The unparsable judgement stays in as -1 / -1 (the original's rule): (10 - 1) / 2 = 4.5
    # and (5 - 1) / 2 = 2, so 2 / 4.5 x 100 = 44.44; over parsed judgements only: 5 / 10 = 50.
    assert (detail["reference_mean"], detail["model_mean"]) == (4.5, 2.0)
    assert detail["relative_score"] == pytest.approx(400 / 9)
    assert detail["num_unparsable"] == 1 and detail["num_reviews"] == 2
    assert detail["parsed_only"]["relative_score"] == pytest.approx(50.0)
    assert result["per_category"]["complex"]["relative_score"] == pytest.approx(200.0)
    overall = result["overall"]
    # reference (8 + 6 + 10 - 1 + 4) / 5 = 5.4, model (6 + 6 + 5 - 1 + 8) / 5 = 4.8: 88.89
    assert overall["reference_mean"] == pytest.approx(5.4)
    assert overall["model_mean"] == pytest.approx(4.8)
    assert overall["relative_score"] == pytest.approx(4.8 / 5.4 * 100)
    assert overall["num_reviews"] == 5 and overall["num_unparsable"] == 1
    # parsed only: reference 28 / 4 = 7, model 25 / 4 = 6.25
    assert overall["parsed_only"]["relative_score"] == pytest.approx(6.25 / 7 * 100)
    assert summarize([{"category": "detail", "scores": [-1, -1], "parsed": False}]
                     )["overall"]["relative_score"] is None
    table = llava_bench.format_results(result)
    assert "conversation\t85.7\t7.00\t6.00\t2\t0" in table
    assert "overall\t88.9\t5.40\t4.80\t5\t1" in table


def test_judge_prompt_holds_context_question_and_both_answers_in_order():
    prompt = judge_prompt("A dog on grass.", "What animal is it?", "A dog.", "A cat.")
    pieces = ["[Image description]\nA dog on grass.", "[Question]\nWhat animal is it?",
              "[Assistant 1]\nA dog.", "[Assistant 2]\nA cat.", llava_bench.RUBRIC]
    positions = [prompt.index(piece) for piece in pieces]
    assert positions == sorted(positions)


# ----------------------------------------------------------------------------------------------
# The command line, with a scripted judge


QUESTIONS = [(1, "conv", "What animal is in the picture?"),
             (2, "conv", "What colour is the grass?"),
             (3, "detail", "Describe the image in detail."),
             (4, "complex", "Why might the dog be sitting still?"),
             (5, "complex", "What could happen next?")]


@pytest.fixture
def bench(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / name)
    with open(tmp_path / "questions.jsonl", "w") as handle:
        for qid, category, text in QUESTIONS:
            handle.write(json.dumps({"question_id": qid, "image": "a.png" if qid < 4 else "b.png",
                                     "text": text, "category": category}) + "\n")
    with open(tmp_path / "context.jsonl", "w") as handle:
        handle.write(json.dumps({"image": "a.png", "caption": ["A dog sits on green grass.",
                                                               "A brown dog outdoors."]}) + "\n")
        handle.write(json.dumps({"image": "b.png", "caption": "A dog waits by a door."}) + "\n")
    return tmp_path


def _judge(question_text):
    """Scripted judgements: the reference gets 8, the model 6, except question 3 (garbage)."""
    if question_text == QUESTIONS[2][2]:
        return "I refuse to give numbers."
    return "8 6\nAssistant 1 is more accurate."


def _behave(fail=()):
    def behave(body, call):
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if system == llava_bench.REFERENCE_SYSTEM:
            return ("reply", f"Reference answer to: {user.splitlines()[-1]}")
        question = user.split("[Question]\n")[1].split("\n")[0]
        if question in fail:
            return ("status", 500)
        return ("reply", _judge(question))
    return behave


def _argv(bench, checkpoint, url, *extra):
    return ["--task=llava_bench", f"--checkpoint={checkpoint}",
            f"--data={bench / 'questions.jsonl'}", f"--image-folder={bench / 'images'}",
            f"--context={bench / 'context.jsonl'}", f"--output={bench / 'answers.jsonl'}",
            f"--judge-endpoint={url}", "--judge-model=judge", "--batch-size=4",
            "--max-new-tokens=4", "--no-progress", "--judge-retries=1",
            "--judge-retry-delay=0.01", *extra]


def _lines(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_llava_bench_cli_with_generated_references(bench, tiny_demo_checkpoint, fake_llm):
    server = fake_llm(_behave(fail=(QUESTIONS[4][2],)))
    argv = _argv(bench, tiny_demo_checkpoint, server.url, f"--reference-endpoint={server.url}",
                 "--reference-retries=0")
    assert llava_eval.main(argv) == 1  # question 5's judge request failed: rerun to judge it
    references = _lines(bench / "answers_reference.jsonl")
    references.sort(key=lambda r: r["question_id"])  # written in arrival order
    assert [r["question_id"] for r in references] == [1, 2, 3, 4, 5]
    assert references[0]["text"] == f"Reference answer to: {QUESTIONS[0][2]}"
    assert references[0]["model_id"] == "judge"  # --reference-model defaults to the judge's
    # Requests run concurrently, so they arrive in any order: pick question 1's by its text.
    reference_prompts = [b["messages"][1]["content"] for b, _ in server.requests
                         if b["messages"][0]["content"] == llava_bench.REFERENCE_SYSTEM]
    assert len(reference_prompts) == 5
    assert f"A dog sits on green grass.\nA brown dog outdoors.\n\n{QUESTIONS[0][2]}" in \
        reference_prompts
    answers = _lines(bench / "answers.jsonl")
    assert [a["question_id"] for a in answers] == [1, 2, 3, 4, 5]
    assert all("<image>" not in a["prompt"] and a["prompt"] == q[2]
               for a, q in zip(answers, QUESTIONS))
    judge_bodies = [b for b, _ in server.requests
                    if b["messages"][0]["content"] == llava_bench.JUDGE_SYSTEM]
    assert all(b["temperature"] == 0.2 and b["model"] == "judge" for b in judge_bodies)
    reviews = _lines(bench / "answers_reviews.jsonl")
    assert sorted(r["question_id"] for r in reviews) == [1, 2, 3, 4]  # in arrival order
    by_id = {r["question_id"]: r for r in reviews}
    assert by_id[3]["scores"] == [-1, -1] and by_id[3]["parsed"] is False
    assert by_id[1]["scores"] == [8, 6] and by_id[1]["category"] == "conversation"
    judged = {b["messages"][1]["content"].split("[Question]\n")[1].split("\n")[0]:
              b["messages"][1]["content"] for b in judge_bodies}
    for answer, reference in zip(answers, references):
        assert (f"[Assistant 1]\n{reference['text']}\n[End of Assistant 1]\n\n"
                f"[Assistant 2]\n{answer['text']}\n[End of Assistant 2]") in judged[answer["prompt"]]

    results = json.load(open(bench / "answers_results.json"))
    assert results["num_unjudged"] == 1 and results["judge"]["failed"] == 1
    assert results["judge"]["unparsable"] == 1 and results["judge"]["ok"] == 3
    per = results["per_category"]
    assert per["conversation"]["relative_score"] == pytest.approx(75.0)  # 6 / 8
    assert per["detail"]["relative_score"] is None  # only the -1 / -1 judgement
    assert per["detail"]["num_unparsable"] == 1
    assert per["complex"]["num_reviews"] == 1  # question 5 is not judged yet
    # overall: reference (8 + 8 - 1 + 8) / 4 = 5.75, model (6 + 6 - 1 + 6) / 4 = 4.25
    assert results["overall"]["relative_score"] == pytest.approx(4.25 / 5.75 * 100)

    # Rerun: no answer, reference or judgement is asked again but question 5's judgement.
    server.behave = _behave()
    server.requests.clear()
    assert llava_eval.main(argv) == 0
    assert len(server.requests) == 1 and QUESTIONS[4][2] in \
        server.requests[0][0]["messages"][1]["content"]
    assert len(_lines(bench / "answers.jsonl")) == 5
    results = json.load(open(bench / "answers_results.json"))
    assert results["num_unjudged"] == 0 and results["overall"]["num_reviews"] == 5
    assert results["per_category"]["complex"]["relative_score"] == pytest.approx(75.0)


def test_llava_bench_needs_its_inputs(bench, tiny_demo_checkpoint, fake_llm, capsys):
    server = fake_llm(_behave())
    with pytest.raises(SystemExit):
        llava_eval.parse_args(["--task=llava_bench", "--checkpoint=x", "--data=q.jsonl",
                               "--output=o.jsonl", "--context=c.jsonl", "--judge-model=m",
                               "--judge-endpoint=http://127.0.0.1:1/v1"])
    assert "--reference or --reference-endpoint" in capsys.readouterr().err
    reference = bench / "ref.jsonl"
    reference.write_text(json.dumps({"question_id": 1, "text": "A dog."}) + "\n")
    argv = _argv(bench, tiny_demo_checkpoint, server.url, f"--reference={reference}")
    assert llava_eval.main(argv) == 2
    assert "4 questions have no reference answer" in capsys.readouterr().err
    with open(bench / "context.jsonl", "w") as handle:
        handle.write(json.dumps({"image": "a.png", "caption": "A dog."}) + "\n")
    assert llava_eval.main(argv) == 2
    assert "no context line" in capsys.readouterr().err and not server.requests
