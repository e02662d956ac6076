"""The prompts: a system message and hand-written few-shot examples per kind of sample.

They are plain text files, edited like any other (in the package: llava_jax/datagen/prompts/;
`--prompts=DIR` reads DIR/<kind>/ instead, with the same layout):

    <kind>/system.txt          the system message
    <kind>/NNN_context.txt     an example's input: captions and boxes, as `format_context`
                               writes them
    <kind>/NNN_reply.txt       the reply the LLM should give for it
    detail/instructions.txt    the user requests a detailed description is paired with, one a
                               line (# starts a comment); one is chosen at random per image

The design follows the paper: the LLM never sees the image and writes as if it did;
conversations ask about object types, counts, actions, locations and relative positions;
complex reasoning asks for step-by-step logic; examples go in as earlier user / assistant
turns, in NNN order.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

KINDS = ("conversation", "detail", "complex")
PACKAGE_PROMPTS = Path(__file__).resolve().parent / "prompts"
_EXAMPLE = re.compile(r"^(\d+)_context\.txt$")


@dataclasses.dataclass
class PromptSet:
    kind: str
    system: str
    examples: list[tuple[str, str]]  # (context, reply)
    instructions: list[str]  # detail only: the user requests to choose from
    folder: str


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def load_prompts(kind: str, directory: str | None = None) -> PromptSet:
    """The prompt set of `kind` from `directory`/<kind>/ (default: the package's)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    folder = Path(directory if directory is not None else PACKAGE_PROMPTS) / kind
    if not (folder / "system.txt").is_file():
        raise FileNotFoundError(f"{folder}/system.txt not found (a prompt folder holds "
                                "<kind>/system.txt and <kind>/NNN_context.txt + NNN_reply.txt).")
    examples = []
    for name in sorted(os.listdir(folder)):
        match = _EXAMPLE.match(name)
        if not match:
            continue
        reply = folder / f"{match.group(1)}_reply.txt"
        if not reply.is_file():
            raise FileNotFoundError(f"{folder / name} has no {reply.name} beside it.")
        examples.append((_read(folder / name), _read(reply)))
    instructions = []
    if kind == "detail":
        path = folder / "instructions.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: detailed descriptions are paired with "
                                    "one of its instructions.")
        instructions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                        if line.strip() and not line.lstrip().startswith("#")]
        if not instructions:
            raise ValueError(f"{path} holds no instruction.")
    return PromptSet(kind, _read(folder / "system.txt"), examples, instructions, str(folder))


def build_messages(prompts: PromptSet, context: str,
                   few_shot: int | None = None) -> list[dict]:
    """Chat messages for one image: system, then each example as a user / assistant pair
    (the first `few_shot` only, when given), then the image's context as the last user turn."""
    examples = prompts.examples if few_shot is None else prompts.examples[:few_shot]
    messages = [{"role": "system", "content": prompts.system}]
    for example_context, reply in examples:
        messages += [{"role": "user", "content": example_context},
                     {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": context})
    return messages
