"""SlowFast classification: OpenCV-exact HSV, patch similarity semantics, latest-slow comparison."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from megatron_keye.data.media.color import rgb_to_hsv
from megatron_keye.data.media.image import resize_uint8
from megatron_keye.data.media.slowfast import (
    FAST,
    SLOW,
    classify_slow_fast,
    frame_similarity,
    similarity_size,
    slow_frame_indices,
)
from megatron_keye.data.media.synthetic_media import mosaic
from megatron_keye.data.media.video_config import VideoConfig


def opencv_rgb2hsv_scalar(r: int, g: int, b: int) -> tuple[int, int, int]:
    """OpenCV's 8-bit RGB2HSV (hrange 180) written out for one pixel, integers only.

    Tables: sdiv[i] = round((255 << 12) / i), hdiv[i] = round((180 << 12) / (6 i)), index 0 -> 0.
    """
    v = max(r, g, b)
    vmin = min(r, g, b)
    diff = v - vmin
    sdiv = round((255 << 12) / v) if v else 0
    hdiv = round((180 << 12) / (6 * diff)) if diff else 0
    s = (diff * sdiv + (1 << 11)) >> 12
    if v == r:
        h = g - b
    elif v == g:
        h = b - r + 2 * diff
    else:
        h = r - g + 4 * diff
    h = (h * hdiv + (1 << 11)) >> 12
    if h < 0:
        h += 180
    return h, s, v


def hsv_of(pixels: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    image = torch.tensor(pixels, dtype=torch.uint8).t().reshape(3, 1, -1)
    return [tuple(p) for p in rgb_to_hsv(image).reshape(3, -1).t().tolist()]


def test_hsv_hand_computed_pixels():
    cases = {
        (255, 0, 0): (0, 255, 255),  # red
        (0, 255, 0): (60, 255, 255),  # green: num = 2*255, hdiv[255] = 482 -> 60
        (0, 0, 255): (120, 255, 255),  # blue: num = 4*255 -> 120
        (255, 255, 255): (0, 0, 255),
        (0, 0, 0): (0, 0, 0),
        # v = 30 (blue), diff = 20: s = (20*34816 + 2048) >> 12 = 170 (170.5 floored);
        # num = 10 - 20 + 80 = 70, hdiv[20] = 6144: h = (70*6144 + 2048) >> 12 = 105.
        (10, 20, 30): (105, 170, 30),
        # v = 200 (red), diff = 150, num = g - b = -100: hdiv[150] = 819,
        # h = (-81900 + 2048) >> 12 = floor(-19.5) = -20 -> 160; s = (150*5222 + 2048) >> 12 = 191.
        (200, 50, 150): (160, 191, 200),
    }
    assert hsv_of(list(cases)) == list(cases.values())
    for rgb, hsv in cases.items():
        assert opencv_rgb2hsv_scalar(*rgb) == hsv


def test_hsv_matches_scalar_reference_on_lattice_ties_and_random_pixels():
    values = list(range(0, 256, 15)) + [1, 2, 127, 128, 254, 255]
    pixels = list(itertools.product(values, repeat=3))
    rng = random.Random(0)
    for _ in range(20000):
        a, b = rng.randrange(256), rng.randrange(256)
        pixels += [(a, a, b), (a, b, a), (b, a, a)]  # ties between the maximum channels
        pixels.append((rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    assert hsv_of(pixels) == [opencv_rgb2hsv_scalar(*p) for p in pixels]


def test_hsv_matches_opencv_on_every_colour():
    cv2 = pytest.importorskip("cv2", exc_type=ImportError)
    grid = np.stack(np.meshgrid(*(np.arange(256),) * 3, indexing="ij"), -1).astype(np.uint8)
    image = grid.reshape(4096, 4096, 3)
    expected = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    got = rgb_to_hsv(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


def test_hsv_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_hsv(torch.zeros(3, 4, 4))


# ---- similarity semantics on frames already at comparison size -------------------------------

CONFIG = VideoConfig()
SIZE = (224, 308)  # smart_resize(224, 308, 28, 48*784, 256*784): 8 x 11 = 88 patches of 28x28


def frame(seed: int) -> torch.Tensor:
    return torch.from_numpy(mosaic(*SIZE, seed=seed, cell=7)).permute(2, 0, 1).contiguous()


def replace_patches(base: torch.Tensor, other: torch.Tensor, patches: list[int]) -> torch.Tensor:
    out = base.clone()
    for p in patches:
        r, c = divmod(p, 11)
        out[:, r * 28 : r * 28 + 28, c * 28 : c * 28 + 28] = other[
            :, r * 28 : r * 28 + 28, c * 28 : c * 28 + 28
        ]
    return out


def black_patches(image: torch.Tensor, patches: list[int]) -> torch.Tensor:
    return replace_patches(image, torch.zeros_like(image), patches)


def test_comparison_frames_are_resized_on_uint8_as_the_released_code_does():
    """keye-vl-utils calls F.interpolate on the uint8 frames (torch's fixed-point uint8 kernel),
    so no float result is ever truncated; a float resize cast with astype(uint8) differs."""
    generator = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (2, 3, 90, 160), dtype=torch.uint8, generator=generator)
    ours = resize_uint8(frames, 56, 84)
    assert ours.dtype == torch.uint8
    assert torch.equal(
        ours, torch.nn.functional.interpolate(frames, [56, 84], mode="bilinear", antialias=True)
    )
    float_path = torch.nn.functional.interpolate(
        frames.float(), [56, 84], mode="bilinear", antialias=True
    )
    truncated = torch.from_numpy(float_path.numpy().astype(np.uint8))
    assert not torch.equal(ours, truncated)
    assert (ours.int() - truncated.int()).abs().max() <= 1


def test_similarity_size_is_at_most_256_tokens():
    assert similarity_size(224, 308, config=CONFIG) == SIZE
    # 720p: beta = sqrt(921600/200704) = 2.1429; floor(720/2.1429/28) = 12 -> 336, 21 -> 588.
    assert similarity_size(720, 1280, config=CONFIG) == (336, 588)


def test_identical_frames_are_fully_similar_and_unrelated_mosaics_are_not():
    a, b = frame(1), frame(2)
    assert frame_similarity(a, a) == 1.0
    assert frame_similarity(a, b) < 0.5


def test_similarity_is_share_of_similar_patches():
    a, b = frame(1), frame(2)
    dissimilar = [p for p in range(88) if frame_similarity(replace_patches(a, b, [p]), a) < 1.0]
    chosen = dissimilar[:7]
    assert len(chosen) == 7
    # 81 of 88 patches similar: the share is float32(81/88).
    got = frame_similarity(a, replace_patches(a, b, chosen))
    assert got == float(torch.tensor(81 / 88, dtype=torch.float32))


def test_patches_black_in_both_frames_are_ignored_and_all_black_is_nan():
    a, b = frame(1), frame(2)
    dark_a = black_patches(a, list(range(44)))
    dark_b = black_patches(replace_patches(a, b, list(range(44, 88))), list(range(44)))
    # The 44 patches black in both are ignored; the other 44 hold unrelated mosaics.
    assert frame_similarity(dark_a, dark_b) < 0.5
    black = torch.zeros_like(a)
    assert np.isnan(frame_similarity(black, black))
    # Black against a picture: every patch is kept (dark in one frame only) and dissimilar.
    assert frame_similarity(black, a) == 0.0


def classify_at_comparison_size(frames: list[torch.Tensor], **overrides) -> list[int]:
    return classify_slow_fast(torch.stack(frames), config=VideoConfig(**overrides)).tolist()


def test_first_frame_slow_and_cuts_slow():
    a, b, c = frame(1), frame(2), frame(3)
    assert classify_at_comparison_size([a, a, b, b, b, c, a]) == [
        SLOW,
        FAST,
        SLOW,
        FAST,
        FAST,
        SLOW,
        SLOW,
    ]


def test_comparison_is_with_latest_slow_frame_not_previous_frame():
    a, b = frame(1), frame(2)
    # Each step changes 6 more patches of a into b: every frame is 81+/88 similar to the previous
    # one, but the drift from the latest slow frame accumulates.
    order = [p for p in range(88) if frame_similarity(replace_patches(a, b, [p]), a) < 1.0]
    frames = [replace_patches(a, b, order[: 6 * k]) for k in range(6)]
    # vs slow frame 0: 0, 6, 12 changed -> 1.0, 82/88 = 0.93 (fast), 76/88 = 0.86 (slow);
    # then vs slow frame 2: 6, 12 changed -> fast, slow at frame 4; frame 5: 6 changed -> fast.
    assert classify_at_comparison_size(frames) == [SLOW, FAST, SLOW, FAST, SLOW, FAST]


def test_all_black_frames_are_fast_because_nan_is_not_below_threshold():
    black = torch.zeros(3, *SIZE, dtype=torch.uint8)
    assert classify_at_comparison_size([black, black, black]) == [SLOW, FAST, FAST]


def test_released_and_paper_thresholds_differ_between_90_and_95_percent():
    a, b = frame(1), frame(2)
    order = [p for p in range(88) if frame_similarity(replace_patches(a, b, [p]), a) < 1.0]
    changed = replace_patches(a, b, order[:7])  # 81/88 = 0.920
    assert classify_at_comparison_size([a, changed]) == [SLOW, FAST]
    paper = VideoConfig.paper()
    assert classify_slow_fast(torch.stack([a, changed]), config=paper).tolist() == [SLOW, SLOW]


def test_share_exactly_nine_tenths_is_slow_as_in_the_reference():
    """72/80 = 0.9 exactly, but the reference compares float32(0.9) = 0.89999998 with 0.9."""
    a, b = frame(1), frame(2)
    order = [p for p in range(88) if frame_similarity(replace_patches(a, b, [p]), a) < 1.0]
    dark = [p for p in range(88) if p not in order[:8]][:8]
    key = black_patches(a, dark)  # 8 patches black in both -> 80 kept
    changed = black_patches(replace_patches(a, b, order[:8]), dark)  # 8 of 80 dissimilar
    assert frame_similarity(key, changed) == float(torch.tensor(0.9, dtype=torch.float32))
    assert classify_at_comparison_size([key, changed]) == [SLOW, SLOW]


def reference_classification(frames: torch.Tensor, threshold: float) -> list[int]:
    """The released algorithm written plainly: one pair at a time, einops-style patch layout."""
    h, w = similarity_size(frames.shape[2], frames.shape[3], config=CONFIG)
    small = resize_uint8(frames, h, w)

    def sim(x: torch.Tensor, y: torch.Tensor) -> float:
        vectors = []
        for f in (x, y):
            hsv = rgb_to_hsv(f).float()
            v = (
                hsv.view(3, h // 28, 28, w // 28, 28)
                .permute(1, 3, 0, 2, 4)
                .reshape(h // 28, w // 28, -1)
            )
            vectors.append(v)
        n1 = torch.norm(vectors[0], p=2, dim=-1, keepdim=True) + 1e-8
        n2 = torch.norm(vectors[1], p=2, dim=-1, keepdim=True) + 1e-8
        cos = ((vectors[0] / n1) * (vectors[1] / n2)).sum(-1)
        keep = ~((n1.squeeze(-1) < 0.01) & (n2.squeeze(-1) < 0.01))
        return (cos[keep] > 0.7).float().mean().item()

    slow, key = [0], small[0]
    for i in range(1, frames.shape[0]):
        if sim(key, small[i]) < threshold:
            slow.append(i)
            key = small[i]
    types = [FAST] * frames.shape[0]
    for i in slow:
        types[i] = SLOW
    return types


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_classification_equals_plain_reference(chunk):
    """Full-size frames with cuts, fades, partial changes and noise; any chunking, same answer."""
    generator = torch.Generator().manual_seed(0)
    frames = []
    for k in range(20):
        base = torch.from_numpy(mosaic(120, 200, seed=k // 4, cell=10)).permute(2, 0, 1)
        noise = torch.randint(-40, 41, base.shape, generator=generator)
        if k % 4 == 3:
            base = (base.float() * 0.6).to(torch.uint8)
        frames.append((base.int() + noise * (k % 3 == 1)).clamp(0, 255).to(torch.uint8))
    video = torch.stack(frames)
    config = VideoConfig(similarity_chunk_frames=chunk)
    for threshold in (0.9, 0.95, 0.5):
        got = classify_slow_fast(
            video, config=config.with_overrides(frame_similarity_threshold=threshold)
        ).tolist()
        assert got == reference_classification(video, threshold)
        assert got[0] == SLOW


def test_classification_matches_keye_vl_utils():
    pytest.importorskip("cv2", exc_type=ImportError)
    pytest.importorskip("einops", exc_type=ImportError)
    from tests.unit.test_video_oracle import keye_vision_process

    vision_process = keye_vision_process()
    generator = torch.Generator().manual_seed(1)
    frames = []
    for k in range(24):
        base = torch.from_numpy(mosaic(180, 320, seed=k // 5, cell=12)).permute(2, 0, 1)
        noise = torch.randint(-60, 61, base.shape, generator=generator) * (k % 2)
        frames.append((base.int() + noise).clamp(0, 255).to(torch.uint8))
    video = torch.stack(frames)
    for threshold in (0.9, 0.95):
        expected = vision_process.extract_slow_fast_frames(video, threshold)
        got = classify_slow_fast(video, config=VideoConfig(frame_similarity_threshold=threshold))
        assert torch.equal(got, expected)


def test_slow_frame_indices():
    assert slow_frame_indices(torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.int32)) == [0, 3, 5]


def test_classify_rejects_float_frames():
    with pytest.raises(ValueError, match="uint8"):
        classify_slow_fast(torch.zeros(2, 3, 28, 28))
