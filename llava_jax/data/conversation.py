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

LLaVA-NeXT's (LLaVA-VL/LLaVA-NeXT `llava/conversation.py`, trained by its `preprocess_llama3`
and `preprocess_qwen`, which tokenize message by message):

    llava_llama_3    "<|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>"
                     "<|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>" + assistant
                     (Llama-3-Instruct's chat template: contents stripped; BOS from the tokenizer)
    qwen_1_5         "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n"
                     "<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n"

Trained spans = each assistant answer plus the separator that closes it ("</s>" for v1,
" </s>" for llama_2 styles, "<|im_end|>" for mpt styles, "\\n" for plain). The two LLaVA-NeXT
styles train what its preprocessing trains: every assistant message whole (its role header,
the answer, the end-of-turn token and, for ChatML, the newline after it), and, wherever they
occur, the tokens listed in `Template.trained_tokens` (LLaVA-NeXT's "unmask" lists: the
header / end-of-turn specials, and for Qwen the "\\n" token, inside user turns too). Llama 3's
list also names "\\n\\n", which its lookup never finds in a byte-level vocabulary, so it is
not trained outside assistant messages, as in the original; and "<|begin_of_text|>", which
only ever stands first, where no label is predicted, so it stays -100 here. The v0/mmtag templates are not
provided (the original trains them with a different, legacy code path).
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
# LLaVA-NeXT's llava_llama_3 system prompt is LLaVA's Llama-2 one; Qwen's is its default.
QWEN_SYSTEM = "You are a helpful assistant."


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
    style: str  # "two" | "llama_2" | "mpt" | "plain" | "llama_3" | "chatml"
    sep: str
    sep2: str | None = None
    # Strings whose token (each one token in the tokenizer) is trained wherever it occurs.
    trained_tokens: tuple[str, ...] = ()
    # "front": every <image> moves to the start of its turn (LLaVA); "next": a lone <image>
    # moves there, several stay in place (LLaVA-NeXT's preprocess_multimodal).
    image_placement: str = "front"

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
        elif self.style in ("llama_3", "chatml"):
            # One segment per message: the original tokenizes each message on its own.
            segments.append(Segment(self._message("system", self.system), False))
            for question, answer in rounds:
                segments.append(Segment(self._message(self.roles[0], question), False))
                segments.append(Segment(self._message(self.roles[1], answer), True))
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
        if self.style in ("llama_3", "chatml"):
            if not history:
                text = self._message("system", self.system)
            return text + self._message(self.roles[0], question) + self._header(self.roles[1])
        raise ValueError(f"unknown template style {self.style!r}")

    def _header(self, role: str) -> str:
        if self.style == "llama_3":
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        return f"<|im_start|>{role}\n"

    def _message(self, role: str, content: str) -> str:
        """One message as the chat template renders it (Llama 3's template strips content)."""
        if self.style == "llama_3":
            return self._header(role) + content.strip() + self.sep
        return self._header(role) + content + self.sep + "\n"

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
    "llava_llama_3": Template(
        "llava_llama_3", LLAVA_LLAMA_2_SYSTEM, ("user", "assistant"), "llama_3", "<|eot_id|>",
        trained_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        image_placement="next"),
    "qwen_1_5": Template(
        "qwen_1_5", QWEN_SYSTEM, ("user", "assistant"), "chatml", "<|im_end|>",
        trained_tokens=("<|im_start|>", "<|im_end|>", "\n"), image_placement="next"),
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
