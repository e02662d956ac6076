"""Generated JSONL -> LLaVA training JSON, the format `llava_jax.train` reads as it is.

    [{"id": "<image stem>-<kind>", "image": "<prefix><image>",
      "conversations": [{"from": "human", "value": "<image>\\nQ1"}, {"from": "gpt", ...}, ...]}]

`<image>` goes before or after the first question, at random (seeded per sample), as in the
paper's released data. Deduplicated: one sample per (kind, image), the first in file order
(several runs or merged files can repeat one); a question asked twice in one conversation
keeps its first round; samples left with no round are dropped. The file is written whole,
then renamed into place.
"""

from __future__ import annotations

import json
import os
import random
from typing import Sequence

from llava_jax.data.conversation import IMAGE_TOKEN
from llava_jax.evaluation.jsonl import read_records


def _question_key(text: str) -> str:
    return " ".join(text.lower().split()).rstrip("?.! ")


def _rounds(record: dict) -> list[tuple[str, str]] | None:
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) % 2:
        return None
    rounds = []
    for human, gpt in zip(turns[::2], turns[1::2]):
        if not (isinstance(human, dict) and isinstance(gpt, dict)
                and human.get("from") == "human" and gpt.get("from") == "gpt"
                and isinstance(human.get("value"), str) and isinstance(gpt.get("value"), str)):
            return None
        question = human["value"].replace(IMAGE_TOKEN, "").strip()
        answer = gpt["value"].replace(IMAGE_TOKEN, "").strip()
        if question and answer:
            rounds.append((question, answer))
    return rounds


def to_llava_records(records: Sequence[dict], *, seed: int = 0,
                     image_prefix: str = "") -> tuple[list[dict], dict]:
    """LLaVA records from generated ones, and counts {samples, duplicates,
    repeated_questions, malformed}."""
    stats = {"samples": 0, "duplicates": 0, "repeated_questions": 0, "malformed": 0}
    seen, samples = set(), []
    for record in records:
        image, kind = record.get("image"), record.get("kind")
        rounds = _rounds(record) if isinstance(image, str) else None
        if rounds is None:
            stats["malformed"] += 1
            continue
        if (kind, image) in seen:
            stats["duplicates"] += 1
            continue
        seen.add((kind, image))
        asked, kept = set(), []
        for question, answer in rounds:
            key = _question_key(question)
            if key in asked:
                stats["repeated_questions"] += 1
                continue
            asked.add(key)
            kept.append((question, answer))
        if not kept:
            stats["malformed"] += 1
            continue
        sample_id = f"{os.path.splitext(os.path.basename(image))[0]}-{kind}"
        first = kept[0][0]
        if random.Random(f"{seed}:{sample_id}").random() < 0.5:
            first = f"{IMAGE_TOKEN}\n{first}"
        else:
            first = f"{first}\n{IMAGE_TOKEN}"
        conversations = []
        for number, (question, answer) in enumerate(kept):
            conversations += [{"from": "human", "value": first if number == 0 else question},
                              {"from": "gpt", "value": answer}]
        samples.append({"id": sample_id, "image": image_prefix + image,
                        "conversations": conversations})
    stats["samples"] = len(samples)
    return samples, stats


def write_llava_json(jsonl_paths: Sequence[str], output: str, *, seed: int = 0,
                     image_prefix: str = "") -> dict:
    """Converts the generated JSONL files (merged in order) into one LLaVA JSON file."""
    records = []
    for path in jsonl_paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"generated file {path} does not exist.")
        records += read_records(path)
    samples, stats = to_llava_records(records, seed=seed, image_prefix=image_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    temporary = f"{output}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(samples, handle, ensure_ascii=False, indent=1)
    os.replace(temporary, output)
    return stats
