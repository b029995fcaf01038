"""A synthetic video file end to end: slow frames at the cuts, sizes, tokens, patch rows, positions.

The clip is 2 fps, so every frame is sampled (int(30/2*2) = 30) and timestamps are i * 0.5 s.
Scenes start at frames 0, 9, 16 and 24 (static, fading, static, fading), 224 x 320 pixels.
Budget: estimate(768) = 4*768 + 26*230 = 9052 tokens, under 65536, so the cap stays 768:
slow = smart_resize(224, 320, 28, 37632, 602112) = 224 x 308 (round(320/28 = 11.43) = 11 -> 308),
8 x 11 = 88 tokens; fast cap max(int(88*0.3) = 26 tokens, 48 tokens) = 37632 px:
beta = sqrt(71680/37632) = 1.38013 -> floor(5.80) = 5 -> 140, floor(8.28) = 8 -> 224, 5 x 8 = 40 tokens.
"""

from __future__ import annotations

import pytest
import torch

from megatron_keye.data.media.slowfast import classify_slow_fast, slow_frame_indices
from megatron_keye.data.media.synthetic_media import Scene, write_video
from megatron_keye.data.media.video import decode_video, decord_available
from megatron_keye.data.media.video_config import VideoConfig
from megatron_keye.data.media.video_pipeline import (
    load_video,
    video_pixel_values,
    video_placeholder_tokens,
)
from megatron_keye.data.text.templates import render_chat
from megatron_keye.data.text.tokenizer import KeyeTokenizer
from megatron_keye.data.text.vision_tokens import (
    expand_vision_placeholders,
    merge_thw,
    mrope_position_ids,
    video_token_ids,
)

SCENES = [
    Scene(num_frames=9, seed=21),
    Scene(num_frames=7, seed=22, motion="fade"),
    Scene(num_frames=8, seed=23),
    Scene(num_frames=6, seed=24, motion="fade"),
]
CUTS = [0, 9, 16, 24]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    info = write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", scenes=SCENES, fps=2)
    assert list(info.scene_starts) == CUTS and info.num_frames == 30
    return info


@pytest.fixture(scope="module")
def tokenizer():
    return KeyeTokenizer.default()


BACKENDS = ["pyav"] + (["decord"] if decord_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_slow_frames_are_the_cuts_and_sizes_follow_the_budget(clip, backend):
    sample = load_video(clip.path.read_bytes(), config=VideoConfig(backend=backend), key="clip")
    assert sample.num_frames == 30
    assert sample.timestamps.tolist() == [i * 0.5 for i in range(30)]
    assert slow_frame_indices(sample.frame_types) == CUTS
    assert (sample.num_slow, sample.num_fast) == (4, 26)
    budget = sample.budget
    assert budget.token_limit == 768
    assert (budget.slow_height, budget.slow_width, budget.slow_tokens) == (224, 308, 88)
    assert (budget.fast_height, budget.fast_width, budget.fast_tokens) == (140, 224, 40)
    assert sample.num_vision_tokens == 4 * 88 + 26 * 40
    grids = sample.frame_grids()
    assert grids[0].tolist() == [1, 16, 22] and grids[1].tolist() == [1, 10, 16]
    # Processor form: adjacent equal rows merged.
    assert merge_thw(grids).tolist() == [
        [1, 16, 22],
        [8, 10, 16],
        [1, 16, 22],
        [6, 10, 16],
        [1, 16, 22],
        [7, 10, 16],
        [1, 16, 22],
        [5, 10, 16],
    ]


@pytest.fixture(params=[1, 2], ids=["torch-1-thread", "torch-2-threads"])
def torch_threads(request):
    """load_video overlaps decoding and classification only with single-threaded torch."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_classifying_while_decoding_equals_classifying_decoded_frames(clip, backend, torch_threads):
    config = VideoConfig(backend=backend, similarity_chunk_frames=3)
    streamed = load_video(clip.path, config=config)
    decoded = decode_video(clip.path, config=config)
    assert torch.equal(streamed.frames, decoded.frames)
    assert torch.equal(streamed.frame_types, classify_slow_fast(decoded.frames, config=config))


def test_paper_threshold_keeps_the_cuts_on_this_clip(clip):
    sample = load_video(clip.path, config=VideoConfig.paper())
    assert slow_frame_indices(sample.frame_types) == CUTS


def test_patch_rows_per_frame(clip):
    sample = load_video(clip.path)
    pixels, grids = video_pixel_values(sample)
    assert pixels.shape == (4 * 16 * 22 + 26 * 10 * 16, 3, 14, 14)
    assert pixels.dtype == torch.float32 and pixels.min() >= -1.0 and pixels.max() <= 1.0
    # Independent of frame_grids(): slow frames (the cuts) are 224 x 308 px = 16 x 22 patches,
    # fast frames 140 x 224 px = 10 x 16 patches (module docstring).
    assert grids.tolist() == [[1, 16, 22] if i in CUTS else [1, 10, 16] for i in range(30)]
    # Frame 1 (fast) starts right after frame 0's 352 rows; both are the frames resized.
    frame1 = torch.nn.functional.interpolate(
        sample.frames[1:2], [140, 224], mode="bilinear", antialias=True
    )
    expected = (frame1[0, :, :14, :14].float() / 255 - 0.5) / 0.5
    assert torch.equal(pixels[352], expected)


def test_emitted_token_sequence(clip, tokenizer):
    sample = load_video(clip.path)
    ids = video_token_ids(
        sample.frame_grids(),
        fast=[not s for s in sample.is_slow()],
        timestamps=sample.timestamps,
        tokenizer=tokenizer,
    )
    text = "<|vision_start|>"
    for index in range(30):
        text += f"<|frame|>{index * 0.5:.1f}"
        if index in CUTS:
            text += "<|video_pad|>" * 88
        else:
            text += "<|fast_start|>" + "<|video_pad|>" * 40 + "<|fast_end|>"
    text += "<|vision_end|>"
    assert ids == tokenizer.encode(text)
    assert ids.count(tokenizer.vision.video_pad) == sample.num_vision_tokens
    assert ids.count(tokenizer.vision.frame) == 30
    assert ids.count(tokenizer.vision.fast_start) == ids.count(tokenizer.vision.fast_end) == 26


def test_chat_sample_tokens_and_positions(clip, tokenizer):
    sample = load_video(clip.path)
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "A cow runs."},
    ]
    frames = video_placeholder_tokens(sample, tokenizer)
    ids = expand_vision_placeholders(
        tokenizer.encode(render_chat(messages)), video_frames=[frames], ids=tokenizer.vision
    )
    positions = mrope_position_ids(
        ids, video_frame_grids=sample.frame_grids(), ids=tokenizer.vision
    )
    assert positions.shape == (3, len(ids))
    pads = torch.tensor(ids) == tokenizer.vision.video_pad
    # Text positions advance by one; each frame block adds max(h', w') (11 slow, 8 fast).
    text_tokens = len(ids) - int(pads.sum())
    assert int(positions.max()) + 1 == text_tokens + 4 * 11 + 26 * 8
    assert (positions[0][pads] == positions[0][pads].cummax(0).values).all()
