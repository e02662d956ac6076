"""data/processor.py for flat (one-tile) models: equal to transformers' LlavaProcessor with
CLIPImageProcessor, LlavaImageProcessor (pad to square) and SiglipImageProcessor (PIL backend)
on real photographs; the batch feeds the model and generate; errors name what is wrong."""

import numpy as np
import pytest
import skimage.data
import transformers
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from llava_jax import generate, load_pretrained
from llava_jax.checkpoint import save_model
from llava_jax.data.processor import ImageProcessor, Processor, ProcessorError
from llava_jax.data.testing import build_test_tokenizer
from llava_jax.models import create_model
from llava_jax.models.config import LlavaConfig, TextConfig, VisionConfig

TOKENIZER = build_test_tokenizer()
TEXT = TextConfig(vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=96, num_layers=1,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=512)
CLIP = VisionConfig(hidden_size=48, intermediate_size=80, num_layers=1, num_heads=3,
                    image_size=28, patch_size=7)
SIGLIP = VisionConfig(model_type="siglip_vision_model", hidden_size=48, intermediate_size=80,
                      num_layers=1, num_heads=3, image_size=30, patch_size=7,
                      layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", use_head=False)
PHOTOS = [Image.fromarray(load()) for load in (skimage.data.astronaut, skimage.data.chelsea,
                                               skimage.data.coffee)]
TEXTS = ["USER: <image>\nWhat is in the image? ASSISTANT:", "<image> and <image>: which?",
         "No image in this one."]
ROWS = [[PHOTOS[0]], [PHOTOS[1], PHOTOS[2]], []]


def model_config(vision, **changes):
    return LlavaConfig(vision=vision, text=TEXT, pad_token_id=TOKENIZER.pad_token_id,
                       image_token_index=TOKENIZER.convert_tokens_to_ids("<image>"), **changes)


CASES = {
    "clip": (model_config(CLIP), CLIPImageProcessorPil(size={"shortest_edge": 28},
                                                       crop_size={"height": 28, "width": 28})),
    "clip-pad": (model_config(CLIP), LlavaImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_pad=True)),
    "siglip": (model_config(SIGLIP, vision_feature_layer=-1,
                            vision_feature_select_strategy="cls_patch"),
               SiglipImageProcessorPil(size={"height": 30, "width": 30})),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_transformers_llava_processor(name):
    config, images = CASES[name]
    ours = Processor(config, TOKENIZER, ImageProcessor.from_dict(images.to_dict()))
    reference = transformers.LlavaProcessor(
        image_processor=images, tokenizer=TOKENIZER, patch_size=config.vision.patch_size,
        vision_feature_select_strategy="default" if config.vision_feature_select_strategy
        == "patch" else "full", num_additional_image_tokens=int(config.vision.has_class_token))
    batch = ours(text=TEXTS, images=ROWS)
    theirs = reference(text=TEXTS, images=[p for row in ROWS for p in row], padding=True,
                       return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], theirs["attention_mask"])
    assert batch["image_mask"].tolist() == [[True, False], [True, True], [False, False]]
    ours_pixels = batch["pixel_values"][batch["image_mask"]].transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours_pixels, theirs["pixel_values"], atol=1e-5, rtol=0)
    assert not batch["pixel_values"][~batch["image_mask"]].any()


def test_loaded_processor_feeds_the_model_and_generate(tmp_path):
    """A model directory without preprocessor_config.json: the defaults of its config (CLIP:
    shortest-edge resize + center crop) stand in."""
    config = CASES["clip"][0]
    path = save_model(create_model(config, seed=0), tmp_path / "m", tokenizer=TOKENIZER)
    loaded = load_pretrained(path)
    batch = loaded.processor(text=TEXTS, images=ROWS)
    expected = Processor(config, TOKENIZER, ImageProcessor.from_dict(CASES["clip"][1].to_dict()))(
        text=TEXTS, images=ROWS)
    np.testing.assert_array_equal(batch["pixel_values"], expected["pixel_values"])
    logits = np.asarray(loaded.model(**batch))
    assert logits.shape == (*batch["input_ids"].shape, config.text.vocab_size)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    tokens = generate(loaded.model, **batch, max_new_tokens=4)
    assert tokens.shape[0] == 3
    # Text only: no pixel inputs at all.
    assert set(loaded.processor(text="just text")) == {"input_ids", "attention_mask"}


def test_errors_name_the_problem():
    config, images = CASES["clip"]
    processor = Processor(config, TOKENIZER, ImageProcessor.from_dict(images.to_dict()))
    with pytest.raises(ProcessorError, match="1 <image> markers but 2 images"):
        processor(text=["<image> x"], images=[[PHOTOS[0], PHOTOS[1]]])
    with pytest.raises(ProcessorError, match="image_processor_type"):
        ImageProcessor.from_dict({"image_processor_type": "Idefics3ImageProcessor"})
    with pytest.raises(ProcessorError, match="size"):
        ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor",
                                  "size": {"longest_edge": 30}})
    with pytest.raises(ProcessorError, match="image_token_index"):
        Processor(config.replace(image_token_index=5), TOKENIZER)
    siglip_images = ImageProcessor.from_dict(CASES["siglip"][1].to_dict())
    with pytest.raises(ProcessorError, match="vision tower takes 28x28"):
        Processor(config, TOKENIZER, siglip_images)(text="<image>", images=[[PHOTOS[0]]])
