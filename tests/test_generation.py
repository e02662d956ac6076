"""llava_jax.generate / generation.stream: parity with transformers' greedy generate, padding,
sampling, stopping. One tiny model per module; shapes are shared so few programs compile."""

import numpy as np
import pytest
import torch

from conftest import hf_llava_from_model
from llava_jax.inference import generation
from llava_jax.models.config import get_preset
from llava_jax.models.llava import create_model

MAX_NEW = 8


@pytest.fixture(scope="module")
def model():
    return create_model(get_preset("tiny"), seed=5)


@pytest.fixture(scope="module")
def hf_model(model):
    return hf_llava_from_model(model)


def _prompt(config, rng, before, after, image):
    ids = [1, *rng.integers(3, 500, before)]
    if image:
        ids += [config.image_token_index] * config.num_image_tokens
    return np.asarray(ids + list(rng.integers(3, 500, after)), np.int32)


@pytest.fixture(scope="module")
def prompts(model):
    """Three prompts of different lengths: image, text only, image; plus their pixels."""
    config = model.config
    rng = np.random.default_rng(0)
    rows = [_prompt(config, rng, 5, 7, True), _prompt(config, rng, 11, 0, False),
            _prompt(config, rng, 3, 2, True)]
    pixels = rng.normal(size=(3, 1, 32, 32, 3)).astype(np.float32)
    return rows, pixels


def _hf_greedy(hf_model, ids, pixels=None, max_new_tokens=MAX_NEW):
    kwargs = {}
    if pixels is not None:
        kwargs["pixel_values"] = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.from_numpy(ids[None].astype(np.int64)),
                                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(ids):].numpy()


def _pad(rows, side, pad_id=0):
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


@pytest.fixture(scope="module")
def text_batch(prompts):
    """Two text-only prompts, left padded: (ids, mask)."""
    rows, _ = prompts
    return _pad([rows[1], rows[1][:6]], "left")


@pytest.fixture(scope="module")
def text_greedy(model, text_batch):
    ids, mask = text_batch
    return generation.generate(model, ids, attention_mask=mask, max_new_tokens=MAX_NEW)


def test_left_align_moves_real_tokens_right_and_buckets():
    ids = np.array([[5, 6, 7, 0, 0], [0, 8, 9, 0, 4]])
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 0, 1]])
    out, out_mask, lengths = generation.left_align(ids, mask, bucket=4, fill_id=3)
    np.testing.assert_array_equal(out, [[3, 5, 6, 7], [3, 8, 9, 4]])
    np.testing.assert_array_equal(out_mask, [[0, 1, 1, 1], [0, 1, 1, 1]])
    np.testing.assert_array_equal(lengths, [3, 3])
    assert generation.left_align(np.ones((1, 5)), None, bucket=4)[0].shape == (1, 8)


def test_greedy_matches_transformers_per_row_in_a_right_padded_mixed_batch(
        model, hf_model, prompts):
    rows, pixels = prompts
    ids, mask = _pad(rows, "right")
    image_mask = np.array([[True], [False], [True]])
    out = generation.generate(model, ids, pixels, attention_mask=mask, image_mask=image_mask,
                              max_new_tokens=MAX_NEW)
    assert out.dtype == np.int32 and out.shape == (3, MAX_NEW)
    for row, prompt in enumerate(rows):
        reference = _hf_greedy(hf_model, prompt, pixels[row] if image_mask[row, 0] else None)
        np.testing.assert_array_equal(out[row], reference, err_msg=f"row {row}")


def test_greedy_matches_transformers_left_padded_text_only(model, hf_model, prompts, text_batch,
                                                           text_greedy):
    ids, mask = text_batch
    rows = [ids[i][mask[i] == 1] for i in range(2)]
    for row, prompt in enumerate(rows):
        np.testing.assert_array_equal(text_greedy[row], _hf_greedy(hf_model, prompt))
    # The public entry point resolves lazily to the same function.
    import llava_jax
    np.testing.assert_array_equal(
        llava_jax.generate(model, rows[0][None], max_new_tokens=MAX_NEW), text_greedy[:1])


