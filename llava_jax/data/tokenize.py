"""Token ids and labels for a LLaVA conversation, built span by span.

What "faithful" means here: the ids the original LLaVA-1.5 training produced with Vicuna
v1.5's *slow* SentencePiece tokenizer (`LlamaTokenizer`, legacy=False), and labels that train
exactly each assistant answer plus the separator that closes it. Three facts of the original
pipeline fix the ids:

1. `tokenizer_image_token` splits the prompt on "<image>" and tokenizes every chunk in its own
   tokenizer call (BOS kept only from the first chunk), so the text right after an image starts
   a fresh call and gets SentencePiece's dummy-prefix "▁" (e.g. "\\n" -> "▁" "<0x0A>").
2. The legacy=False slow tokenizer prepends "▁" once per call, never after a special token:
   after "</s>" it writes "USER" (one piece) while a fast Llama tokenizer, which prepends "▁"
   to every split between special tokens, writes "▁US" "ER". That one-token drift is why the
   original masked whole samples ("tokenization mismatch") when run with a fast tokenizer.
3. Special tokens written in the text ("</s>", "<s>") become their ids.

We reproduce this with any `transformers` fast tokenizer by running its `tokenizers` backend
twice: as is (the start of a call) and with the dummy prefix switched off (text after a special
token or mid-call). Labels come from construction: every template segment is encoded on its own
and marked trained or not; the concatenation is then checked against the whole prompt encoded
in one go. If a BPE merge crosses a segment boundary the two differ and the sample raises
`TokenizationError` (the pipeline skips and counts it) instead of being trained with shifted
labels.
"""

from __future__ import annotations

import copy
import json
import os
import re
import weakref
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from llava_jax.data.conversation import IMAGE_TOKEN, Segment, Template, get_template

IGNORE_INDEX = -100


class TokenizationError(ValueError):
    """A sample that cannot be tokenized faithfully. `reason` is a short counter key, e.g.
    "non_alternating", "image_count_mismatch", "unfaithful_tokenization", "too_long"."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Conversation checks shared with the pipeline


def normalize_conversation(conversations: Any, template: Template) -> list[tuple[str, str]]:
    """Validate LLaVA turns and return [(human, gpt), ...] as the original feeds them to the template.

    Follows the original: a leading non-human turn is dropped, and every "<image>" in a turn is
    moved to the start of that turn as "<image>\\n" (`preprocess_multimodal`). Raises
    TokenizationError for malformed input, an empty or non-alternating conversation (which must
    end with an answer: the original masks such samples entirely), or an image in an answer.
    """
    if not isinstance(conversations, (list, tuple)):
        raise TokenizationError(
            "malformed_sample", f"'conversations' must be a list, got {type(conversations).__name__}"
        )
    turns = []
    for position, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise TokenizationError(
                "malformed_sample", f"turn {position} must be a dict with 'from' and 'value'"
            )
        if turn["from"] not in ("human", "gpt") or not isinstance(turn["value"], str):
            raise TokenizationError(
                "malformed_sample",
                f"turn {position}: 'from' must be 'human' or 'gpt' and 'value' a string",
            )
        turns.append((turn["from"], turn["value"]))
    if turns and turns[0][0] != "human":
        turns = turns[1:]  # the original drops a leading non-human turn
    if not turns:
        raise TokenizationError("empty_conversation", "no human turn")
    if len(turns) % 2 or any(
        speaker != ("human", "gpt")[index % 2] for index, (speaker, _) in enumerate(turns)
    ):
        raise TokenizationError(
            "non_alternating", "turns must alternate human, gpt, ... and end with gpt"
        )
    rounds = []
    for question, answer in zip(turns[0::2], turns[1::2]):
        if IMAGE_TOKEN in answer[1]:
            raise TokenizationError("image_in_answer", "an assistant turn contains <image>")
        rounds.append((_place_images(question[1], template.image_placement), answer[1]))
    if template.style == "plain" and len(rounds) != 1:
        raise TokenizationError("non_alternating", "the plain template needs exactly 2 turns")
    return rounds


def _place_images(text: str, placement: str) -> str:
    """LLaVA ("front") moves every <image> of a turn to its start; LLaVA-NeXT ("next") does
    so only for a lone <image> and leaves several where they are."""
    count = text.count(IMAGE_TOKEN)
    if not count or (placement == "next" and count > 1):
        return text
    return ((IMAGE_TOKEN + "\n") * count + text.replace(IMAGE_TOKEN, "").strip()).strip()


def count_images(conversations: Sequence[dict]) -> int:
    """Number of "<image>" tags over all turns (tolerant of malformed turns)."""
    return sum(
        turn["value"].count(IMAGE_TOKEN)
        for turn in conversations
        if isinstance(turn, dict) and isinstance(turn.get("value"), str)
    )


# ----------------------------------------------------------------------------------------------
# Slow-tokenizer emulation on top of a fast tokenizer


def _strip_dummy_prefix(node: dict | None) -> dict | None:
    """A normalizer / pre-tokenizer spec with SentencePiece's dummy "▁" prefix switched off."""
    if node is None:
        return None
    kind = node.get("type")
    if kind == "Prepend":
        return None
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in node else "pretokenizers"
        node[key] = [child for child in map(_strip_dummy_prefix, node[key]) if child is not None]
        return node
    if kind == "Metaspace":
        node["prepend_scheme"] = "never"
        if "add_prefix_space" in node:
            node["add_prefix_space"] = False
    if kind == "ByteLevel" and node.get("add_prefix_space"):
        node["add_prefix_space"] = False
    return node


