"""The OpenAI chat-completions request, checked field by field, and its rendering to model inputs.

Every problem a client can cause is an `APIError` (an HTTP status and OpenAI's error body:
`{"error": {"message", "type", "param", "code"}}`) raised before anything is queued.

Messages: roles `system` (and `developer`, its newer name), `user`, `assistant`; content is
a string or a list of parts `{"type": "text", "text"}` / `{"type": "image_url",
"image_url": {"url"}}`. System text replaces the template's system prompt. Consecutive
messages of one role are joined; the conversation must end with a user message. A user
turn's images go first ("<image>\\n" per image, then the text), as the original LLaVA puts
them and the terminal chat does; earlier turns keep their images, in order.

Image URLs: `data:image/...;base64,...`; local paths (`file://` or plain) only below the
folder given to `--allow-local-images`; http(s) URLs are refused (the server fetches nothing).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import os
import secrets
from typing import Any, Sequence

import numpy as np

from llava_jax.data import (IMAGE_TOKEN, ImageDecodeError, decode_image, get_template,
                            preprocess_image, tokenize_generation_prompt)

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # per image, after base64 decoding
MAX_STOP_STRINGS = 4  # OpenAI's limit
ROLES = ("system", "developer", "user", "assistant")
# Parameters of the OpenAI API this server cannot honour: refused unless left at the default.
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "logprobs": False, "top_logprobs": None, "logit_bias": None,
               "response_format": None, "frequency_penalty": 0, "presence_penalty": 0,
               "audio": None, "modalities": None, "prediction": None}


class APIError(Exception):
    """An error for the client: HTTP `status` and the OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass
class ServerLimits:
    """What the server was started with (the CLI's flags)."""

    model_id: str
    template: str
    max_tokens: int  # default and upper bound of a request's max_tokens
    context: int  # prompt + answer tokens per request
    max_images: int
    default_temperature: float = 0.2
    allow_local_images: str | None = None  # a folder, or None: no local paths


@dataclasses.dataclass
class ChatRequest:
    """A checked request, ready for the engine."""

    prompt_ids: np.ndarray  # int32 [n]
    pixel_values: np.ndarray | None  # float32 [images, H, W, 3]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool


# ----------------------------------------------------------------------------------------------
# Scalars


def _number(body: dict, name: str, default, low: float, high: float, *, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a number; got {value!r}.", name)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise _bad(f"'{name}' must be in {bracket}{low}, {high}]; got {value}.", name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer; got {value!r}.", name)
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be true or false; got {value!r}.", name)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if (not isinstance(values, list) or len(values) > MAX_STOP_STRINGS
            or not all(isinstance(v, str) for v in values)):
        raise _bad(f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} strings; "
                   f"got {value!r}.", "stop")
    return [v for v in values if v]


# ----------------------------------------------------------------------------------------------
# Images


