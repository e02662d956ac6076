"""Conversation templates of the original LLaVA (`llava/conversation.py`), rendered span by span.

A template turns a list of (question, answer) rounds into text. The original builds one
string with `Conversation.get_prompt()` and later re-derives which tokens are trainable by
splitting that string on separators; here every template yields *segments*
`(text, trained)` whose concatenation is exactly the original string, so the labels follow
from construction (see tokenize.py).

Templates (names as in the original `conv_templates`):

    plain            stage 1: "<image>" + caption + "\\n" (the instruction is discarded)
    vicuna_v1, v1    "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."   (LLaVA-1.5 stage 2)
    llava_v1         same separators, the "curious human" system prompt
    llava_llama_2    "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ..."
    llama_2          same, Llama-2's default safety system prompt
    mistral_instruct same, no system prompt and no "<s>" between rounds
    chatml_direct    "<|im_start|>system\\nAnswer the questions.<|im_end|><|im_start|>user\\n{q}..."
    mpt              same, the MPT system prompt

Trained spans = each assistant answer plus the separator that closes it ("</s>" for v1,
" </s>" for llama_2 styles, "<|im_end|>" for mpt styles, "\\n" for plain). The v0/mmtag
templates are not provided (the original trains them with a different, legacy code path).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

IMAGE_TOKEN = "<image>"
# LLaVA-1.5's instruction after short-answer questions (VQA data, its VQA/POPE evaluation).
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
    "unbiased and positive in nature.\n\nIf a question does not make any sense, or is not "
    "factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
MPT_SYSTEM = (
    "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers."
)
CHATML_DIRECT_SYSTEM = "<|im_start|>system\nAnswer the questions."
CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of rendered text; `trained` marks text whose tokens get a loss."""

    text: str
    trained: bool


@dataclasses.dataclass(frozen=True)
class Template:
    """One conversation format. `style` is the original's SeparatorStyle (lower case)."""

    name: str
    system: str
    roles: tuple[str, str]
    style: str  # "two" | "llama_2" | "mpt" | "plain"
    sep: str
    sep2: str | None = None

    @property
    def stop_str(self) -> str:
        """The stop string the original's generation code uses (`sep2` for TWO, else `sep`).

        Note that it is "<s>" for llama_2 and "" for mistral_instruct in the original; generation
        stops on the EOS token anyway."""
        return self.sep2 if self.style == "two" else self.sep

    # ---- training -------------------------------------------------------------------------

    def segments(self, rounds: Sequence[tuple[str, str]]) -> list[Segment]:
        """Training rendering of `rounds` = [(human text, assistant text), ...] as segments.

        Images are expected where the caller put "<image>" (the original moves it to the start
        of its turn, see tokenize.normalize_conversation); they are never in trained segments.
        """
        if not rounds:
            raise ValueError("a training conversation needs at least one (question, answer) round")
        if self.style == "plain":
            if len(rounds) != 1:
                raise ValueError("the plain template trains exactly one (image, caption) round")
            # preprocess_plain: the human text is replaced by "<image>" alone.
            return [Segment(IMAGE_TOKEN, False), Segment(rounds[0][1] + self.sep, True)]
        segments: list[Segment] = []
        if self.style == "two":
            user, assistant = self.roles
            segments.append(Segment(self.system + self.sep, False))
            for question, answer in rounds:
                segments.append(Segment(f"{user}: {question}{self.sep}{assistant}:", False))
                segments.append(Segment(f" {answer}{self.sep2}", True))
        elif self.style == "llama_2":
            for index, (question, answer) in enumerate(rounds):
                segments.append(Segment(self._llama_2_instruction(index, question), False))
                segments.append(Segment(f" {answer} {self.sep2}", True))
        elif self.style == "mpt":
            user, assistant = self.roles
            segments.append(Segment(self.system + self.sep, False))
            for question, answer in rounds:
                segments.append(Segment(f"{user}{question}{self.sep}{assistant}", False))
                segments.append(Segment(f"{answer}{self.sep}", True))
        else:
            raise ValueError(f"unknown template style {self.style!r}")
        return segments

    def render(self, rounds: Sequence[tuple[str, str]]) -> str:
        """The full training text, equal to the original's prompt for the same rounds."""
        return "".join(segment.text for segment in self.segments(rounds))

    # ---- generation -----------------------------------------------------------------------

    def generation_prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """Prompt for the next answer: `history` rounds, then `question`, ending after the
        assistant role (what `get_prompt()` returns with a None assistant message)."""
        if self.style == "plain":
            if history:
                # The original raises TypeError here (sep2 is None): plain has no multi-turn form.
                raise ValueError("the plain template has no multi-turn generation prompt")
            return question + self.sep
        text = self.render(history) if history else ""
        if self.style == "two":
            user, assistant = self.roles
            if not history:
                text = self.system + self.sep
            return text + f"{user}: {question}{self.sep}{assistant}:"
        if self.style == "llama_2":
            return text + self._llama_2_instruction(len(history), question)
        if self.style == "mpt":
            user, assistant = self.roles
            if not history:
                text = self.system + self.sep
            return text + f"{user}{question}{self.sep}{assistant}"
        raise ValueError(f"unknown template style {self.style!r}")

    def _llama_2_instruction(self, round_index: int, question: str) -> str:
        if round_index == 0:
            # The original prefixes every round with `sep` and then lstrips it off the prompt.
            system = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" if self.system else ""
            return f"[INST] {system}{question} [/INST]"
        return f"{self.sep}[INST] {question} [/INST]"


_VICUNA_V1 = Template("vicuna_v1", VICUNA_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>")

TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "", ("", ""), "plain", "\n", None),
    "vicuna_v1": _VICUNA_V1,
    "v1": dataclasses.replace(_VICUNA_V1, name="v1"),
    "llava_v1": Template("llava_v1", LLAVA_V1_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    "llava_llama_2": Template(
        "llava_llama_2", LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "llama_2", "<s>", "</s>"
    ),
    "llama_2": Template("llama_2", LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "llama_2", "<s>", "</s>"),
    "mistral_instruct": Template(
        "mistral_instruct", "", ("USER", "ASSISTANT"), "llama_2", "", "</s>"
    ),
    "chatml_direct": Template("chatml_direct", CHATML_DIRECT_SYSTEM, CHATML_ROLES, "mpt", "<|im_end|>"),
    "mpt": Template("mpt", MPT_SYSTEM, CHATML_ROLES, "mpt", "<|im_end|>"),
}


def get_template(template: str | Template) -> Template:
    """Look up a template by name (or pass a Template through)."""
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(
            f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}"
        ) from None
