"""Annotations -> LLM requests -> parsed samples in a resumable JSONL file.

Each image of one kind is one request. Every reply is written the moment it arrives (flushed
and fsynced): a usable one to the output JSONL,

    {"image", "kind", "conversations": [{"from": "human", "value"}, {"from": "gpt", "value"},
     ...] (no <image> yet), "model", "finish_reason", "usage", "notes"}

an unusable one, with its raw text and the reason, to `<output stem>.rejected.jsonl` (logged
and counted, never written as a sample). A run skips the (kind, image) pairs already in the
output, and those already rejected unless `retry_unparsable`; a line torn by a killed run is
dropped first. Requests that failed (no reply) are in neither file, so the next run asks again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import random
from typing import Iterator, Sequence

from llava_jax.datagen.annotations import ImageAnnotation, format_context
from llava_jax.datagen.parse import parse_reply
from llava_jax.datagen.prompts import PromptSet, build_messages
from llava_jax.evaluation.jsonl import read_records, truncate_torn_line
from llava_jax.evaluation.openai_client import ChatClient, Reply, Request

log = logging.getLogger(__name__)


def rejected_path(output: str) -> str:
    stem, _ = os.path.splitext(output)
    return f"{stem}.rejected.jsonl"


def done_keys(path: str) -> set[tuple[str, str]]:
    return {(r.get("kind"), r.get("image")) for r in read_records(path)}


def choose_instruction(prompts: PromptSet, image: str, seed: int) -> str | None:
    """The detail instruction of `image`: random, but the same on every run with `seed`."""
    if not prompts.instructions:
        return None
    return random.Random(f"{seed}:{image}").choice(prompts.instructions)


def request_seed(sampling_seed: int, image: str) -> int:
    """The `seed` sent with `image`'s request: fixed per (--sampling-seed, image), so endpoints
    that honour it (OpenAI, vLLM, llava_jax.serve) sample the same reply on every run."""
    digest = hashlib.sha256(f"{sampling_seed}:{image}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


def _append(handle, record: dict) -> None:
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def generate(annotations: Sequence[ImageAnnotation], *, kind: str, prompts: PromptSet,
             client: ChatClient, output: str, seed: int = 0, few_shot: int | None = None,
             sampling_seed: int | None = None, retry_unparsable: bool = False,
             progress: bool = True) -> dict:
    """Asks for the samples of the images not yet done; returns the run's summary
    (images, already_done, ok, unparsable, failed, retried, not_sent, tokens, stopped_by,
    reasons {rejection reason: count}, output, rejected)."""
    rejected = rejected_path(output)
    for path in (output, rejected):
        truncate_torn_line(path)
    done = done_keys(output) | (set() if retry_unparsable else done_keys(rejected))
    todo: list[ImageAnnotation] = []
    seen = set()
    for annotation in annotations:
        key = (kind, annotation.image)
        if key not in done and key not in seen:
            todo.append(annotation)
            seen.add(key)
    summary = {"images": len(annotations), "already_done": len(annotations) - len(todo),
               "output": output, "rejected": rejected}
    reasons: collections.Counter = collections.Counter()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

    def requests() -> Iterator[Request]:
        for index, annotation in enumerate(todo):
            params = ({} if sampling_seed is None
                      else {"seed": request_seed(sampling_seed, annotation.image)})
            yield Request(index, build_messages(prompts, format_context(annotation), few_shot),
                          params)

    with open(output, "a", encoding="utf-8") as good, \
            open(rejected, "a", encoding="utf-8") as bad:

        def on_reply(reply: Reply) -> bool:
            if not reply.ok:
                return False
            annotation = todo[reply.key]
            instruction = choose_instruction(prompts, annotation.image, seed)
            parsed = parse_reply(kind, reply.text, instruction=instruction,
                                 truncated=reply.truncated)
            base = {"image": annotation.image, "kind": kind, "model": client.model,
                    "finish_reason": reply.finish_reason}
            if not parsed.ok:
                reasons[parsed.reason] += 1
                log.warning("%s: unusable %s reply (%s): %r", annotation.image, kind,
                            parsed.reason, reply.text[:200])
                _append(bad, {**base, "reason": parsed.reason, "reply": reply.text})
                return False
            conversations = []
            for question, answer in parsed.turns:
                conversations += [{"from": "human", "value": question},
                                  {"from": "gpt", "value": answer}]
            _append(good, {**base, "conversations": conversations, "usage": reply.usage,
                           "notes": parsed.notes})
            return True

        counters = client.run(requests(), on_reply, total=len(todo), progress=progress,
                              desc=f"datagen {kind}")
    summary.update(counters.as_dict())
    summary["reasons"] = dict(reasons)
    return summary
