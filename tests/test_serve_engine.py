"""inference.engine (continuous batching), in process: requests admitted at different steps,
over a cache small enough to shift, give `generate`'s tokens exactly; sampling, stop strings,
streamed text, cancellation and the bounded queue. One tiny model and tokenizer per module."""

import numpy as np
import pytest

from llava_jax.data import demo, tokenize_generation_prompt
from llava_jax.inference.engine import (Engine, EngineRequest, Failed, Finished, QueueFullError,
                                        TextDelta)
from llava_jax.inference.generation import decode_new_tokens, generate
from llava_jax.models.config import get_preset
from llava_jax.models.llava import create_model

MAX_NEW = 24
STOP = ["</s>"]  # vicuna_v1's stop string


@pytest.fixture(scope="module")
def tokenizer():
    return demo.load_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    config = get_preset("tiny", text={"vocab_size": len(tokenizer)},
                        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                        pad_token_id=tokenizer.pad_token_id)
    return create_model(config, seed=1)


QUESTIONS = ["<image>\nWhat color is the shape?", "Hello there",
             "<image>\nDescribe the image in detail, please, with many words and more words.",
             "Hi", "<image>\n<image>\nCompare the two pictures."]


@pytest.fixture(scope="module")
def prompts(model, tokenizer):
    """(ids int32 [n], pixels [images, 32, 32, 3] or None) per question."""
    config = model.config
    rng = np.random.default_rng(0)
    out = []
    for question in QUESTIONS:
        ids = tokenize_generation_prompt(question, tokenizer, "vicuna_v1",
                                         config.num_image_tokens, config.image_token_index)
        images = question.count("<image>")
        pixels = rng.normal(size=(images, 32, 32, 3)).astype(np.float32) if images else None
        out.append((ids, pixels))
    return out


def _reference(model, tokenizer, ids, pixels, **settings):
    """generate()'s tokens for one prompt alone, padding after the stop dropped."""
    tokens = generate(model, ids[None], None if pixels is None else pixels[None],
                      max_new_tokens=settings.pop("max_new_tokens", MAX_NEW), stop_strings=STOP,
                      tokenizer=tokenizer, **settings)[0].tolist()
    return _unpad(model, tokens)


def _unpad(model, tokens):
    tokens = list(tokens)
    while len(tokens) > 1 and tokens[-1] == model.config.pad_token_id:
        tokens.pop()  # (the tiny random model never emits the pad id itself)
    return tokens


@pytest.fixture(scope="module")
def greedy(model, tokenizer, prompts):
    """generate()'s greedy tokens for every prompt: one right-padded batch (generate computes
    each row as it would alone; tests/test_generation.py), so one program compiles."""
    length = max(len(ids) for ids, _ in prompts)
    images = max(0 if pixels is None else len(pixels) for _, pixels in prompts)
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros_like(ids)
    pixel_values = np.zeros((len(prompts), images, 32, 32, 3), np.float32)
    image_mask = np.zeros((len(prompts), images), bool)
    for row, (prompt, pixels) in enumerate(prompts):
        ids[row, :len(prompt)], mask[row, :len(prompt)] = prompt, 1
        if pixels is not None:
            pixel_values[row, :len(pixels)], image_mask[row, :len(pixels)] = pixels, True
    tokens = generate(model, ids, pixel_values, attention_mask=mask, image_mask=image_mask,
                      max_new_tokens=MAX_NEW, stop_strings=STOP, tokenizer=tokenizer)
    return [_unpad(model, row) for row in tokens.tolist()]


class Listener:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def finished(self) -> Finished:
        done = [e for e in self.events if isinstance(e, (Finished, Failed))]
        assert len(done) == 1 and done[0] is self.events[-1], self.events
        return done[0]

    @property
    def streamed(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))


def _engine(model, tokenizer, **overrides):
    """Every test's engine has the same shapes, so the programs compile once per module.
    context 112: the cache has 256 columns, which these requests fill (the cache shifts)."""
    return Engine(model, tokenizer, max_batch=3, context=112, prefill_batch=2,
                  stop_strings=STOP, **overrides)


def _request(prompt, listener, **settings):
    ids, pixels = prompt
    settings.setdefault("max_new_tokens", MAX_NEW)
    return EngineRequest(ids, pixels, on_event=listener, **settings)


