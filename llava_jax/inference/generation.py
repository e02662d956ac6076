"""Batched autoregressive generation with a KV cache: `llava_jax.generate` and `stream`.

How a batch is laid out. Prompts of different lengths arrive padded (left or right, any
pattern: `attention_mask` says which tokens are real). We move every row's real tokens to the
right end of a buffer whose length is rounded up to a multiple of `PROMPT_BUCKET` (left
padding), so that

  * the last prompt token of every row sits in the same slot: one prefill, then every decode
    step writes all rows at the same cache slot (one `dynamic_update_slice`, no scatter);
  * padding carries segment id 0, which the model never attends to, and rotary positions are
    counted over real tokens only (`cumsum(mask) - 1`), so a padded row computes exactly what
    it would alone;
  * prompts of nearby lengths share one compiled program: compilation happens once per
    (batch, prompt bucket, max_new_tokens, sampling mode).

`generate` runs prefill and the whole decode loop (`lax.while_loop`, exiting as soon as
every row has stopped) in one jitted call, so a step costs no Python dispatch. `stream` runs
the same prefill and a jitted single decode step from Python, yielding each step's tokens
(the chat CLI prints them as they come).

Stopping: a row stops after emitting an EOS id or completing a stop token sequence; the
stopping token(s) are part of the output and every later position holds the pad id
(`pad_token_id`, default the model config's, else the first EOS id), as transformers does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models.llama import LlamaModel

PROMPT_BUCKET = 32  # prompt lengths are rounded up to a multiple of this (left padding)
_NO_TOKEN = -1  # filler in the stop-sequence window: never equals a real token id


# ----------------------------------------------------------------------------------------------
# Host-side preparation


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray | None, bucket: int,
               fill_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moves every row's real tokens to the right end of a bucketed buffer.

    Args:
      input_ids: int [b, s]; attention_mask: [b, s], 1 for real tokens (None: all real).
      bucket: the buffer length is the longest real row rounded up to a multiple of this.
      fill_id: id written into padding (never attended; must not be the image id).
    Returns:
      ids int32 [b, L], mask int32 [b, L] (0 = padding, on the left), lengths int32 [b].
    """
    input_ids = np.asarray(input_ids)
    mask = (np.ones(input_ids.shape, bool) if attention_mask is None
            else np.asarray(attention_mask).astype(bool))
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}.")
    lengths = mask.sum(axis=1).astype(np.int32)
    if (lengths == 0).any():
        raise ValueError(f"rows {np.flatnonzero(lengths == 0).tolist()} have no real token "
                         "(attention_mask all 0): every prompt needs at least one token.")
    total = -(-int(lengths.max()) // bucket) * bucket
    ids = np.full((input_ids.shape[0], total), fill_id, np.int32)
    out_mask = np.zeros((input_ids.shape[0], total), np.int32)
    for row in range(input_ids.shape[0]):
        ids[row, total - lengths[row]:] = input_ids[row][mask[row]]
        out_mask[row, total - lengths[row]:] = 1
    return ids, out_mask, lengths


def _eos_ids(model, eos_token_id) -> np.ndarray:
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return np.full((1,), _NO_TOKEN, np.int32)
    ids = [eos_token_id] if np.isscalar(eos_token_id) else list(eos_token_id)
    return np.asarray(ids or [_NO_TOKEN], np.int32)


def stop_sequences_from_strings(stop_strings: Sequence[str], tokenizer) -> list[list[int]]:
    """Token sequences for stop strings, for the in-loop check.

    A string's ids depend on its context (a BPE merge with the text before it), so this catches
    the usual spelling only; `generate` additionally cuts the decoded text at the first stop
    string, which catches every spelling.
    """
    sequences = []
    for text in stop_strings:
        if not text:
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids:
            sequences.append(list(ids))
    return sequences


def _stop_arrays(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned stop sequences int32 [n, width] and which entries count bool [n, width]."""
    sequences = [list(s) for s in sequences if len(s)]
    if not sequences:
        return np.full((1, 1), _NO_TOKEN, np.int32), np.ones((1, 1), bool)
    width = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), width), _NO_TOKEN, np.int32)
    valid = np.zeros((len(sequences), width), bool)
    for index, sequence in enumerate(sequences):
        tokens[index, width - len(sequence):] = sequence
        valid[index, width - len(sequence):] = True
    return tokens, valid


def _validate_images(model, ids: np.ndarray, mask: np.ndarray, pixel_values, image_mask,
                     layout=None) -> None:
    """Each row must hold exactly num_image_tokens placeholders per real image (a tiled
    model: exactly as many as its layout `(index, weight)` fills)."""
    config = model.config
    placeholders = ((ids == config.image_token_index) & (mask == 1)).sum(axis=1)
    size = config.vision.image_size
    if config.anyres and pixel_values is not None:
        shape = tuple(pixel_values.shape)
        if len(shape) != 6 or shape[0] != ids.shape[0] or shape[3:] != (size, size, 3):
            raise ValueError(f"pixel_values of a tiled model must be float32 [batch="
                             f"{ids.shape[0]}, images, tiles, {size}, {size}, 3]; got {shape}.")
        if layout is None or layout[0] is None or layout[1] is None:
            raise ValueError("a tiled model needs image_feature_index and image_feature_weight "
                             "with its pixel_values (the processor returns them).")
        index, weight = (np.asarray(a) for a in layout)
        if index.shape != weight.shape or index.ndim != 3 or index.shape[0] != ids.shape[0]:
            raise ValueError(f"image_feature_index {index.shape} and image_feature_weight "
                             f"{weight.shape} must both be [batch={ids.shape[0]}, P, 4].")
        expected = (np.abs(weight).sum(axis=2) > 0).sum(axis=1)
        what = "its image layout fills (image_feature_weight)"
    else:
        if pixel_values is None:
            images = np.zeros(ids.shape[0], np.int64)
        else:
            shape = tuple(pixel_values.shape)
            if len(shape) != 5 or shape[0] != ids.shape[0] or shape[2:] != (size, size, 3):
                raise ValueError(f"pixel_values must be float32 [batch={ids.shape[0]}, images, "
                                 f"{size}, {size}, 3] (channels last); got shape {shape}.")
            images = (np.full(ids.shape[0], shape[1]) if image_mask is None
                      else np.asarray(image_mask).astype(bool).sum(axis=1))
        expected = images * config.num_image_tokens
        what = f"{config.num_image_tokens} tokens per image"
    bad = np.flatnonzero(placeholders != expected)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"row {row} has {int(placeholders[row])} image placeholder ids "
            f"({config.image_token_index}) but {int(expected[row])} expected ({what}); expand "
            "each <image> into its placeholder ids (the processor does) and pass one image per "
            "<image>.")


# ----------------------------------------------------------------------------------------------
# Device-side pieces (all traced inside jit)


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
            greedy: bool, top_k: int, use_top_p: bool) -> jax.Array:
    """Next token ids int32 [b] from float32 logits [b, vocab].

    Order as in transformers: temperature, then top-k, then top-p (nucleus: keep the smallest
    set of most likely tokens whose mass reaches top_p, always at least the top token).
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prefill(model, ids, mask, pixel_values, image_mask, layout, cache_length):
    """Runs the bucketed, left-padded prompt; returns last-token logits [b, V] and the cache.

    layout: (image_feature_index, image_feature_weight) of a tiled model, or (None, None)."""
    batch = ids.shape[0]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = model.init_cache(batch, cache_length)
    hidden, cache = model(ids, pixel_values, segment_ids=mask, positions=positions,
                          image_mask=image_mask, image_feature_index=layout[0],
                          image_feature_weight=layout[1], cache=cache, cache_index=0,
                          return_hidden=True)
    # Left alignment puts every row's last real token in the last slot: project only that one.
    logits = model.language_model.logits(hidden[:, -1:])[:, 0]
    return logits, cache


def _decode_layers(model, unstack: bool):
    """None (decode with the model's stacked layers) or its per-layer modules
    (`LlamaModel.unstack_layers`: on CPU a decode step then copies no weights)."""
    return model.language_model.unstack_layers() if unstack else None


def _step_cache(cache: dict, layers) -> dict:
    """The prefill cache in the layout the decode layers take."""
    return cache if layers is None else LlamaModel.unstack_cache(cache)


def _decode(model, layers, token, cache, slot, position):
    """One step: token int32 [b] at cache `slot`, rotary `position` [b] -> logits [b, V]."""
    ones = jnp.ones((token.shape[0], 1), jnp.int32)
    logits, cache = model(token[:, None], segment_ids=ones, positions=position[:, None],
                          cache=cache, cache_index=slot, layers=layers)
    return logits[:, 0], cache


def _finished(token, window, eos_ids, stop_tokens, stop_valid):
    """bool [b]: the token is an EOS id, or the window (last tokens, [b, width]) ends with a
    stop sequence."""
    is_eos = (token[:, None] == eos_ids[None, :]).any(axis=1)
    width = stop_tokens.shape[1]
    tail = window[:, -width:]
    matches = ((tail[:, None, :] == stop_tokens[None]) | ~stop_valid[None]).all(axis=2)
    return is_eos | matches.any(axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k",
                                             "use_top_p", "unstack"))
def _generate_jit(graphdef, state, ids, mask, pixel_values, image_mask, layout, lengths, key,
                  temperature, top_p, eos_ids, stop_tokens, stop_valid, pad_id, *, max_new_tokens, greedy,
                  top_k, use_top_p, unstack):
    """Prefill + while_loop decode. Returns (tokens int32 [b, max_new_tokens], steps)."""
    model = nnx.merge(graphdef, state)
    batch, prompt_length = ids.shape
    width = stop_tokens.shape[1]
    sample = functools.partial(_sample, temperature=temperature, top_p=top_p, greedy=greedy,
                               top_k=top_k, use_top_p=use_top_p)
    logits, cache = _prefill(model, ids, mask, pixel_values, image_mask, layout,
                             prompt_length + max_new_tokens)
    layers = _decode_layers(model, unstack)
    cache = _step_cache(cache, layers)
    # Output buffer with `width` filler columns in front, so the stop window is one slice.
    buffer = jnp.full((batch, width + max_new_tokens), _NO_TOKEN, jnp.int32)

    def emit(step, token, buffer, done):
        token = jnp.where(done, pad_id, token)
        buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, width + step))
        window = jax.lax.dynamic_slice(buffer, (0, step + 1), (batch, width))
        done = done | _finished(token, window, eos_ids, stop_tokens, stop_valid)
        return token, buffer, done

    token = sample(logits, jax.random.fold_in(key, 0))
    token, buffer, done = emit(0, token, buffer, jnp.zeros((batch,), bool))

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~done.all()

    def body(carry):
        step, token, buffer, done, cache = carry
        # The previous token goes at slot prompt_length + step - 1, position length + step - 1.
        logits, cache = _decode(model, layers, token, cache, prompt_length + step - 1,
                                lengths + step - 1)
        token = sample(logits, jax.random.fold_in(key, step))
        token, buffer, done = emit(step, token, buffer, done)
        return step + 1, token, buffer, done, cache

    steps, _, buffer, _, _ = jax.lax.while_loop(cond, body, (1, token, buffer, done, cache))
    return buffer[:, width:], steps


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length", "greedy", "top_k",
                                             "use_top_p", "unstack"))