def load_image_url(url: Any, limits: ServerLimits, param: str) -> bytes | str:
    """The image bytes of a data URL, or the checked path of a local file."""
    if not isinstance(url, str) or not url:
        raise _bad("'image_url.url' must be a non-empty string.", param)
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise _bad("an image data URL must look like 'data:image/png;base64,<data>'.", param)
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise _bad(f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB.", param)
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise _bad("the image data URL is not valid base64.", param,
                       "invalid_image") from None
    if url.startswith(("http://", "https://", "ftp://")):
        raise _bad("remote image URLs are not fetched (this server uses no network); send the "
                   "image as a data URL ('data:image/png;base64,...').", param, "invalid_image")
    if limits.allow_local_images is None:
        raise _bad("local image paths are disabled; send a data URL, or start the server with "
                   "--allow-local-images DIR.", param, "invalid_image")
    path = url[len("file://"):] if url.startswith("file://") else url
    root = os.path.realpath(limits.allow_local_images)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise _bad(f"the image path {path!r} is outside the allowed folder.", param,
                   "invalid_image")
    if not os.path.isfile(real):
        raise _bad(f"the image {path!r} does not exist in the allowed folder.", param,
                   "invalid_image")
    return real


def image_pixels(source: bytes | str, config, param: str) -> np.ndarray:
    """float32 [H, W, 3] CLIP pixels, preprocessed as the model was trained."""
    try:
        image = decode_image(source)
    except (ImageDecodeError, OSError):
        raise _bad("the image could not be decoded: not an image, or a corrupt one.", param,
                   "invalid_image") from None
    return preprocess_image(image, config.vision.image_size, config.image_aspect)


# ----------------------------------------------------------------------------------------------
# Messages


def _content(message: dict, index: int, limits: ServerLimits) -> tuple[str, list]:
    """(text, [image sources]) of one message."""
    param = f"messages[{index}].content"
    content = message.get("content")
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _bad("content must be a string or a list of content parts.", param)
    texts, images = [], []
    for number, part in enumerate(content):
        where = f"{param}[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad("a text part needs a string 'text'.", where)
            texts.append(part["text"])
        elif kind == "image_url":
            if message.get("role") != "user":
                raise _bad("only user messages can hold images.", where)
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append(load_image_url(url, limits, f"{where}.image_url.url"))
        else:
            raise _bad("content parts must be {'type': 'text'} or {'type': 'image_url'}; got "
                       f"{kind!r}.", where)
    return "\n".join(texts), images


def conversation(messages: Any, limits: ServerLimits):
    """(system text or None, [(question, answer)] history, question, [image sources])."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list.", "messages")
    system, turns, images = [], [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad("every message must be an object with 'role' and 'content'.",
                       f"messages[{index}]")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"unknown role {role!r}; use one of {list(ROLES)}.",
                       f"messages[{index}].role")
        text, sources = _content(message, index, limits)
        text = text.replace(IMAGE_TOKEN, "").strip()
        if role in ("system", "developer"):
            system.append(text)
            continue
        if sources:
            text = "".join(f"{IMAGE_TOKEN}\n" for _ in sources) + text
            images.extend(sources)
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]}\n{text}")
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise _bad("the last message must come from the user.", "messages")
    if turns[0][0] != "user":
        raise _bad("the conversation must start with a user message (after any system "
                   "message).", "messages")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return ("\n".join(system) if system else None), history, turns[-1][1], images


def _template(name: str, system: str | None):
    template = get_template(name)
    if system is None:
        return template
    if template.style == "plain":
        raise _bad(f"the {name} template has no system prompt.", "messages")
    if template.style == "mpt":
        system = "<|im_start|>system\n" + system
    return dataclasses.replace(template, system=system)


# ----------------------------------------------------------------------------------------------
# The whole request


def parse_chat_request(body: Any, limits: ServerLimits, tokenizer, config) -> ChatRequest:
    """A checked ChatRequest from the decoded JSON body (APIError on any problem)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != limits.model_id:
        raise APIError(404, f"the model {model!r} does not exist; this server serves "
                       f"{limits.model_id!r}.", param="model", code="model_not_found")
    for name, default in UNSUPPORTED.items():
        if body.get(name, default) not in (default, None):
            raise _bad(f"'{name}' is not supported by this server.", name, "unsupported")
    n = _integer(body, "n")
    if n not in (None, 1):
        raise _bad(f"'n' must be 1 (one answer per request); got {n}.", "n")
    temperature = _number(body, "temperature", limits.default_temperature, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
    seed = _integer(body, "seed")
    if seed is not None and not -2**63 <= seed < 2**64:
        raise _bad("'seed' must fit in 64 bits.", "seed")
    # Unseeded requests still sample reproducibly from the seed they were given.
    seed = secrets.randbits(31) if seed is None else seed % 2**31
    stop = _stop(body)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object.", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    ignore_eos = _boolean(body, "ignore_eos")
    names = [name for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None]
    requested = _integer(body, names[0]) if names else None
    if requested is not None and not 1 <= requested <= limits.max_tokens:
        raise _bad(f"'{names[0]}' must be in [1, {limits.max_tokens}] (this server's "
                   f"--max-tokens); got {requested}.", names[0])

    system, history, question, sources = conversation(body.get("messages"), limits)
    if len(sources) > limits.max_images:
        raise _bad(f"{len(sources)} images, but this server takes at most {limits.max_images} "
                   "per request (--max-images).", "messages", "too_many_images")
    template = _template(limits.template, system)
    try:
        ids = tokenize_generation_prompt(question, tokenizer, template, config.num_image_tokens,
                                         config.image_token_index, history=history)
    except ValueError as error:
        raise _bad(str(error), "messages") from None
    budget = limits.context - len(ids)
    if budget < 1 or (requested is not None and requested > budget):
        wanted = requested or 1
        raise _bad(f"this model's context is {limits.context} tokens; the messages take "
                   f"{len(ids)} and {wanted} more were requested. Shorten the conversation "
                   "or lower max_tokens.", "messages", "context_length_exceeded")
    pixels = None
    if sources:
        pixels = np.stack([image_pixels(source, config, "messages") for source in sources])
    return ChatRequest(prompt_ids=ids, pixel_values=pixels,
                       max_tokens=requested or min(limits.max_tokens, budget),
                       temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                       stream=stream, include_usage=include_usage, ignore_eos=ignore_eos)


def stop_strings(template_name: str) -> Sequence[str]:
    stop = get_template(template_name).stop_str
    return [stop] if stop else []
