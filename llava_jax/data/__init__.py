"""LLaVA data: conversation templates, tokenization with labels, CLIP image preprocessing,
raw-record sources and the grain batch pipeline. Importing this package does not import JAX
or model code (grain and jax are imported only by the pipeline, on first use).

    tokenize_conversation(conversations, tokenizer, template, num_image_tokens,
                          image_token_index, max_length) -> {"input_ids", "labels"}
    preprocess_image(pil_image, image_size, aspect) -> float32[H, W, 3]
    make_dataset(data_config, tokenizer, *, num_image_tokens, image_token_index, image_size,
                 batch_size | global_batch_size, seed, shard_index, shard_count) -> BatchIterator
    default_data_config(stage) / num_samples(data_config) / skip_counts(iterator)
    load_tokenizer(directory) -> transformers PreTrainedTokenizerFast (the one loader)
"""

import importlib

from llava_jax.data.conversation import (
    IMAGE_TOKEN,
    SHORT_ANSWER_PROMPT,
    TEMPLATES,
    Segment,
    Template,
    get_template,
)
from llava_jax.data.image import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PAD_COLOR,
    ImageDecodeError,
    decode_image,
    expand_to_square,
    preprocess_image,
)
from llava_jax.data.sources import ArrayRecordSource, JsonSource, MalformedJsonError
from llava_jax.data.tokenize import (
    IGNORE_INDEX,
    TokenizationError,
    load_tokenizer,
    normalize_conversation,
    tokenize_conversation,
    tokenize_generation_prompt,
)

# The pipeline pulls in grain (and jax for the default shard index): load it on first use.
_PIPELINE = ("make_dataset", "default_data_config", "validate_data_config", "num_samples",
             "skip_counts", "BatchIterator", "DataError", "SKIP_REASONS")


def __getattr__(name):
    if name in _PIPELINE:
        return getattr(importlib.import_module("llava_jax.data.pipeline"), name)
    raise AttributeError(f"module 'llava_jax.data' has no attribute {name!r}")
