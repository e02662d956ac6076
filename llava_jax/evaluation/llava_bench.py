"""LLaVA-Bench (COCO and In-the-Wild): a text-only LLM judge rates the model's answer against a
reference answer.

The original (haotian-liu/LLaVA `llava/eval/eval_gpt_review_bench.py` and
`summarize_gpt_review.py`) shows GPT-4 the image's description (captions), the question, the
reference answer (Assistant 1: a text-only GPT-4 answer from the same description) and the
model's answer (Assistant 2), and asks for two 1-10 scores on the first line (helpfulness,
relevance, accuracy, level of detail). Per category (conversation, detail, complex) and
overall it reports mean(model) / mean(reference) x 100, the "relative score", and both means.
Here the rubric is in our own words; the rules are the original's:

  * scores: the first line holds two numbers, separated by spaces or a comma ("8 7",
    "8, 7"); also read (where the original gives up): "Assistant 1: 8" / "Assistant 2: 7"
    labels anywhere in the text. Scores outside [0, 10] are not scores.
  * an unparsable judgement counts as -1 / -1 and stays in the means, as in the original
    (the count is reported, and the means over parsed judgements only beside them);
  * greedy answers from the model (`tasks.answer_questions`), the judge at temperature 0.2.

Files: the model's answers are --output (as every task); the judgements go to
`<output stem>_reviews.jsonl` ({question_id, category, answer_id, scores: [reference, model],
parsed, content, judge_model}), appended as they arrive; a rerun judges only questions with no
judgement of their current answer. Reference answers written by --reference-endpoint go to
--reference (default `<output stem>_reference.jsonl`), resumable the same way.

Pure Python (no jax): requests go through `openai_client`.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Sequence

from llava_jax.evaluation import scorers
from llava_jax.evaluation.jsonl import read_records
from llava_jax.evaluation.openai_client import ChatClient, Counters, Reply, Request

CATEGORIES = ("conversation", "detail", "complex")
_CATEGORY_NAMES = {"conv": "conversation", "conversation": "conversation",
                   "detail": "detail", "complex": "complex"}
JUDGE_TEMPERATURE = 0.2  # the original's

JUDGE_SYSTEM = "You are a careful, impartial reviewer who checks how good answers are."
RUBRIC = (
    "Two AI assistants answered the question above about an image. The image itself is not "
    "shown; the description above stands in for it. Rate each answer's helpfulness, relevance, "
    "accuracy and level of detail, and give each assistant one overall score from 1 to 10, "
    "where higher means better.\n"
    "On the first line write only the two scores, Assistant 1's first, separated by a single "
    "space. From the second line on, explain your ratings. Judge each answer on its merits "
    "alone: neither the order in which they appear nor their length should sway you.")
REFERENCE_SYSTEM = (
    "You are an AI visual assistant. You cannot see the image, but you are given what people "
    "wrote about it. Answer the user's question as if you were looking at the image yourself, "
    "without mentioning that you were given a description.")

_LABELLED = re.compile(r"assistant\s*([12])\s*(?:'s)?\s*(?:score)?\s*[:=\-]?\s*"
                       r"(\d+(?:\.\d+)?)(?:\s*/\s*10)?", re.IGNORECASE)


def category_name(category: str | None) -> str:
    """"conv" (the original's question files) -> "conversation"; others as they are."""
    return _CATEGORY_NAMES.get((category or "").strip().lower(), category or "other")


# ----------------------------------------------------------------------------------------------
# Judgements


def _score(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 <= value <= 10 else None


def parse_judge_scores(text: str | None) -> tuple[float, float] | None:
    """(reference score, model score) of a judgement, or None when it holds none (see the
    module docstring for the accepted forms)."""
    if not text or not text.strip():
        return None
    first = text.strip().split("\n", 1)[0].replace(",", " ").split()
    if len(first) == 2:
        scores = _score(first[0].rstrip(".")), _score(first[1].rstrip("."))
        if None not in scores:
            return scores
    labelled: dict[str, float] = {}
    for match in _LABELLED.finditer(text):
        labelled.setdefault(match.group(1), _score(match.group(2)))
    if labelled.get("1") is not None and labelled.get("2") is not None:
        return labelled["1"], labelled["2"]
    return None


def judge_prompt(context: str, question: str, reference: str, answer: str) -> str:
    """The judge's user message: description, question, both answers, the rubric."""
    return (f"[Image description]\n{context}\n\n[Question]\n{question}\n\n"
            f"[Assistant 1]\n{reference}\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{answer}\n[End of Assistant 2]\n\n[Instructions]\n{RUBRIC}")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _relative(reference: float | None, model: float | None) -> float | None:
    return None if reference is None or model is None or reference <= 0 else \
        100.0 * model / reference


def summarize(reviews: Iterable[dict]) -> dict[str, Any]:
    """{"per_category": {category: stats}, "overall": stats}, stats = relative_score,
    reference_mean, model_mean (1-10, -1 for unparsable included), num_reviews,
    num_unparsable, parsed_only {relative_score, reference_mean, model_mean}."""
    groups: dict[str, list[dict]] = {}
    reviews = list(reviews)
    for review in reviews:
        groups.setdefault(category_name(review.get("category")), []).append(review)

    def stats(group: list[dict]) -> dict[str, Any]:
        reference = [float(r["scores"][0]) for r in group]
        model = [float(r["scores"][1]) for r in group]
        parsed = [r for r in group if r.get("parsed", True)]
        parsed_ref = _mean([float(r["scores"][0]) for r in parsed])
        parsed_model = _mean([float(r["scores"][1]) for r in parsed])
        return {"relative_score": _relative(_mean(reference), _mean(model)),
                "reference_mean": _mean(reference), "model_mean": _mean(model),
                "num_reviews": len(group), "num_unparsable": len(group) - len(parsed),
                "parsed_only": {"relative_score": _relative(parsed_ref, parsed_model),
                                "reference_mean": parsed_ref, "model_mean": parsed_model}}

    order = [c for c in CATEGORIES if c in groups] + sorted(set(groups) - set(CATEGORIES))
    return {"per_category": {c: stats(groups[c]) for c in order}, "overall": stats(reviews)}


def format_results(result: dict[str, Any]) -> str:
    """The table printed at the end: relative score and both means per category."""
    def cell(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["category\trelative\treference\tmodel\treviews\tunparsable"]
    for name, s in {**result["per_category"], "overall": result["overall"]}.items():
        lines.append(f"{name}\t{cell(s['relative_score'])}\t{cell(s['reference_mean'], 2)}\t"
                     f"{cell(s['model_mean'], 2)}\t{s['num_reviews']}\t{s['num_unparsable']}")
    notes = [f"{result[k]} {label}" for k, label in (
        ("num_unjudged", "questions not judged (judge requests failed: run again)"),
        ("num_no_reference", "questions without a reference answer"),
        ("num_no_answer", "questions without a model answer")) if result.get(k)]
    return "\n".join(lines + notes)


# ----------------------------------------------------------------------------------------------
# Files


def read_contexts(path: str) -> dict[str, str]:
    """{image: description} of a context JSONL ({image, caption | captions: str or list})."""
    contexts = {}
    for number, record in enumerate(scorers.read_jsonl(path), start=1):
        caption = record.get("caption", record.get("captions"))
        if not isinstance(record.get("image"), str) or caption is None:
            raise ValueError(f"{path}:{number}: a context line needs 'image' and 'caption' "
                             "(a string or a list of strings).")
        contexts[record["image"]] = (caption if isinstance(caption, str)
                                     else "\n".join(map(str, caption)))
    return contexts


def read_texts(path: str) -> dict[str, str]:
    """{question_id (as str): text} of an answers-like JSONL; the last line of an id wins."""
    if not os.path.exists(path):
        return {}
    return {str(r["question_id"]): r["text"] for r in read_records(path)
            if "question_id" in r and isinstance(r.get("text"), str)}


def reviews_path(output: str) -> str:
    return os.path.splitext(output)[0] + "_reviews.jsonl"


def default_reference_path(output: str) -> str:
    return os.path.splitext(output)[0] + "_reference.jsonl"


def read_reviews(path: str) -> dict[str, dict]:
    """{question_id (str): the last judgement of it}."""
    if not os.path.exists(path):
        return {}
    return {str(r["question_id"]): r for r in read_records(path) if "question_id" in r}


def _open_append(path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb+") as handle:  # drop a line torn by a killed run
            data = handle.read()
            if not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def _append(handle, record: dict) -> None:
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------------
# Runs


def generate_references(questions: Sequence, contexts: dict[str, str], client: ChatClient,
                        path: str, *, progress: bool = True) -> Counters:
    """Text-only reference answers (the description + the question) for the questions that
    have none in `path`, appended to it as {question_id, text, answer_id, model_id}."""
    have = read_texts(path)
    todo = {str(q.question_id): q for q in questions if str(q.question_id) not in have}
    requests = (Request(qid, [{"role": "system", "content": REFERENCE_SYSTEM},
                            {"role": "user", "content": f"{contexts[q.image]}\n\n{q.prompt}"}])
                for qid, q in todo.items())
    with _open_append(path) as handle:
        def on_reply(reply: Reply) -> bool:
            if not reply.ok:
                return False
            if not reply.text.strip():
                return False  # an empty reference: asked again next run
            qid = todo[reply.key].question_id
            _append(handle, {"question_id": qid, "text": reply.text.strip(),
                             "answer_id": f"ref-{qid}",
                             "model_id": client.model})
            return True

        return client.run(requests, on_reply, total=len(todo), progress=progress,
                          desc="reference answers")


def judge_answers(questions: Sequence, answers: dict[str, dict], references: dict[str, str],
                  contexts: dict[str, str], client: ChatClient, path: str, *,
                  progress: bool = True) -> Counters:
    """Judges every question that has an answer and a reference but no judgement of that
    answer (same answer_id) in `path`; appends the judgements."""
    done = read_reviews(path)
    todo: dict[str, Any] = {}
    for q in questions:
        qid = str(q.question_id)
        answer = answers.get(qid)
        if answer is None or qid not in references:
            continue
        review = done.get(qid)
        if review is not None and review.get("answer_id") == answer.get("answer_id"):
            continue
        todo[qid] = q

    def requests():
        for qid, q in todo.items():
            prompt = judge_prompt(contexts[q.image], q.prompt, references[qid],
                                  answers[qid]["text"])
            yield Request(qid, [{"role": "system", "content": JUDGE_SYSTEM},
                              {"role": "user", "content": prompt}])

    with _open_append(path) as handle:
        def on_reply(reply: Reply) -> bool:
            if not reply.ok:
                return False
            q = todo[reply.key]
            scores = parse_judge_scores(reply.text)
            _append(handle, {"question_id": q.question_id,
                             "category": category_name(q.category),
                             "answer_id": answers[reply.key].get("answer_id"),
                             "scores": list(scores) if scores else [-1, -1],
                             "parsed": scores is not None, "content": reply.text,
                             "judge_model": client.model})
            return scores is not None

        return client.run(requests(), on_reply, total=len(todo), progress=progress,
                          desc="judge")


def check_contexts(questions: Sequence, contexts: dict[str, str], path: str) -> None:
    missing = [q for q in questions if q.image not in contexts]
    if missing:
        raise ValueError(f"{len(missing)} questions have no context line in {path} (first: "
                         f"question {missing[0].question_id!r}, image {missing[0].image!r}).")


def score(questions: Sequence, answers: dict[str, dict], references: dict[str, str],
          reviews_file: str) -> dict[str, Any]:
    """The results from the judgements of the current answers, with the counts of questions
    left out (no answer, no reference, not judged)."""
    reviews = read_reviews(reviews_file)
    current, counts = [], {"num_no_answer": 0, "num_no_reference": 0, "num_unjudged": 0}
    for q in questions:
        qid = str(q.question_id)
        if qid not in answers:
            counts["num_no_answer"] += 1
        elif qid not in references:
            counts["num_no_reference"] += 1
        elif qid not in reviews or reviews[qid].get("answer_id") != answers[qid].get("answer_id"):
            counts["num_unjudged"] += 1
        else:
            current.append({**reviews[qid], "category": category_name(q.category)})
    result = summarize(current)
    result.update(counts, num_questions=len(questions), reviews_file=os.path.abspath(reviews_file))
    return result
