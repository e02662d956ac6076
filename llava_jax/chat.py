"""Terminal chat about an image: `python -m llava_jax.chat --checkpoint=DIR --image=PATH`.

Interactive mode reads questions from stdin and streams each answer as it is decoded.
Commands: `/image PATH` (switch image and start a new conversation), `/reset` (new
conversation about the same image), `/quit` (or end of input). As in the original LLaVA CLI,
the image goes into the first user turn of a conversation ("<image>\\n" + question) and later
turns are plain text with the whole history in the prompt.

For scripts: `--prompt=TEXT` prints one answer and exits; `--prompts=FILE.jsonl` answers each
line ({"text", optional "image", optional "question_id"}) independently and prints one JSON
line per answer ({"question_id", "prompt", "text"}).

Defaults follow the original `llava/serve/cli.py`: temperature 0.2,
max_new_tokens 512 (capped by the model's position budget); the template is the one the
checkpoint trained with (its train_config.json), else its decoder family's (vicuna_v1 for
LLaVA-1.5). Tiled checkpoints (LLaVA-NeXT "anyres", OneVision "anyres_max_N") need nothing
more: the checkpoint's processor tiles the image, whose placeholder count follows its size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from PIL import Image

from llava_jax.checkpoint import checkpoint_template, load_pretrained
from llava_jax.data import IMAGE_TOKEN, ImageDecodeError, get_template
from llava_jax.data.processor import ProcessorError
from llava_jax.inference.batch import Prompt, build_inputs, load_image
from llava_jax.inference.generation import decode_new_tokens, stream


class ChatError(Exception):
    """A user-facing problem (bad path, corrupt image, prompt too long)."""


class ChatSession:
    """One conversation: template, history of (question, answer) rounds, current image.

    `processor`: the checkpoint's (`load_pretrained(...).processor`), which a tiled (anyres)
    model's images go through; default: the model config's (`inference.batch.build_inputs`).
    """

    def __init__(self, model, tokenizer, *, template: str = "vicuna_v1",
                 temperature: float = 0.2, top_p: float = 1.0, max_new_tokens: int = 512,
                 seed: int = 0, processor=None):
        if tokenizer is None:
            raise ChatError("the checkpoint has no tokenizer/ folder; chat needs one.")
        self.model, self.tokenizer = model, tokenizer
        self.template_name, self.template = template, get_template(template)
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.processor = processor
        self.history: list[tuple[str, str]] = []
        # Decoded, not preprocessed: a tiled model picks its tiles (and placeholder count)
        # from the image's size when the prompt is built.
        self.image: Image.Image | None = None  # RGB
        self.turns = 0

    def set_image(self, path: str | None) -> None:
        """Loads (decodes) a new image; resets history."""
        self.reset()
        if path is None:
            self.image = None
            return
        try:
            self.image = load_image(path)
        except (FileNotFoundError, ImageDecodeError) as error:
            raise ChatError(str(error)) from None

    def reset(self) -> None:
        self.history = []

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        """Generates the answer to `question` given the history; `on_text` receives each new
        piece of decoded text as it is produced. Returns the whole answer (added to history)."""
        config = self.model.config
        question = question.replace(IMAGE_TOKEN, "").strip()
        with_image = self.image is not None and not self.history
        if with_image:
            question = f"{IMAGE_TOKEN}\n{question}"
        # The image belongs to the conversation's first turn: every later prompt repeats it.
        needs_image = IMAGE_TOKEN in question or self._history_has_image()
        prompt = Prompt(question, history=self.history,
                        image=self.image if needs_image else None)
        try:
            inputs = build_inputs([prompt], self.tokenizer, self.template_name, config,
                                  self.processor)
        except ProcessorError as error:  # a tiled checkpoint whose processor files do not fit
            raise ChatError(str(error)) from None
        length = inputs.input_ids.shape[1]
        budget = min(self.max_new_tokens, config.text.max_position_embeddings - length)
        if budget < 1:
            raise ChatError(f"the conversation ({length} tokens) fills the model's "
                            f"{config.text.max_position_embeddings} positions; /reset to start over.")
        stop = [self.template.stop_str] if self.template.stop_str else []
        generated: list[int] = []
        shown = ""
        for step in stream(self.model, inputs.input_ids, inputs.pixel_values,
                           **inputs.image_kwargs(), max_new_tokens=budget,
                           temperature=self.temperature, top_p=self.top_p,
                           seed=self.seed + self.turns, stop_strings=stop,
                           tokenizer=self.tokenizer):
            generated.append(int(step[0]))
            text = decode_new_tokens(generated, self.tokenizer, eos_token_id=config.eos_token_id,
                                     stop_strings=stop)
            # Decoding the whole answer each step keeps word-piece spacing right; only the
            # new suffix is shown (a stop string being completed may shorten the text).
            if on_text is not None and text.startswith(shown) and len(text) > len(shown):
                on_text(text[len(shown):])
                shown = text
        self.turns += 1
        answer = decode_new_tokens(generated, self.tokenizer, eos_token_id=config.eos_token_id,
                                   stop_strings=stop)
        if on_text is not None and answer.startswith(shown) and len(answer) > len(shown):
            on_text(answer[len(shown):])
        self.history.append((question, answer))
        return answer

    def _history_has_image(self) -> bool:
        return any(IMAGE_TOKEN in question for question, _ in self.history)


def interactive(session: ChatSession, read: Callable[[str], str] = input,
                write: Callable[[str], None] | None = None) -> None:
    """The read-ask-print loop. `read` raises EOFError at the end of input."""
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    user, assistant = _role_names(session)
    while True:
        try:
            line = read(f"{user}: ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.reset()
            write("[conversation reset]\n")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.set_image(path or None)
                write(f"[image: {path}]\n" if path else "[no image]\n")
            except ChatError as error:
                write(f"error: {error}\n")
            continue
        if line.startswith("/"):
            write("commands: /image PATH, /reset, /quit\n")
            continue
        write(f"{assistant}: ")
        try:
            session.ask(line, on_text=write)
        except ChatError as error:
            write(f"error: {error}")
        write("\n")


def _role_names(session: ChatSession) -> tuple[str, str]:
    """Display names of the two roles ("USER", "ASSISTANT"; ChatML roles cleaned up)."""
    names = []
    for role, default in zip(session.template.roles, ("USER", "ASSISTANT")):
        names.append(role.replace("<|im_start|>", "").strip().upper() or default)
    return names[0], names[1]


def answer_prompts_file(session: ChatSession, path: str, out=None) -> None:
    """One independent answer per JSONL line, one JSON line out per answer (to stdout)."""
    out = out or sys.stdout
    default_image = session.image
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            text = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ChatError(f"{path}:{number}: expected a JSON object with a 'text' field.")
        if record.get("image"):
            session.set_image(record["image"])
        else:
            session.reset()
            session.image = default_image
        answer = session.ask(text)
        out.write(json.dumps({"question_id": record.get("question_id", number - 1),
                              "prompt": text, "text": answer}) + "\n")
        out.flush()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.chat",
                                     description="Chat with a LLaVA checkpoint about an image.")
    parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    parser.add_argument("--image", help="image file to talk about (omit for text only)")
    parser.add_argument("--template", default=None,
                        help="conversation template (default: the one the checkpoint trained "
                             "with, else its decoder family's, else vicuna_v1)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", help="compute dtype (default: the checkpoint's)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompt", help="answer this one question and exit")
    group.add_argument("--prompts", help="JSONL file of questions: answer each and exit")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("need --temperature >= 0 and 0 < --top-p <= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not os.path.isdir(args.checkpoint):
            raise ChatError(f"checkpoint directory {args.checkpoint} does not exist.")
        if args.image and not os.path.exists(args.image):
            raise ChatError(f"image {args.image} not found.")
        if args.prompts and not os.path.exists(args.prompts):
            raise ChatError(f"prompts file {args.prompts} not found.")
        try:
            pretrained = load_pretrained(args.checkpoint, dtype=args.dtype)
        except (FileNotFoundError, ValueError) as error:
            raise ChatError(str(error)) from None
        try:
            template = args.template or checkpoint_template(args.checkpoint)
        except ValueError as error:
            raise ChatError(f"{error} Pass --template.") from None
        session = ChatSession(pretrained.model, pretrained.tokenizer, template=template,
                              temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed,
                              processor=pretrained.processor)
        session.set_image(args.image)
        if args.prompt is not None:
            print(session.ask(args.prompt), flush=True)
        elif args.prompts:
            answer_prompts_file(session, args.prompts)
        else:
            interactive(session)
    except ChatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