@pytest.mark.parametrize("unstack", [None, False], ids=["default", "stacked-layers"])
def test_requests_admitted_at_different_times_equal_generate(model, tokenizer, prompts, greedy,
                                                             unstack):
    # unstack=False: the cache layout GPUs and TPUs decode with (CPU's default is per layer).
    engine = _engine(model, tokenizer, unstack_layers=unstack)
    listeners = [Listener() for _ in prompts]
    engine.submit(_request(prompts[0], listeners[0]))
    engine.step()
    engine.step()
    engine.submit(_request(prompts[1], listeners[1]))
    engine.submit(_request(prompts[3], listeners[3]))  # same bucket as [1]: one prefill
    for _ in range(5):
        engine.step()
    engine.submit(_request(prompts[2], listeners[2]))  # waits for a free slot
    engine.submit(_request(prompts[4], listeners[4]))
    engine.run_until_idle()
    assert engine.stats["shifts"] >= 1 and engine.stats["completed"] == len(prompts)
    assert engine.stats["prefills"] < len(prompts)  # [1] and [3] were prefilled together
    for prompt, expected, listener in zip(prompts, greedy, listeners):
        finished = listener.finished
        assert list(finished.token_ids) == expected
        assert finished.text == decode_new_tokens(finished.token_ids, tokenizer,
                                                  stop_strings=STOP)
        assert listener.streamed == finished.text
        assert finished.prompt_tokens == len(prompt[0])
        assert finished.reason == ("length" if len(finished.token_ids) == MAX_NEW else "stop")


def test_sampled_rows_follow_their_own_seed_whatever_the_batch(model, tokenizer, prompts,
                                                              greedy):
    engine = _engine(model, tokenizer)
    # Nucleus sampling: the program also draws these rows' plain-temperature tokens and picks.
    settings = [dict(temperature=0.9, top_p=0.7, seed=3), dict(temperature=0.9, top_p=0.7, seed=4)]
    listeners = [Listener() for _ in range(3)]
    for listener, setting in zip(listeners, settings):
        engine.submit(_request(prompts[0], listener, **setting))
        engine.step()
    engine.submit(_request(prompts[1], listeners[2]))  # a greedy neighbour
    engine.run_until_idle()
    samples = [list(listener.finished.token_ids) for listener in listeners[:2]]
    assert samples[0] != samples[1]
    for sample, setting in zip(samples, settings):
        assert sample == _reference(model, tokenizer, *prompts[0], **setting)
    assert list(listeners[2].finished.token_ids) == greedy[1]


def test_stop_strings_end_the_answer_and_are_never_streamed(model, tokenizer, prompts):
    engine = _engine(model, tokenizer)
    free = Listener()
    engine.submit(_request(prompts[0], free))
    engine.run_until_idle()
    text = free.finished.text
    stop = text.split()[2]  # a word in the middle of the free answer
    cut = Listener()
    engine.submit(_request(prompts[0], cut, stop=[stop]))
    engine.run_until_idle()
    # The same tokens as the free answer (generate's, by the first test) up to the one that
    # completes the stop string, as generate(stop_strings=...) stops.
    tokens = list(cut.finished.token_ids)
    assert tokens == list(free.finished.token_ids)[:len(tokens)]
    assert stop in tokenizer.decode(tokens) and stop not in tokenizer.decode(tokens[:-1])
    assert cut.finished.reason == "stop" and len(tokens) < len(free.finished.token_ids)
    assert cut.finished.text == text[:text.index(stop)].strip()
    assert cut.streamed == cut.finished.text and stop not in cut.streamed


def test_ignore_eos_runs_to_max_new_tokens(model, tokenizer, prompts):
    engine = _engine(model, tokenizer)
    listener = Listener()
    engine.submit(_request(prompts[1], listener, max_new_tokens=40, ignore_eos=True))
    engine.run_until_idle()
    assert len(listener.finished.token_ids) == 40 and listener.finished.reason == "length"


def test_cancel_and_the_bounded_queue(model, tokenizer, prompts, greedy):
    engine = _engine(model, tokenizer, max_queue=1)
    running = [Listener() for _ in range(3)]
    first = [_request(prompts[1], listener, max_new_tokens=60, ignore_eos=True)
             for listener in running]
    for request in first:
        engine.submit(request)
        engine.step()
    waiting = Listener()
    engine.submit(_request(prompts[3], waiting))
    with pytest.raises(QueueFullError, match="waiting"):
        engine.submit(_request(prompts[3], Listener()))
    assert (engine.active, engine.queued) == (3, 1)
    first[1].cancel()
    engine.step()  # the cancelled row leaves, the queued request takes its slot
    assert engine.active == 3 and engine.queued == 0
    running = running[1]
    assert running.finished.reason == "cancelled" and len(running.finished.token_ids) < 60
    assert running.streamed and not running.finished.text.startswith(running.streamed + "x")
    engine.run_until_idle()
    assert list(waiting.finished.token_ids) == greedy[3]
    assert engine.stats["cancelled"] == 1 and engine.stats["rejected"] == 1


def test_requests_that_cannot_run_are_refused_up_front(model, tokenizer, prompts):
    engine = _engine(model, tokenizer)
    ids, pixels = prompts[0]  # 50 tokens
    with pytest.raises(ValueError, match="context is 112 tokens"):
        engine.submit(EngineRequest(ids, pixels, max_new_tokens=63))
    with pytest.raises(ValueError, match="placeholder"):
        engine.submit(EngineRequest(ids, None, max_new_tokens=4))
    with pytest.raises(ValueError, match="context must be"):
        Engine(model, tokenizer, context=model.config.text.max_position_embeddings + 1)
    assert engine.queued == 0