def _prefill_jit(graphdef, state, ids, mask, pixel_values, image_mask, layout, key, temperature,
                 top_p, *, cache_length, greedy, top_k, use_top_p, unstack):
    """Stream prefill: (first token [b], decode cache, per-layer weight states or None)."""
    model = nnx.merge(graphdef, state)
    logits, cache = _prefill(model, ids, mask, pixel_values, image_mask, layout, cache_length)
    token = _sample(logits, jax.random.fold_in(key, 0), temperature, top_p, greedy=greedy,
                    top_k=top_k, use_top_p=use_top_p)
    layers = _decode_layers(model, unstack)
    layer_states = None if layers is None else [nnx.state(layer) for layer in layers]
    return token, _step_cache(cache, layers), layer_states


@functools.partial(jax.jit, static_argnames=("graphdef", "layer_graphdef", "greedy", "top_k",
                                             "use_top_p"), donate_argnames=("cache",))
def _step_jit(graphdef, state, layer_graphdef, layer_states, token, cache, slot, position, key,
              step, temperature, top_p, *, greedy, top_k, use_top_p):
    model = nnx.merge(graphdef, state)
    layers = (None if layer_states is None
              else [nnx.merge(layer_graphdef, layer_state) for layer_state in layer_states])
    logits, cache = _decode(model, layers, token, cache, slot, position)
    token = _sample(logits, jax.random.fold_in(key, step), temperature, top_p, greedy=greedy,
                    top_k=top_k, use_top_p=use_top_p)
    return token, cache


