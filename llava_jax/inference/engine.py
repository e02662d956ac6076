"""Continuous batching: many requests decoded together in one fixed-shape KV cache.

    engine = Engine(model, tokenizer, max_batch=16, stop_strings=[template.stop_str])
    engine.start()                                   # a background thread runs `step()`
    request = EngineRequest(prompt_ids, pixel_values, max_new_tokens=64, on_event=callback)
    engine.submit(request)                           # QueueFullError when the queue is full
    ...                                              # callback gets TextDelta / Finished
    request.cancel()                                 # its slot is freed before the next step

The cache has `max_batch` rows ("slots") of `width` columns. All rows share one write
column `t`: a decode step writes every active row's newest token at column `t` (one
`dynamic_update_slice`, the model's own cached forward with `cache_index=t`, exactly as
`generate` decodes) and then `t += 1`. Rows differ only in where their tokens start; each
row carries its own rotary positions and segment ids (0 = empty column, never attended), so
a row computes what it would alone.

Admission, between decode steps: waiting requests with the same prompt bucket (length
rounded up to `bucket`) and image count are prefilled together (one jitted call, batch
padded to a power of two by repeating a row), and each row's prompt block is copied into a
free slot so that it ends at column `t` (its first decode step writes at `t`). The first
token comes from the prefill logits, as in `generate`.

Columns run out when `t` reaches `width`: then every row is shifted left by the first column
any active row still uses (a roll of the cache; attention depends on slot differences
only, which a uniform shift keeps). `width` is `context` + 4 buckets: a request spans at
most `context` + `bucket` - 2 columns, so a shift frees at least 3 buckets of columns (a
shift, one pass over the cache, then every >= 99 steps at worst; usually far rarer), while
every decode step attends over the whole width, so the slack is kept small. A prompt block
longer than `t` shifts the cache right instead.

A row ends on an EOS id, on a stop string in its decoded text (the template's and the
request's), at `max_new_tokens`, or when cancelled (answer_text.py: the text it streams).
The jitted programs are in engine_ops.py.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from llava_jax.inference import engine_ops as ops
from llava_jax.inference.answer_text import AnswerText
from llava_jax.inference.generation import PROMPT_BUCKET, _eos_ids, left_align
from llava_jax.models.llama import LlamaModel

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_queue` requests already."""


# ----------------------------------------------------------------------------------------------
# What a request receives


@dataclasses.dataclass(frozen=True)
class TextDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (EOS or stop string) | "length" | "cancelled"
    text: str  # the whole answer (decode_new_tokens of token_ids)
    token_ids: tuple[int, ...]  # every generated token, the stopping one included
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class Failed:
    message: str


Event = TextDelta | Finished | Failed
_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class EngineRequest:
    """One prompt to answer. `on_event` is called from the engine thread."""

    prompt_ids: np.ndarray  # int32 [n]: images as num_image_tokens placeholder ids each
    pixel_values: np.ndarray | None = None  # float32 [images, H, W, 3], one per placeholder run
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()  # stop strings besides the engine's (the template's)
    ignore_eos: bool = False  # benchmarks: only max_new_tokens (and `stop`) end the answer
    on_event: Callable[[Event], None] | None = None
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    submitted: float = 0.0

    def cancel(self) -> None:
        """Stops this request at the next step (queued: dropped; decoding: slot freed)."""
        self.cancelled = True


# ----------------------------------------------------------------------------------------------
# The engine


@dataclasses.dataclass
class _Slot:
    request: EngineRequest
    answer: AnswerText
    start: int  # first cache column of its prompt block
    prompt_tokens: int


def _bucket_images(count: int) -> int:
    return 0 if count == 0 else 1 << (count - 1).bit_length()


