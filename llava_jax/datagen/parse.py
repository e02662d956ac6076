"""LLM replies -> (question, answer) turns, or the reason they are not usable.

    conversation  "Question: ... / Answer: ..." rounds (>= 1)
    complex       one such round (later rounds, if any, are dropped)
    detail        a description; its question is the instruction chosen for the image

Tolerated and cleaned: text before the first "Question:" ("Sure! Here is ..."), markers on
their own line or inline, "Q:" / "A:", "User:" / "Assistant:", "**Question:**", numbered
markers ("Question 2:", "2. Question:"), separator
lines ("===", "---"), a last question left without an answer (dropped), a lead-in line ending
in ":" before a description, and any "<image>" the LLM writes (removed: the LLaVA JSON places
its own). A reply cut by max_tokens (finish_reason "length") loses what may be cut: its last
round, or a description's unfinished last sentence.

Rejected (the `reason` of a ParsedReply with no turns): empty, no_turns (no markers),
not_alternating, empty_turn, truncated (nothing complete left), mentions_annotations (the
text talks about bounding boxes or quotes coordinates, which the image would not show: such
rounds are dropped, the reply is rejected when none is left), too_short.
"""

from __future__ import annotations

import dataclasses
import re

from llava_jax.data.conversation import IMAGE_TOKEN


_MARKER = re.compile(
    r"^[ \t>*#_-]*(?:\d+[.)][ \t]*)?(question|answer|q|a|user|human|assistant|gpt)"
    r"(?:[ \t]*\d+)?[ \t*_]*[:：][ \t*_]*", re.IGNORECASE | re.MULTILINE)
_ASKERS = {"question", "q", "user", "human"}
_SEPARATOR = re.compile(r"^[ \t]*(?:={3,}|-{3,}|\*{3,}|_{3,})[ \t]*$", re.MULTILINE)
# Words for the annotations the LLM was given, and [0.123, 0.456, ...] coordinates.
_LEAK = re.compile(r"bounding box|\bcoordinates?\b|\bcaptions?\b|\[\s*[01]?\.\d+\s*,\s*[01]?\.\d+",
                   re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
MIN_DESCRIPTION_WORDS = 5


@dataclasses.dataclass
class ParsedReply:
    """`turns` of a usable reply (None when rejected, with `reason`); `notes` lists what was
    cleaned or dropped on the way (stray_text, dangling_question, ...)."""

    turns: list[tuple[str, str]] | None
    reason: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.turns is not None


def _clean(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip()


def _leaks(*texts: str) -> bool:
    return any(_LEAK.search(text) for text in texts)


def parse_rounds(text: str, *, truncated: bool = False) -> ParsedReply:
    """Question / answer rounds of a reply."""
    notes: list[str] = []
    text = _SEPARATOR.sub("", _clean(text or ""))
    if not text.strip():
        return ParsedReply(None, "empty")
    markers = list(_MARKER.finditer(text))
    if not markers:
        return ParsedReply(None, "no_turns")
    if text[:markers[0].start()].strip():
        notes.append("stray_text")
    segments = []
    for marker, following in zip(markers, markers[1:] + [None]):
        end = following.start() if following is not None else len(text)
        asker = marker.group(1).lower() in _ASKERS
        segments.append((asker, text[marker.end():end].strip()))
    if segments and segments[-1][0]:  # a question nobody answered
        segments.pop()
        notes.append("dangling_question")
    if not segments:
        return ParsedReply(None, "no_turns", notes)
    if len(segments) % 2 or any(asker != (i % 2 == 0) for i, (asker, _) in enumerate(segments)):
        return ParsedReply(None, "not_alternating", notes)
    if any(not content for _, content in segments):
        return ParsedReply(None, "empty_turn", notes)
    rounds = [(segments[i][1], segments[i + 1][1]) for i in range(0, len(segments), 2)]
    if truncated and "dangling_question" not in notes:
        rounds.pop()  # its answer may be cut mid-sentence (a cut question was dropped above)
        notes.append("dropped_truncated_round")
        if not rounds:
            return ParsedReply(None, "truncated", notes)
    kept = [pair for pair in rounds if not _leaks(*pair)]
    if len(kept) < len(rounds):
        notes.append("dropped_rounds_mentioning_annotations")
        if not kept:
            return ParsedReply(None, "mentions_annotations", notes)
    return ParsedReply(kept, None, notes)


def parse_description(text: str, instruction: str, *, truncated: bool = False) -> ParsedReply:
    """A detailed description, paired with `instruction`."""
    notes: list[str] = []
    text = _SEPARATOR.sub("", _clean(text or ""))
    if not text:
        return ParsedReply(None, "empty")
    if _MARKER.search(text):
        head = _MARKER.match(text.lstrip())
        if head is None or head.group(1).lower() in _ASKERS or len(_MARKER.findall(text)) > 1:
            return ParsedReply(None, "not_a_description")
        text = text.lstrip()[head.end():].strip()  # "Answer: <the description>"
    lines = text.split("\n", 1)
    if len(lines) == 2 and lines[0].rstrip().endswith(":") and lines[1].strip():
        text = lines[1].strip()  # "Here is a detailed description of the image:"
        notes.append("stray_text")
    if truncated:
        ends = list(_SENTENCE_END.finditer(text))
        if not ends:
            return ParsedReply(None, "truncated", notes)
        text = text[:ends[-1].end()].strip()
        notes.append("cut_to_last_sentence")
    if len(text.split()) < MIN_DESCRIPTION_WORDS:
        return ParsedReply(None, "too_short", notes)
    if _leaks(text):
        return ParsedReply(None, "mentions_annotations", notes)
    return ParsedReply([(instruction, text)], None, notes)


def parse_reply(kind: str, text: str, *, instruction: str | None = None,
                truncated: bool = False) -> ParsedReply:
    """Dispatch on the kind of sample (see the module docstring)."""
    if kind == "detail":
        if not instruction:
            raise ValueError("a detail reply needs the instruction it answers.")
        return parse_description(text, instruction, truncated=truncated)
    parsed = parse_rounds(text, truncated=truncated)
    if kind == "complex" and parsed.ok and len(parsed.turns) > 1:
        parsed.turns = parsed.turns[:1]
        parsed.notes.append("kept_first_round")
    elif kind not in ("conversation", "complex"):
        raise ValueError(f"unknown kind {kind!r}")
    return parsed