def test_sampling_is_reproducible_per_seed_and_varies_across_seeds(model, text_batch):
    ids, mask = text_batch
    kwargs = dict(attention_mask=mask, max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.95)
    first = generation.generate(model, ids, seed=0, **kwargs)
    again = generation.generate(model, ids, seed=0, **kwargs)
    other = generation.generate(model, ids, seed=1, **kwargs)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.min() >= 0 and first.max() < model.config.text.vocab_size


def test_top_k_one_equals_greedy(model, text_batch, text_greedy):
    ids, mask = text_batch
    sampled = generation.generate(model, ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                                  temperature=1.0, top_k=1, seed=3)
    np.testing.assert_array_equal(sampled, text_greedy)


def test_sample_filters_keep_only_allowed_tokens():
    import jax
    import jax.numpy as jnp

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 64))
    keys = jax.random.split(jax.random.key(0), 50)
    drawn_p = np.stack([np.asarray(generation._sample(
        logits, k, jnp.float32(1.0), jnp.float32(0.7), greedy=False, top_k=0, use_top_p=True))
        for k in keys])
    drawn_k = np.stack([np.asarray(generation._sample(
        logits, k, jnp.float32(1.0), jnp.float32(1.0), greedy=False, top_k=3, use_top_p=False))
        for k in keys])
    # top_p=0.7: 0.5 alone is short of 0.7, so {0, 1}; top_k=3: {0, 1, 2}, each seen.
    assert set(np.unique(drawn_p)) == {0, 1}
    assert set(np.unique(drawn_k)) == {0, 1, 2}


