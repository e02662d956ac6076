"""Answers files: append-and-resume JSONL writing, per-process shards and their merge.

Owns the on-disk answers format (one JSON record per line, model_vqa's {question_id, prompt,
text, answer_id, model_id, metadata} unless the caller builds its own records): which ids a
file already holds (`done_ids`), the shard file of process i of n (`shard_path`), dropping a
line torn by a killed run, writing answers batch by batch (`write_answers`, flushed and
fsynced so that an interrupted run resumes where it stopped), reading them back in question
order (`read_answers`) and merging shards (`merge_shards`).

May import tree/, models/, data/, checkpoint and inference/ (tests/test_layout.py); nothing of
training/ or convert/.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Callable, Sequence

from llava_jax.evaluation import scorers
from llava_jax.evaluation.jsonl import truncate_torn_line
from llava_jax.evaluation.tasks import Question, answer_questions


def done_ids(path: str) -> set[str]:
    """Question ids (as strings) already answered in `path` (a torn last line is ignored)."""
    if not os.path.exists(path):
        return set()
    ids = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                ids.add(str(json.loads(line)["question_id"]))
            except (json.JSONDecodeError, KeyError):
                continue  # an interrupted write: that question is answered again
    return ids


def shard_path(output: str, index: int, count: int) -> str:
    """The answers file of process `index` of `count`: `output` itself for one process, else
    `<output stem>.<index>-of-<count><ext>` (each process appends to its own file)."""
    if count == 1:
        return output
    stem, ext = os.path.splitext(output)
    return f"{stem}.{index}-of-{count}{ext or '.jsonl'}"


def write_answers(model, tokenizer, questions: Sequence[Question], output: str, *,
                  model_id: str, template: str, batch_size: int, max_new_tokens: int,
                  image_root: str | None, progress: bool = True,
                  make_record: Callable[[Question, str], dict] | None = None,
                  skip: set[str] = frozenset(), processor=None) -> int:
    """Answers the questions not yet in `output` (nor in `skip`), appending one JSON line
    each; returns how many were answered now.

    `make_record(question, text)` builds a line (default: model_vqa's answer record with a
    fresh answer_id); `skip` holds ids answered elsewhere (the merged file of an earlier
    multi-process run). Generation arguments are those of `tasks.answer_questions`.
    """
    truncate_torn_line(output)
    answered = done_ids(output) | set(skip)
    todo = [q for q in questions if str(q.question_id) not in answered]
    if not todo:
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

    def default_record(question: Question, text: str) -> dict:
        return {"question_id": question.question_id, "prompt": question.prompt, "text": text,
                "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}

    make_record = make_record or default_record
    with open(output, "a", encoding="utf-8") as handle:
        for batch in answer_questions(model, tokenizer, todo, template=template,
                                      batch_size=batch_size, max_new_tokens=max_new_tokens,
                                      image_root=image_root, progress=progress,
                                      processor=processor):
            handle.writelines(json.dumps(make_record(q, text)) + "\n" for q, text in batch)
            # On disk before the next batch starts: a killed run loses at most one batch.
            handle.flush()
            os.fsync(handle.fileno())
    return len(todo)


def read_answers(path: str, questions: Sequence[Question]) -> list[dict]:
    """Answer records in question-file order (POPE pairs answers with labels by position);
    the last record of a repeated id wins."""
    by_id = {str(record["question_id"]): record for record in scorers.read_jsonl(path)}
    return [by_id[str(q.question_id)] for q in questions if str(q.question_id) in by_id]


def merge_shards(output: str, count: int, questions: Sequence[Question]) -> None:
    """Process 0 after the barrier: `output` (answers of earlier runs) and the `count` shard
    files -> `output` in question order (a shard's record of an id wins)."""
    records = ({str(r["question_id"]): r for r in scorers.read_jsonl(output)}
               if os.path.exists(output) else {})
    for index in range(count):
        path = shard_path(output, index, count)
        if os.path.exists(path):
            records.update({str(r["question_id"]): r for r in scorers.read_jsonl(path)})
    with open(output, "w", encoding="utf-8") as handle:
        for question in questions:
            record = records.get(str(question.question_id))
            if record is not None:
                handle.write(json.dumps(record) + "\n")