class SpanEncoder:
    """Encodes text the way the original's slow tokenizer calls did, from a fast tokenizer.

    Picklable (grain workers get a copy); build once per tokenizer via `span_encoder()`.
    """

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(
                "tokenize_conversation needs a transformers *fast* tokenizer (PreTrainedTokenizerFast);"
                f" got {type(tokenizer).__name__}"
            )
        spec = json.loads(backend.to_str())
        # Special tokens (BOS) are added by us, truncation/padding by the pipeline.
        spec["post_processor"] = None
        spec["truncation"] = None
        spec["padding"] = None
        self._call_start = Tokenizer.from_str(json.dumps(spec))
        no_prefix = copy.deepcopy(spec)
        no_prefix["normalizer"] = _strip_dummy_prefix(no_prefix.get("normalizer"))
        no_prefix["pre_tokenizer"] = _strip_dummy_prefix(no_prefix.get("pre_tokenizer"))
        self._mid_call = Tokenizer.from_str(json.dumps(no_prefix))
        # Strings the slow tokenizer splits out before SentencePiece sees the text.
        self._added = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
        pattern = "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True))
        self._added_re = re.compile(pattern) if pattern else None
        # Ids the tokenizer itself puts before a text (BOS for Llama, none for ChatML models).
        with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix_ids = list(with_specials[: len(with_specials) - len(without)])
        if with_specials[len(self.prefix_ids) :] != without:
            self.prefix_ids = []  # a tokenizer that appends (not prepends) specials: keep none
        self._single_token_ids: dict[tuple[str, ...], frozenset[int]] = {}

    def single_token_ids(self, strings: Sequence[str]) -> frozenset[int]:
        """Ids of those `strings` that are one token here (mid-call, no word prefix)."""
        key = tuple(strings)
        if key not in self._single_token_ids:
            ids = set()
            for text in key:
                encoded = self.encode(text, call_start=False)[0]
                if len(encoded) == 1:
                    ids.add(encoded[0])
            self._single_token_ids[key] = frozenset(ids)
        return self._single_token_ids[key]

    def _pieces(self, text: str):
        """Yield (text, None) and (special string, id) pieces of `text`."""
        if self._added_re is None:
            yield text, None
            return
        start = 0
        for match in self._added_re.finditer(text):
            if match.start() > start:
                yield text[start : match.start()], None
            yield match.group(), self._added[match.group()]
            start = match.end()
        if start < len(text):
            yield text[start:], None

    def encode(self, text: str, call_start: bool) -> tuple[list[int], bool]:
        """Ids of `text` (no "<image>" in it) and whether the next text is still at call start.

        `call_start`: the text begins a tokenizer call of the original (start of the prompt or
        right after an image), so its first plain piece gets the dummy prefix.
        """
        ids: list[int] = []
        for piece, special_id in self._pieces(text):
            if special_id is not None:
                ids.append(special_id)
            else:
                encoder = self._call_start if call_start else self._mid_call
                ids.extend(encoder.encode(piece, add_special_tokens=False).ids)
            call_start = False
        return ids, call_start

    def encode_prompt(
        self, prompt: str, image_token_index: int, num_image_tokens: int | Sequence[int]
    ) -> list[int]:
        """The whole prompt in one go, as `tokenizer_image_token` did, images expanded
        (`num_image_tokens`: one count, or one per image; see `image_token_counts`)."""
        chunks = prompt.split(IMAGE_TOKEN)
        counts = image_token_counts(num_image_tokens, len(chunks) - 1)
        ids = list(self.prefix_ids)
        for chunk_index, chunk in enumerate(chunks):
            if chunk_index:
                ids.extend([image_token_index] * counts[chunk_index - 1])
            ids.extend(self.encode(chunk, call_start=True)[0])
        return ids


