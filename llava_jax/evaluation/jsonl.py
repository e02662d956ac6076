"""JSON-lines files that runs append to and resume from (answers, replies, judgements).

No jax here: datagen and the LLaVA-Bench judge use these without loading a model.
"""

from __future__ import annotations

import json
import os


def truncate_torn_line(path: str) -> None:
    """Drops a partial last line left by a killed run, so appends start on a fresh line."""
    if not os.path.exists(path) or not os.path.getsize(path):
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def read_records(path: str) -> list[dict]:
    """The JSON objects of `path`, one a line ([] when absent); a torn or broken line is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
