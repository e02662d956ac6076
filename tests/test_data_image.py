"""preprocess_image equals transformers' CLIPImageProcessor (PIL path) on real photographs, in
LLaVA's "pad" and "square" modes, and decodes awkward inputs."""

import io

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import ImageDecodeError, decode_image, expand_to_square, preprocess_image

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def processors():
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return {size: Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
            for size in (336, 224)}


def reference(processor, image):
    pixels = processor(image, return_tensors="np")["pixel_values"][0]  # [3, H, W]
    return pixels.transpose(1, 2, 0)


@pytest.mark.parametrize("size", [336, 224])
@pytest.mark.parametrize("photo", PHOTOS)
def test_parity_with_clip_image_processor(processors, size, photo):
    image = Image.fromarray(getattr(skimage_data, photo)())
    square = preprocess_image(image, size, "square")
    padded = preprocess_image(image, size, "pad")
    assert square.shape == padded.shape == (size, size, 3) and square.dtype == np.float32
    np.testing.assert_allclose(square, reference(processors[size], image), rtol=0, atol=1e-5)
    np.testing.assert_allclose(padded, reference(processors[size], expand_to_square(image)), rtol=0, atol=1e-5)
    if image.width != image.height:  # pad keeps the whole image: the two modes differ
        assert np.abs(square - padded).max() > 0.1


def test_pad_fills_with_the_clip_mean_colour():
    wide = Image.new("RGB", (60, 20), (255, 0, 0))
    square = expand_to_square(wide)
    assert square.size == (60, 60)
    assert square.getpixel((0, 0)) == (122, 116, 104) and square.getpixel((30, 30)) == (255, 0, 0)
    # After normalization the mean colour is ~0 in every channel.
    pixels = preprocess_image(wide, 30, "pad")
    assert np.abs(pixels[0, 0]).max() < 0.02 and pixels[15, 15, 0] > 1.5


def to_bytes(image, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_modes_are_converted_like_the_processor(processors):
    photo = Image.fromarray(skimage_data.chelsea())
    rgba = photo.convert("RGBA")
    alpha = np.zeros((photo.height, photo.width), np.uint8)
    alpha[:, : photo.width // 2] = 255
    rgba.putalpha(Image.fromarray(alpha))
    for image in (photo.convert("L"), rgba, photo.convert("P"), photo.convert("CMYK"),
                  photo.convert("P").convert("RGBA").convert("P")):
        decoded = decode_image(to_bytes(image, "JPEG" if image.mode == "CMYK" else "PNG"))
        assert decoded.mode == "RGB"
        ours = preprocess_image(decoded, 224, "square")
        theirs = reference(processors[224], Image.open(io.BytesIO(
            to_bytes(image, "JPEG" if image.mode == "CMYK" else "PNG"))))
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # Transparent pixels are composited onto white, as the processor does.
    assert decode_image(to_bytes(rgba)).getpixel((photo.width - 1, 0)) == (255, 255, 255)


def test_16_bit_grayscale_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    decoded = decode_image(to_bytes(Image.fromarray(ramp)))
    values = np.asarray(decoded)[..., 0]
    np.testing.assert_array_equal(values, np.round(ramp / 257.0).astype(np.uint8))
    assert values.min() == 0 and values.max() == 255 and len(np.unique(values)) > 200


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = to_bytes(image, "JPEG", exif=exif, quality=95)
    upright = decode_image(data)
    assert upright.size == (20, 40)
    red, green, blue = upright.getpixel((10, 2))  # the stripe is now at the top
    assert red > 200 and blue < 60
    assert decode_image(data, exif_transpose=False).size == (40, 20)


@pytest.mark.parametrize("data", [
    b"not an image at all",
    to_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200],  # truncated
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 50,  # corrupt
])
def test_undecodable_bytes_raise_image_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_bad_aspect_is_rejected():
    with pytest.raises(ValueError, match="aspect"):
        preprocess_image(Image.new("RGB", (8, 8)), 8, "anyres")