_ENCODERS: "weakref.WeakKeyDictionary[Any, SpanEncoder]" = weakref.WeakKeyDictionary()


def span_encoder(tokenizer) -> SpanEncoder:
    """The cached SpanEncoder of `tokenizer` (building one parses the tokenizer JSON)."""
    try:
        encoder = _ENCODERS.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        return SpanEncoder(tokenizer)
    if encoder is None:
        encoder = _ENCODERS[tokenizer] = SpanEncoder(tokenizer)
    return encoder


# ----------------------------------------------------------------------------------------------
# Public API


def image_token_counts(num_image_tokens: int | Sequence[int], images: int) -> list[int]:
    """Placeholders per image, in <image> order: one count for every image (flat models), or
    one per image (tiled models: an image's count depends on its size)."""
    if isinstance(num_image_tokens, (int, np.integer)):
        return [int(num_image_tokens)] * images
    counts = [int(n) for n in num_image_tokens]
    if len(counts) != images:
        raise TokenizationError("image_count_mismatch",
                                f"{images} <image> tags for {len(counts)} image token counts")
    return counts


def _merge_neighbours(segments: Sequence[Segment]) -> list[Segment]:
    """Join neighbouring segments with the same `trained` flag: only the boundaries between
    trained and untrained text need to be token boundaries."""
    merged: list[Segment] = []
    for segment in segments:
        if merged and merged[-1].trained == segment.trained:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.trained)
        else:
            merged.append(segment)
    return merged