class Engine:
    """Continuous batching over one model (module docstring). Thread-safe `submit`; `step`
    runs on one thread (`start()`'s, or a test's)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, context: int | None = None,
                 max_queue: int = 64, prefill_batch: int = 8, stop_strings: Sequence[str] = (),
                 bucket: int = PROMPT_BUCKET, unstack_layers: bool | None = None):
        config = model.config
        if config.anyres:  # its prefill has no tiled layout (engine_ops.prefill_insert)
            raise ValueError(f"the serving engine takes flat models only; this one is tiled "
                             f"(image_aspect={config.image_aspect!r}).")
        limit = config.text.max_position_embeddings
        self.context = int(context or limit)
        if not 1 <= self.context <= limit:
            raise ValueError(f"context must be in 1..{limit} (max_position_embeddings); "
                             f"got {context}.")
        if max_batch < 1 or max_queue < 0 or prefill_batch < 1 or bucket < 1:
            raise ValueError("need max_batch >= 1, max_queue >= 0, prefill_batch >= 1 and "
                             f"bucket >= 1; got {max_batch}, {max_queue}, {prefill_batch}, "
                             f"{bucket}.")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        self.prefill_batch, self.bucket = int(prefill_batch), int(bucket)
        self.stop_strings = [s for s in stop_strings if s]
        self.width = -(-self.context // self.bucket) * self.bucket + 4 * self.bucket
        self.eos_ids = _eos_ids(model, None)
        self.fill_id = 0 if config.image_token_index != 0 else 1
        self.graphdef, self.state = nnx.split(model)
        unstack = (jax.default_backend() == "cpu") if unstack_layers is None else unstack_layers
        cache = model.init_cache(self.max_batch, self.width)
        if unstack:  # per-layer weights: on CPU a decode step then copies none (generate's choice)
            self.layer_graphdef = nnx.split(model.language_model.layers)[0]
            self.layer_states = ops.layer_states(self.graphdef, self.state)
            cache = LlamaModel.unstack_cache(cache)
        else:
            self.layer_graphdef, self.layer_states = None, None
        self.cache = cache
        self.column = 0
        self.slots: list[_Slot | None] = [None] * self.max_batch
        self.tokens = np.zeros(self.max_batch, np.int32)
        self.key_data = np.zeros((self.max_batch, 2), np.uint32)
        self.temperature = np.zeros(self.max_batch, np.float32)
        self.top_p = np.ones(self.max_batch, np.float32)
        self.waiting: collections.deque[EngineRequest] = collections.deque()
        self.condition = threading.Condition()
        self.stats = collections.Counter()
        self._thread: threading.Thread | None = None
        self._running = False

    # ---- submitting ------------------------------------------------------------------------

    def check(self, request: EngineRequest) -> None:
        """Raises ValueError (a message for the client) when the request cannot run."""
        config = self.model.config
        ids = np.asarray(request.prompt_ids)
        if ids.ndim != 1 or not ids.size:
            raise ValueError("the prompt is empty.")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {request.max_new_tokens}.")
        if ids.size + request.max_new_tokens > self.context:
            raise ValueError(
                f"this server's context is {self.context} tokens; the prompt has {ids.size} "
                f"and {request.max_new_tokens} more were requested.")
        images = 0 if request.pixel_values is None else len(request.pixel_values)
        placeholders = int((ids == config.image_token_index).sum())
        if placeholders != images * config.num_image_tokens:
            raise ValueError(f"the prompt has {placeholders} image placeholder ids for {images} "
                             f"image(s) x {config.num_image_tokens} tokens.")
        if images:
            size = config.vision.image_size
            shape = tuple(request.pixel_values.shape[1:])
            if shape != (size, size, 3):
                raise ValueError(f"pixel_values must be [images, {size}, {size}, 3]; got "
                                 f"{tuple(request.pixel_values.shape)}.")

    def submit(self, request: EngineRequest) -> None:
        """Queues a request (ValueError: it cannot run; QueueFullError: no room)."""
        self.check(request)
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFullError(f"{len(self.waiting)} requests are waiting already (the "
                                     f"server's --max-queue); try again shortly.")
            request.submitted = time.monotonic()
            self.waiting.append(request)
            self.stats["submitted"] += 1
            self.condition.notify_all()

    # ---- the loop --------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return sum(slot is not None for slot in self.slots)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def idle(self) -> bool:
        return not self.waiting and not self.active

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="llava-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.condition:
            self._running = False
            self.condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self.condition:
                while self._running and self.idle():
                    self.condition.wait()
                if not self._running:
                    return
            self.step()

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Steps on the calling thread until nothing is queued or decoding (tests, warm-up)."""
        for _ in range(max_steps):
            if self.idle():
                return
            self.step()
        raise RuntimeError(f"the engine is still busy after {max_steps} steps.")

    def step(self) -> None:
        """Drops cancelled requests, admits one prefill group, runs one decode step."""
        self._drop_cancelled()
        group = self._take_group()
        if group:
            try:
                self._admit(group)
            except Exception as error:  # a failing prefill fails its requests only
                logger.exception("prefill failed")
                self._recover(group, error)
        if self.active:
            try:
                self._decode()
            except Exception as error:  # every request in flight fails, the engine goes on
                logger.exception("decode step failed")
                self._recover([], error, everyone=True)

    def _drop_cancelled(self) -> None:
        with self.condition:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self.stats["cancelled"] += 1
        for index, slot in enumerate(self.slots):
            if slot is not None and slot.request.cancelled:
                self._finish(index, "cancelled")

    def _group_key(self, request: EngineRequest) -> tuple[int, int]:
        length = -(-len(request.prompt_ids) // self.bucket) * self.bucket
        images = 0 if request.pixel_values is None else len(request.pixel_values)
        return length, _bucket_images(images)

    def _take_group(self) -> list[EngineRequest]:
        """The head of the queue and the waiting requests of its bucket, up to the free
        slots and `prefill_batch`."""
        free = self.max_batch - self.active
        with self.condition:
            if not free or not self.waiting:
                return []
            key = self._group_key(self.waiting[0])
            group = [r for r in self.waiting if self._group_key(r) == key]
            group = group[:min(free, self.prefill_batch)]
            for request in group:
                self.waiting.remove(request)
        return group

    def _admit(self, group: list[EngineRequest]) -> None:
        length, images = self._group_key(group[0])
        active = [slot for slot in self.slots if slot is not None]
        if not active:
            self.column = length  # nothing to keep: the block starts at column 0
        elif self.column < length:
            self._shift(length - self.column)
        rows = [index for index, slot in enumerate(self.slots) if slot is None][:len(group)]
        padded = 1 << (len(group) - 1).bit_length()
        order = list(range(len(group))) + [0] * (padded - len(group))
        lengths = [len(group[i].prompt_ids) for i in order]
        ids = np.zeros((padded, max(lengths)), np.int32)
        mask = np.zeros_like(ids)
        for row, i in enumerate(order):
            ids[row, :lengths[row]], mask[row, :lengths[row]] = group[i].prompt_ids, 1
        ids, mask, _ = left_align(ids, mask, self.bucket, self.fill_id)
        assert ids.shape[1] == length, (ids.shape, length)
        pixel_values = image_mask = None
        if images:
            size = self.model.config.vision.image_size
            pixel_values = np.zeros((padded, images, size, size, 3), np.float32)
            image_mask = np.zeros((padded, images), bool)
            for row, i in enumerate(order):
                if group[i].pixel_values is not None:
                    count = len(group[i].pixel_values)
                    pixel_values[row, :count] = group[i].pixel_values
                    image_mask[row, :count] = True
        settings = [self._settings(group[i]) for i in order]
        key_data = np.stack([s[0] for s in settings])
        temperature = np.array([s[1] for s in settings], np.float32)
        top_p = np.array([s[2] for s in settings], np.float32)
        slot_rows = np.array([rows[i] for i in order], np.int32)
        tokens, self.cache = ops.prefill_insert(
            self.graphdef, self.state, ids, mask, pixel_values, image_mask, slot_rows,
            np.int32(self.column - length), key_data, temperature, top_p, self.cache,
            sampling=True, use_top_p=True)  # one program for every mode: it samples once
        tokens = np.asarray(tokens)
        self.stats["prefills"] += 1
        for j, request in enumerate(group):
            index = rows[j]
            answer = AnswerText(request, self.tokenizer, self.eos_ids, self.stop_strings)
            self.slots[index] = _Slot(request, answer, self.column - length,
                                      len(request.prompt_ids))
            self.key_data[index], self.temperature[index], self.top_p[index] = settings[j]
            self._emit_token(index, int(tokens[j]))

    def _settings(self, request: EngineRequest):
        key = np.asarray(jax.random.key_data(jax.random.key(int(request.seed))), np.uint32)
        return key, float(request.temperature), float(request.top_p)

    @staticmethod
    def _statics(temperature: np.ndarray, top_p: np.ndarray) -> dict:
        sampling = bool((temperature > 0).any())
        return dict(sampling=sampling, use_top_p=sampling and bool(
            ((temperature > 0) & (top_p < 1)).any()))

    def _decode(self) -> None:
        if self.column >= self.width:
            starts = [slot.start for slot in self.slots if slot is not None]
            self._shift(-min(starts))
        active = np.array([slot is not None for slot in self.slots])
        positions = np.array([0 if slot is None else slot.prompt_tokens + len(slot.answer.ids) - 1
                              for slot in self.slots], np.int32)
        steps = np.array([0 if slot is None else len(slot.answer.ids) for slot in self.slots],
                         np.int32)
        temperature = np.where(active, self.temperature, 0).astype(np.float32)
        tokens, self.cache = ops.decode(
            self.graphdef, self.state, self.layer_graphdef, self.layer_states, self.tokens,
            positions, active, np.int32(self.column), self.key_data, steps, temperature,
            self.top_p, self.cache, **self._statics(temperature, self.top_p))
        tokens = np.asarray(tokens)
        self.column += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += int(active.sum())
        for index in np.flatnonzero(active):
            self._emit_token(int(index), int(tokens[index]))

    def _shift(self, delta: int) -> None:
        """All columns move by delta (< 0: left, dropping columns no active row uses)."""
        assert delta != 0 and self.column + delta <= self.width, (delta, self.column)
        self.cache = ops.shift(self.cache, np.int32(delta))
        self.column += delta
        for slot in self.slots:
            if slot is not None:
                slot.start += delta
                assert slot.start >= 0
        self.stats["shifts"] += 1

    def _emit_token(self, index: int, token: int) -> None:
        slot = self.slots[index]
        self.tokens[index] = token
        done = slot.answer.add(token)
        self.stats["tokens"] += 1
        if done:
            self._finish(index, slot.answer.reason)
            return
        delta = slot.answer.delta()
        if delta:
            self._send(slot.request, TextDelta(delta))

    def _finish(self, index: int, reason: str) -> None:
        slot = self.slots[index]
        self.slots[index] = None
        answer = slot.answer
        text = answer.final_text()
        if reason != "cancelled":
            tail = answer.final_delta(text)
            if tail:
                self._send(slot.request, TextDelta(tail))
        self.stats["cancelled" if reason == "cancelled" else "completed"] += 1
        self._send(slot.request, Finished(reason, text, tuple(answer.ids), slot.prompt_tokens))

    def _send(self, request: EngineRequest, event: Event) -> None:
        if request.on_event is None:
            return
        try:
            request.on_event(event)
        except Exception:  # a listener's failure (closed loop) must not stop the engine
            logger.exception("request %s: event listener failed", request.id)

    def _recover(self, group: list[EngineRequest], error: Exception, everyone: bool = False):
        """After a failed device call: `group` fails; if the call had consumed the (donated)
        cache (or `everyone`), every request in flight fails too and the cache is rebuilt."""
        message = f"generation failed: {type(error).__name__}: {error}"
        failed = list(group)
        if everyone or any(leaf.is_deleted() for leaf in jax.tree.leaves(self.cache)):
            for index, slot in enumerate(self.slots):
                if slot is not None:
                    self.slots[index] = None
                    failed.append(slot.request)
            cache = self.model.init_cache(self.max_batch, self.width)
            self.cache = cache if self.layer_states is None else LlamaModel.unstack_cache(cache)
            self.column = 0
        for request in failed:
            self._send(request, Failed(message))
        self.stats["failed"] += len(failed)
