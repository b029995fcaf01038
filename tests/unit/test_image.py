"""Images: smart_resize arithmetic, loading, normalization and patch-row order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_keye.data.media.image import (
    ImageConfig,
    load_image,
    normalize,
    patchify,
    preprocess_image,
    smart_resize,
)
from megatron_keye.data.media.synthetic_media import image_bytes, synthetic_image

# (height, width, min_pixels, max_pixels) -> (height, width), worked out by hand with factor 28.
SMART_RESIZE_CASES = [
    # round(224/28) = 8 -> 224; area 50176 inside [3136, 16056320].
    ((224, 224, 3136, 16056320), (224, 224)),
    # round(500/28 = 17.86) = 18 -> 504; round(375/28 = 13.39) = 13 -> 364.
    ((500, 375, 3136, 16056320), (504, 364)),
    # Python's round is half-to-even: 42/28 = 1.5 -> 2 -> 56 and 70/28 = 2.5 -> 2 -> 56.
    ((42, 70, 3136, 16056320), (56, 56)),
    # 1080p under 768 tokens: 1092 x 1932 = 2109744 > 602112, beta = sqrt(2073600/602112) = 1.85577;
    # floor(1080/1.85577/28 = 20.78) = 20 -> 560; floor(1920/1.85577/28 = 36.95) = 36 -> 1008.
    ((1080, 1920, 3136, 768 * 784), (560, 1008)),
    # Too small: 28 x 28 = 784 < 3136, beta = sqrt(3136/600) = 2.28619;
    # ceil(20*2.28619/28 = 1.63) = 2 -> 56; ceil(30*2.28619/28 = 2.45) = 3 -> 84.
    ((20, 30, 3136, 16056320), (56, 84)),
    # 720p at 48 tokens: beta = sqrt(921600/37632) = 4.94872;
    # floor(720/4.94872/28 = 5.20) = 5 -> 140; floor(1280/4.94872/28 = 9.24) = 9 -> 252.
    ((720, 1280, 37632, 37632), (140, 252)),
    # Aspect ratio exactly 200 is allowed: round(1/28) = 0 -> max(28, 0) = 28; round(200/28) = 7 -> 196.
    ((1, 200, 3136, 16056320), (28, 196)),
]


@pytest.mark.parametrize(("args", "expected"), SMART_RESIZE_CASES)
def test_smart_resize_table(args, expected):
    height, width, min_pixels, max_pixels = args
    got = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    assert got == expected
    assert got[0] % 28 == 0 and got[1] % 28 == 0


@pytest.mark.parametrize(("height", "width"), [(1, 201), (603, 3), (5000, 10)])
def test_smart_resize_refuses_extreme_aspect_ratio_naming_the_size(height, width):
    with pytest.raises(ValueError, match=f"{height}x{width}"):
        smart_resize(height, width)


def test_smart_resize_refuses_empty_size():
    with pytest.raises(ValueError, match="0x10"):
        smart_resize(0, 10)


def test_preprocess_image_names_the_key_on_extreme_aspect_ratio():
    image = np.zeros((2, 500, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"shard-3/key-9.*2x500"):
        preprocess_image(image, key="shard-3/key-9")


def test_load_image_sources_agree(tmp_path):
    array = synthetic_image(30, 50, seed=3)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    expected = torch.from_numpy(array).permute(2, 0, 1)
    for source in (path, str(path), path.read_bytes(), Image.fromarray(array), array, expected):
        got = load_image(source)
        assert got.dtype == torch.uint8 and got.shape == (3, 30, 50)
        assert torch.equal(got, expected)


def test_load_image_converts_grey_and_rgba_to_rgb():
    grey = Image.fromarray(np.full((4, 6), 77, dtype=np.uint8), mode="L")
    assert torch.equal(load_image(grey), torch.full((3, 4, 6), 77, dtype=torch.uint8))
    rgba = Image.fromarray(np.full((4, 6, 4), 200, dtype=np.uint8), mode="RGBA")
    assert load_image(rgba).shape == (3, 4, 6)


def test_load_image_bad_bytes_error_names_the_input(tmp_path):
    with pytest.raises(ValueError, match="bytes len=11"):
        load_image(b"not a jpeg!")
    with pytest.raises(ValueError, match="sample-42"):
        load_image(b"not a jpeg!", key="sample-42")
    truncated = image_bytes(synthetic_image(64, 64, seed=1), format="PNG")[:100]
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(truncated)
    with pytest.raises(ValueError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_normalize_maps_to_minus_one_one():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 1, 3)
    out = normalize(pixels, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.dtype == torch.float32
    # (0/255 - 0.5)/0.5 = -1, (51/255 - 0.5)/0.5 = -0.6, (255/255 - 0.5)/0.5 = 1
    assert torch.allclose(out[:, 0, 0], torch.tensor([-1.0, -0.6, 1.0]), atol=1e-6)
    custom = normalize(pixels, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert torch.allclose(custom[:, 0, 0], torch.tensor([0.0, 0.2, 1.0]), atol=1e-6)


def test_patch_rows_are_raster_order():
    pixels = torch.arange(2 * 3 * 28 * 42, dtype=torch.float32).view(2, 3, 28, 42)
    rows, grid = patchify(pixels, patch_size=14)
    assert grid == (2, 2, 3) and rows.shape == (12, 3, 14, 14)
    for t in range(2):
        for gh in range(2):
            for gw in range(3):
                row = rows[(t * 2 + gh) * 3 + gw]
                patch = pixels[t, :, gh * 14 : gh * 14 + 14, gw * 14 : gw * 14 + 14]
                assert torch.equal(row, patch)


def test_projector_merge_of_patch_rows_reassembles_28x28_blocks():
    """The projector's rearrange("(t h p1 w p2) d -> (t h w) (p1 p2 d)") on our rows."""
    image = torch.rand(3, 56, 84)
    rows, (t, gh, gw) = patchify(image, patch_size=14)
    h, w = gh // 2, gw // 2
    flat = rows.reshape(t * gh * gw, 3 * 14 * 14)
    merged = flat.view(t, h, 2, w, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(t * h * w, -1)
    for hi in range(h):
        for wi in range(w):
            token = merged[hi * w + wi].view(2, 2, 3, 14, 14)  # (p1, p2, c, y, x)
            block = token.permute(2, 0, 3, 1, 4).reshape(3, 28, 28)
            assert torch.equal(block, image[:, hi * 28 : hi * 28 + 28, wi * 28 : wi * 28 + 28])


def test_preprocess_image_end_to_end():
    array = synthetic_image(100, 150, seed=5)
    result = preprocess_image(image_bytes(array), config=ImageConfig())
    # round(100/28 = 3.57) = 4 -> 112; round(150/28 = 5.36) = 5 -> 140; 8 x 10 patches, 2x2 merge.
    assert result.grid_thw == (1, 8, 10)
    assert result.pixel_values.shape == (80, 3, 14, 14)
    assert result.num_tokens == 20
    assert result.pixel_values.min() >= -1.0 and result.pixel_values.max() <= 1.0
    # Already the right size: no resampling, rows are exactly the normalized pixels.
    exact = synthetic_image(112, 140, seed=5)
    rows = preprocess_image(exact).pixel_values
    expected = (torch.from_numpy(exact).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.equal(rows[0], expected[:, :14, :14])
    assert torch.equal(rows[10 + 1], expected[:, 14:28, 14:28])


def test_image_config_validates_fields():
    with pytest.raises(ValueError, match="min_pixels"):
        ImageConfig(min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ValueError, match="image_std"):
        ImageConfig(image_std=(0.5, 0.0, 0.5))


@pytest.mark.parametrize(
    ("height", "width"),
    [(100, 150), (20, 30), (33, 1300), (4500, 4000), (721, 1283)],  # round, up, wide, down, odd
)
def test_images_match_keye_vl_utils_fetch_image(tmp_path, height, width):
    """Same resized pixels as the released pipeline (fetch_image's PIL resize), then our rows."""
    from tests.unit.test_video_oracle import keye_vision_process

    vision_process = keye_vision_process()
    path = tmp_path / "image.png"
    Image.fromarray(synthetic_image(height, width, seed=height + width)).save(path)
    theirs = torch.from_numpy(np.asarray(vision_process.fetch_image({"image": str(path)})).copy())
    theirs = theirs.permute(2, 0, 1)
    ours = preprocess_image(str(path))
    _, gh, gw = ours.grid_thw
    assert tuple(theirs.shape[1:]) == (gh * 14, gw * 14)
    expected_rows = (theirs.float() / 255 - 0.5) / 0.5
    rows = ours.pixel_values.view(gh, gw, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(theirs.shape)
    assert torch.equal(rows, expected_rows)


def test_normalize_equals_transformers_rescale_then_normalize_on_every_value():
    """The HF image processors' arithmetic (x * 1/255 in float64, to float32, then (x - m) / s)."""
    from transformers.image_transforms import normalize as hf_normalize
    from transformers.image_transforms import rescale
    from transformers.image_utils import ChannelDimension

    last = ChannelDimension.LAST
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    values[..., 1] = values[..., 1][::-1]
    for mean, std in (((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.48, 0.46, 0.41), (0.27, 0.26, 0.28))):
        theirs = rescale(values, 1 / 255, data_format=last, input_data_format=last)
        theirs = hf_normalize(theirs, mean=mean, std=std, data_format=last, input_data_format=last)
        ours = normalize(torch.from_numpy(values).permute(2, 0, 1), mean=mean, std=std)
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), theirs)