def tokenize_rounds(
    rounds: Sequence[tuple[str, str]],
    encoder: SpanEncoder,
    template: Template,
    num_image_tokens: int | Sequence[int],
    image_token_index: int,
    max_length: int | None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(input_ids int32[seq], labels int32[seq], truncated) for normalized rounds.
    `num_image_tokens`: one count for every image, or one per image in <image> order."""
    segments = _merge_neighbours(template.segments(rounds))
    counts = iter(image_token_counts(
        num_image_tokens, sum(segment.text.count(IMAGE_TOKEN) for segment in segments)))
    ids = list(encoder.prefix_ids)
    labels = [IGNORE_INDEX] * len(ids)
    call_start = True
    for segment in segments:
        for chunk_index, chunk in enumerate(segment.text.split(IMAGE_TOKEN)):
            if chunk_index:
                count = next(counts)
                ids.extend([image_token_index] * count)
                labels.extend([IGNORE_INDEX] * count)
                call_start = True
            if not chunk:
                continue
            chunk_ids, call_start = encoder.encode(chunk, call_start)
            ids.extend(chunk_ids)
            labels.extend(chunk_ids if segment.trained else [IGNORE_INDEX] * len(chunk_ids))

    if template.trained_tokens:
        # LLaVA-NeXT's unmask lists: these tokens are trained in every turn (never the first
        # token, whose label no position predicts).
        always = encoder.single_token_ids(template.trained_tokens)
        labels = [token if index and token in always else label
                  for index, (token, label) in enumerate(zip(ids, labels))]

    whole = encoder.encode_prompt(template.render(rounds), image_token_index, num_image_tokens)
    if whole != ids:
        first = next(
            (i for i, (a, b) in enumerate(zip(whole, ids)) if a != b), min(len(whole), len(ids))
        )
        raise TokenizationError(
            "unfaithful_tokenization",
            f"span-by-span ids differ from the whole-prompt ids at token {first}"
            " (a merge crosses a turn boundary); the labels would be shifted",
        )

    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        image_positions = np.flatnonzero(np.asarray(ids) == image_token_index)
        if image_positions.size and image_positions[-1] >= max_length:
            raise TokenizationError(
                "too_long",
                f"{len(ids)} tokens > max_length {max_length} and the cut would drop (part of)"
                " an image; raise max_length or drop the sample",
            )
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise TokenizationError(
                "too_long", f"no trained token left within max_length {max_length}"
            )
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32), truncated


def tokenize_conversation(
    conversations: Sequence[dict],
    tokenizer,
    template: str | Template,
    num_image_tokens: int,
    image_token_index: int,
    max_length: int | None,
) -> dict[str, np.ndarray]:
    """Input ids and labels of one LLaVA conversation, as the original trained them.

    Args:
      conversations: the sample's [{"from": "human"|"gpt", "value": str}, ...].
      tokenizer: a transformers fast tokenizer (e.g. PreTrainedTokenizerFast of Vicuna v1.5).
      template: a template name of conversation.TEMPLATES ("plain", "vicuna_v1", ...).
      num_image_tokens: placeholder ids per image (576 for CLIP-L/14 at 336 px), or one
        count per image in <image> order (tiled models).
      image_token_index: the placeholder id (32000 in llava-hf checkpoints).
      max_length: truncate longer sequences (counted after image expansion), or None.

    Returns:
      dict(input_ids=int32[seq], labels=int32[seq]): ids start with BOS when the tokenizer adds
      one; labels equal input_ids on each answer and its closing separator, else -100 (labels
      are aligned with input_ids, not shifted). Each "<image>" becomes `num_image_tokens` copies
      of `image_token_index`.

    Raises:
      TokenizationError: the sample cannot be tokenized faithfully (malformed or non-alternating
      turns, an image in an answer, a BPE merge across a turn boundary, or truncation that would
      cut an image / leave nothing to train). `.reason` names the case; the pipeline counts it.
    """
    template = get_template(template)
    rounds = normalize_conversation(conversations, template)
    ids, labels, _ = tokenize_rounds(
        rounds, span_encoder(tokenizer), template, num_image_tokens, image_token_index, max_length
    )
    return {"input_ids": ids, "labels": labels}


def tokenize_generation_prompt(
    question: str,
    tokenizer,
    template: str | Template,
    num_image_tokens: int | Sequence[int],
    image_token_index: int,
    history: Sequence[tuple[str, str]] = (),
) -> np.ndarray:
    """int32[seq] ids of a generation prompt (ends after the assistant role), tokenized as the
    original's `tokenizer_image_token` did. Put "<image>" in `question` where the image goes
    (the original CLI uses "<image>\\n" + question). `num_image_tokens`: one count for every
    image, or one per image of the history and question, in order (tiled models)."""
    template = get_template(template)
    prompt = template.generation_prompt(question, history)
    ids = span_encoder(tokenizer).encode_prompt(prompt, image_token_index, num_image_tokens)
    return np.asarray(ids, np.int32)


# ----------------------------------------------------------------------------------------------
# Loading


LLAMA_SPECIAL_TOKENS = (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"), ("pad", "<pad>"))


def load_tokenizer(directory: str):
    """The tokenizer in `directory` (a `tokenizer.json`, with or without its config files).

    Always `PreTrainedTokenizerFast`, never `AutoTokenizer`: transformers 5 rewrites Llama's
    whitespace handling there. A bare tokenizer.json names no special tokens, so the Llama
    spellings (<s>, </s>, <unk>, <pad>) fill the roles left empty when the vocabulary has them;
    without a pad token, pad = unk (the original LLaVA's choice for its v1 templates).
    Raises FileNotFoundError when the folder holds no tokenizer.json.
    """
    # transformers costs seconds to import; `import llava_jax.data` should not pay for it.
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise FileNotFoundError(f"{directory} holds no tokenizer.json")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    vocab = tokenizer.get_vocab()
    for role, token in LLAMA_SPECIAL_TOKENS:
        if getattr(tokenizer, f"{role}_token") is None and token in vocab:
            setattr(tokenizer, f"{role}_token", token)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