def test_eos_stops_a_row_and_pads_it(model, text_batch, text_greedy):
    ids, mask = text_batch
    # Make row 0's 3rd greedy token the EOS: row 0 stops there, row 1 keeps its own stream
    # unless it produces that token too.
    eos = int(text_greedy[0, 2])
    out = generation.generate(model, ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                              eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(out[0, :3], text_greedy[0, :3])
    assert (out[0, 3:] == 0).all()
    row1 = list(text_greedy[1])
    stop1 = row1.index(eos) + 1 if eos in row1 else MAX_NEW
    np.testing.assert_array_equal(out[1, :stop1], text_greedy[1, :stop1])
    assert out.shape[1] == max(3, stop1)


def test_all_rows_stopping_ends_generation_early(model, text_batch, text_greedy):
    ids, mask = text_batch
    eos = [int(text_greedy[0, 1]), int(text_greedy[1, 1])]
    out = generation.generate(model, ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                              eos_token_id=eos)
    assert out.shape[1] <= 2
    np.testing.assert_array_equal(out[:, 0], text_greedy[:, 0])


def test_stop_token_sequence(model, text_batch, text_greedy):
    ids, mask = text_batch
    sequence = [int(text_greedy[0, 3]), int(text_greedy[0, 4])]
    out = generation.generate(model, ids[:1], attention_mask=mask[:1], max_new_tokens=MAX_NEW,
                              stop_token_ids=[sequence])
    first = next(i for i in range(1, MAX_NEW) if list(text_greedy[0, i - 1:i + 1]) == sequence)
    np.testing.assert_array_equal(out[0], text_greedy[0, :first + 1])


class CharTokenizer:
    """Stand-in tokenizer: id -> one letter, so stop strings live in the decoded text."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + int(i) % 26) for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - 97 + 1000 for c in text]  # ids the model never emits


def test_stop_strings_cut_generate_and_stream_alike(model, text_batch, text_greedy):
    ids, mask = text_batch
    tokenizer = CharTokenizer()
    stop = tokenizer.decode(text_greedy[0, 2:4])
    expected_end = next(n for n in range(1, MAX_NEW + 1)
                        if stop in tokenizer.decode(text_greedy[0, :n]))
    kwargs = dict(attention_mask=mask, max_new_tokens=MAX_NEW, stop_strings=[stop],
                  tokenizer=tokenizer, pad_token_id=7)
    out = generation.generate(model, ids, **kwargs)
    np.testing.assert_array_equal(out[0, :expected_end], text_greedy[0, :expected_end])
    assert (out[0, expected_end:] == 7).all()
    streamed = np.stack(list(generation.stream(model, ids, **kwargs)), axis=1)
    np.testing.assert_array_equal(streamed, out[:, :streamed.shape[1]])
    assert (out[:, streamed.shape[1]:] == 7).all()


def test_stream_yields_the_same_tokens_as_generate(model, prompts):
    rows, pixels = prompts
    ids, mask = _pad(rows, "left")
    image_mask = np.array([[True], [False], [True]])
    kwargs = dict(attention_mask=mask, image_mask=image_mask, max_new_tokens=MAX_NEW)
    steps = list(generation.stream(model, ids, pixels, **kwargs))
    assert all(step.shape == (3,) and step.dtype == np.int32 for step in steps)
    np.testing.assert_array_equal(np.stack(steps, axis=1),
                                  generation.generate(model, ids, pixels, **kwargs))


def test_placeholder_count_mismatch_is_a_clear_error(model, prompts):
    rows, pixels = prompts
    with pytest.raises(ValueError, match="image placeholder"):
        generation.generate(model, rows[0][None], None, max_new_tokens=2)
    with pytest.raises(ValueError, match="pixel_values must be"):
        generation.generate(model, rows[0][None], pixels[:1, 0], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generation.generate(model, rows[1][None], max_new_tokens=5000)


def test_stacked_and_unstacked_decode_paths_agree(model, prompts):
    """CPU decodes with per-layer weights and a [b, kv_heads, slots, hd] cache; other backends
    use the model's own stacked forward. Both must produce the same tokens."""
    rows, pixels = prompts
    ids, mask = _pad(rows, "right")
    kwargs = dict(attention_mask=mask, image_mask=np.array([[True], [False], [True]]),
                  max_new_tokens=MAX_NEW)
    fast = generation.generate(model, ids, pixels, unstack_layers=True, **kwargs)
    stacked = generation.generate(model, ids, pixels, unstack_layers=False, **kwargs)
    np.testing.assert_array_equal(fast, stacked)
    streamed = list(generation.stream(model, ids, pixels, unstack_layers=False, **kwargs))
    np.testing.assert_array_equal(np.stack(streamed, axis=1), stacked)


def test_a_generation_config_and_keywords_are_one_interface(model, text_batch, text_greedy):
    ids, mask = text_batch
    config = generation.GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.9, seed=3)
    # Keywords override the config's fields: temperature 0 is greedy whatever the config says.
    overridden = generation.generate(model, ids, attention_mask=mask, config=config,
                                     temperature=0.0)
    np.testing.assert_array_equal(overridden, text_greedy)
    sampled = generation.generate(model, ids, attention_mask=mask, config=config)
    by_keywords = generation.generate(model, ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                                      temperature=0.9, seed=3)
    np.testing.assert_array_equal(sampled, by_keywords)
    with pytest.raises(TypeError, match=r"unknown generation setting\(s\) \['max_tokens'\]"):
        generation.generate(model, ids, max_tokens=3)
    with pytest.raises(TypeError, match="needs max_new_tokens"):
        next(generation.stream(model, ids, attention_mask=mask))
    with pytest.raises(ValueError, match="top_p"):
        generation.GenerationConfig(max_new_tokens=2, top_p=0.0)


def test_the_models_per_layer_forward_equals_its_stacked_forward(model, prompts):
    """`layers=` (what CPU decoding uses) is the same computation as the stacked layers."""
    rows, pixels = prompts
    ids, mask = _pad(rows, "right")
    stacked = model(ids, pixels, mask)
    layers = model.language_model.unstack_layers()
    assert len(layers) == model.config.text.num_layers
    np.testing.assert_allclose(model(ids, pixels, mask, layers=layers), stacked, atol=1e-6)
    cache = model.init_cache(3, ids.shape[1])
    per_layer = model.language_model.unstack_cache(cache)
    logits, new_cache = model(ids, pixels, mask, cache=per_layer, cache_index=0, layers=layers)
    np.testing.assert_allclose(logits, stacked, atol=1e-6)
    stacked_logits, stacked_cache = model(ids, pixels, mask, cache=cache, cache_index=0)
    np.testing.assert_allclose(new_cache["layers"][1]["k"], stacked_cache["k"][1], atol=1e-6)