# ----------------------------------------------------------------------------------------------
# Public API


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How `generate` and `stream` decode: length, sampling, stopping, compilation.

    Every field is also a keyword of `generate` / `stream`, overriding `config=`:
    `generate(model, ids, max_new_tokens=64, temperature=0.7)` equals
    `generate(model, ids, config=GenerationConfig(max_new_tokens=64, temperature=0.7))`.

    Fields:
      max_new_tokens: upper bound on generated tokens per row.
      temperature: 0 = greedy (argmax, as transformers' do_sample=False); > 0 samples.
      top_p, top_k: nucleus / top-k filtering when sampling (1.0 / 0 = off).
      eos_token_id: id or ids that end a row (default: model.config.eos_token_id).
      pad_token_id: written after a row stops (default: config.pad_token_id, else EOS).
      seed: sampling seed; the same seed, batch and settings give the same tokens.
      stop_token_ids: token sequences that end a row (e.g. the template's stop string ids).
      stop_strings: end a row once its decoded text contains one (needs `tokenizer=`).
      bucket: prompts are left-padded to a multiple of this (fewer recompilations).
      unstack_layers: decode with per-layer weight copies (default: on CPU only; see
        `LlamaModel.unstack_layers`). The tokens are the same either way.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    seed: int = 0
    stop_token_ids: Sequence[Sequence[int]] | None = None
    stop_strings: Sequence[str] | None = None
    bucket: int = PROMPT_BUCKET
    unstack_layers: bool | None = None

    def __post_init__(self):
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got "
                             f"temperature={self.temperature}, top_p={self.top_p}, "
                             f"top_k={self.top_k}.")
        if int(self.bucket) < 1:
            raise ValueError(f"bucket must be >= 1; got {self.bucket}.")

    @property
    def unstack(self) -> bool:
        """Whether decoding uses per-layer weight copies (`unstack_layers`, CPU by default)."""
        if self.unstack_layers is None:
            return jax.default_backend() == "cpu"
        return bool(self.unstack_layers)


def resolve_config(config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    """`config` with keyword overrides applied; unknown keywords are an error naming the fields."""
    fields = [field.name for field in dataclasses.fields(GenerationConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"unknown generation setting(s) {unknown}; the settings are {fields}.")
    if config is not None:
        return dataclasses.replace(config, **overrides)
    if "max_new_tokens" not in overrides:
        raise TypeError("generation needs max_new_tokens= (or config=GenerationConfig(...)).")
    return GenerationConfig(**overrides)


class _Prepared:
    """Validated, left-aligned inputs and sampling arrays shared by generate and stream."""

    def __init__(self, model, input_ids, pixel_values, attention_mask, image_mask, tokenizer,
                 settings: GenerationConfig, layout=(None, None)):
        config = model.config
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be int [batch, seq]; got shape {input_ids.shape}.")
        if settings.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text.")
        fill = 0 if config.image_token_index != 0 else 1
        self.ids, self.mask, self.lengths = left_align(input_ids, attention_mask,
                                                       int(settings.bucket), fill)
        _validate_images(model, self.ids, self.mask, pixel_values, image_mask, layout)
        max_new_tokens = int(settings.max_new_tokens)
        limit = config.text.max_position_embeddings
        if int(self.lengths.max()) + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({int(self.lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the model's max_position_embeddings ({limit}); shorten the prompt or "
                "lower max_new_tokens.")
        self.pixel_values = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
        self.image_mask = None if image_mask is None else jnp.asarray(image_mask, bool)
        # Indexed by placeholder number, not position: left alignment leaves it valid.
        self.layout = ((None, None) if pixel_values is None or not config.anyres else
                       (jnp.asarray(layout[0], jnp.int32), jnp.asarray(layout[1], jnp.float32)))
        self.max_new_tokens = max_new_tokens
        self.unstack = settings.unstack
        self.eos_ids = _eos_ids(model, settings.eos_token_id)
        pad_token_id = settings.pad_token_id
        if pad_token_id is None:
            pad_token_id = config.pad_token_id
        if pad_token_id is None:
            pad_token_id = int(self.eos_ids[0]) if self.eos_ids[0] >= 0 else 0
        self.pad_id = int(pad_token_id)
        self.stop_strings = [s for s in (settings.stop_strings or ()) if s]
        self.tokenizer = tokenizer
        sequences = list(settings.stop_token_ids or ())
        if self.stop_strings:
            sequences += stop_sequences_from_strings(self.stop_strings, tokenizer)
        self.stop_tokens, self.stop_valid = _stop_arrays(sequences)
        temperature, top_p = settings.temperature, settings.top_p
        # Greedy at temperature 0 (as transformers' do_sample=False); sampling otherwise.
        self.statics = dict(greedy=temperature == 0, top_k=int(settings.top_k),
                            use_top_p=temperature > 0 and top_p < 1)
        self.temperature = jnp.float32(temperature if temperature > 0 else 1.0)
        self.top_p = jnp.float32(top_p)
        self.key = jax.random.key(settings.seed)

    def cut_at_stop_strings(self, tokens: np.ndarray) -> np.ndarray:
        """Pads every row after the token that completes its first stop string."""
        if not self.stop_strings:
            return tokens
        tokens = tokens.copy()
        for row in range(tokens.shape[0]):
            end = stop_string_end(tokens[row], self.stop_strings, self.tokenizer)
            if end is not None:
                tokens[row, end:] = self.pad_id
        return tokens


def stop_string_end(tokens: Sequence[int], stop_strings: Sequence[str], tokenizer) -> int | None:
    """Smallest n such that decode(tokens[:n]) contains a stop string, or None.

    Decoding a prefix gives a prefix of the text, so containment grows with n: binary search.
    """
    def contains(n: int) -> bool:
        text = tokenizer.decode([int(t) for t in tokens[:n]], skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    if not len(tokens) or not contains(len(tokens)):
        return None
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if contains(middle):
            high = middle
        else:
            low = middle + 1
    return low


def generate(model, input_ids, pixel_values=None, *, attention_mask=None, image_mask=None,
             image_feature_index=None, image_feature_weight=None,
             tokenizer=None, config: GenerationConfig | None = None, **settings) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens for each prompt of a batch.

    Args:
      model: a LlavaModel (e.g. `load_pretrained(...).model`).
      input_ids: int [batch, seq] prompts, each image as `num_image_tokens` copies of
        `config.image_token_index` (see `data.tokenize_generation_prompt`).
      pixel_values: float32 [batch, images, H, W, 3] (channels last, CLIP-normalized) or None.
      attention_mask: [batch, seq], 1 for real tokens; left or right padding (any pattern).
      image_mask: bool [batch, images], which image slots are real (default: all).
      image_feature_index, image_feature_weight: a tiled (anyres) model's layout [batch, P, 4],
        with pixel_values [batch, images, tiles, H, W, 3] (its processor returns all three).
      tokenizer: decodes the text for `stop_strings`.
      config, **settings: a `GenerationConfig` and/or its fields as keywords
        (`max_new_tokens=`, `temperature=`, `top_p=`, `top_k=`, `eos_token_id=`,
        `pad_token_id=`, `seed=`, `stop_token_ids=`, `stop_strings=`, `bucket=`,
        `unstack_layers=`); keywords override the config's fields.
    Returns:
      np.int32 [batch, n] new tokens only, n <= max_new_tokens (the longest row). A row that
      stopped early ends with its EOS / stop tokens followed by `pad_token_id`.
    """
    p = _Prepared(model, input_ids, pixel_values, attention_mask, image_mask, tokenizer,
                  resolve_config(config, settings), (image_feature_index, image_feature_weight))
    graphdef, state = nnx.split(model)
    tokens, steps = _generate_jit(
        graphdef, state, p.ids, p.mask, p.pixel_values, p.image_mask, p.layout, p.lengths, p.key,
        p.temperature, p.top_p, p.eos_ids, p.stop_tokens, p.stop_valid, np.int32(p.pad_id),
        max_new_tokens=p.max_new_tokens, unstack=p.unstack, **p.statics)
    tokens = np.asarray(tokens)[:, :int(steps)]
    return p.cut_at_stop_strings(tokens)


def stream(model, input_ids, pixel_values=None, *, attention_mask=None, image_mask=None,
           image_feature_index=None, image_feature_weight=None,
           tokenizer=None, config: GenerationConfig | None = None,
           **settings) -> Iterator[np.ndarray]:
    """Like `generate` (same arguments), but yields each step's tokens np.int32 [batch] as soon
    as they exist.

    Rows that have stopped yield `pad_token_id`. Stop strings are checked on the decoded text
    after every step, so the stream ends with the token that completes the stop string. With
    the same arguments the concatenated stream equals `generate`'s output.
    """
    p = _Prepared(model, input_ids, pixel_values, attention_mask, image_mask, tokenizer,
                  resolve_config(config, settings), (image_feature_index, image_feature_weight))
    graphdef, state = nnx.split(model)
    batch, prompt_length = p.ids.shape
    token, cache, layer_states = _prefill_jit(
        graphdef, state, p.ids, p.mask, p.pixel_values, p.image_mask, p.layout, p.key,
        p.temperature,
        p.top_p, cache_length=prompt_length + p.max_new_tokens, unstack=p.unstack, **p.statics)
    layer_graphdef = nnx.split(model.language_model.layers)[0]
    done = np.zeros(batch, bool)
    width = p.stop_tokens.shape[1]
    history = np.full((batch, width + p.max_new_tokens), _NO_TOKEN, np.int32)
    lengths = jnp.asarray(p.lengths)
    for step in range(p.max_new_tokens):
        if step:
            token, cache = _step_jit(graphdef, state, layer_graphdef, layer_states, token, cache,
                                     prompt_length + step - 1, lengths + step - 1, p.key, step,
                                     p.temperature, p.top_p, **p.statics)
        emitted = np.where(done, p.pad_id, np.asarray(token)).astype(np.int32)
        history[:, width + step] = emitted
        window = history[:, step + 1: step + 1 + width]
        done = done | np.asarray(_finished(emitted, window, p.eos_ids, p.stop_tokens,
                                           p.stop_valid))
        if p.stop_strings:
            for row in np.flatnonzero(~done):
                generated = history[row, width: width + step + 1]
                text = p.tokenizer.decode(generated.tolist(), skip_special_tokens=False)
                done[row] = any(s in text for s in p.stop_strings)
        token = jnp.asarray(emitted)
        yield emitted
        if done.all():
            return


def decode_new_tokens(tokens: Sequence[int], tokenizer, *, eos_token_id=None,
                      stop_strings: Sequence[str] = ()) -> str:
    """Text of one row of `generate` output, as the original LLaVA scripts report it.

    Cuts at the first EOS id (excluded), decodes without special tokens, cuts the text at the
    first stop string (the original strips a trailing stop string) and strips whitespace.
    """
    eos = set(np.atleast_1d(np.asarray(eos_token_id if eos_token_id is not None
                                       else tokenizer.eos_token_id)).tolist())
    ids = [int(t) for t in tokens]
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
    for stop in stop_strings:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text.strip()
