"""M-RoPE ids of a hand-worked layout, and the vision batch builder that carries them.

Layout: text, an image (grid 4x6 patches = 2x3 LLM tokens), text, a 3-frame video whose middle
frame is fast (slow 4x4, fast 2x2, slow 4x4 patches), text. The expected table is worked out by
hand from the spec (section 1.5): text advances t, h and w together; every image and every video
frame is a block (0, row, col) + next, after which next += max(rows, cols).
"""

from __future__ import annotations

import pytest
import torch

from megatron_keye.data.text.tokenizer import KeyeTokenizer
from megatron_keye.data.text.vision_tokens import (
    image_token_ids,
    mrope_position_ids,
    video_token_ids,
)
from megatron_keye.data.vision_batch import (
    IGNORE_INDEX,
    VisionMedia,
    VisionSample,
    build_vision_batch,
    one_per_row,
)

IMAGE_GRID = [1, 4, 6]
FRAME_GRIDS = [[1, 4, 4], [1, 2, 2], [1, 4, 4]]
FAST = [False, True, False]
TIMESTAMPS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def tokenizer():
    return KeyeTokenizer.default()


def layout_tokens(tokenizer) -> list[int]:
    ids = tokenizer.vision
    a, b, c, d = tokenizer.encode("Hi there. Ok")[:4]
    return [a, b, *image_token_ids(IMAGE_GRID, ids=ids), c,
            *video_token_ids(FRAME_GRIDS, fast=FAST, timestamps=TIMESTAMPS, tokenizer=tokenizer),
            d]


# (t, h, w) per token, written by hand. "ts" = a timestamp's text (3 tokens each: "0", ".", "0").
EXPECTED = [
    (0, 0, 0), (1, 1, 1),                         # text a, b
    (2, 2, 2),                                    # <|vision_start|>
    # image block at next = 3: 2 rows x 3 cols, t stays 3
    (3, 3, 3), (3, 3, 4), (3, 3, 5), (3, 4, 3), (3, 4, 4), (3, 4, 5),
    (6, 6, 6),                                    # <|vision_end|>  (next = 3 + max(2, 3))
    (7, 7, 7),                                    # text c
    (8, 8, 8),                                    # <|vision_start|>
    (9, 9, 9), (10, 10, 10), (11, 11, 11), (12, 12, 12),   # <|frame|> ts
    (13, 13, 13), (13, 13, 14), (13, 14, 13), (13, 14, 14),  # slow frame 2x2 at 13
    (15, 15, 15), (16, 16, 16), (17, 17, 17), (18, 18, 18),  # <|frame|> ts
    (19, 19, 19),                                 # <|fast_start|>
    (20, 20, 20),                                 # fast frame 1x1 at 20
    (21, 21, 21),                                 # <|fast_end|>
    (22, 22, 22), (23, 23, 23), (24, 24, 24), (25, 25, 25),  # <|frame|> ts
    (26, 26, 26), (26, 26, 27), (26, 27, 26), (26, 27, 27),  # slow frame 2x2 at 26
    (28, 28, 28),                                 # <|vision_end|>
    (29, 29, 29),                                 # text d
]


def test_timestamps_are_three_tokens(tokenizer):
    for ts in TIMESTAMPS:
        assert len(tokenizer.encode(format(ts, ".1f"))) == 3


def test_mrope_ids_match_hand_table(tokenizer):
    tokens = layout_tokens(tokenizer)
    assert len(tokens) == len(EXPECTED)
    ids = mrope_position_ids(tokens, image_grids=[IMAGE_GRID], video_frame_grids=FRAME_GRIDS,
                             ids=tokenizer.vision)
    assert ids.T.tolist() == [list(row) for row in EXPECTED]


def _media(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = VisionMedia.image(torch.randn(24, 3, 14, 14, generator=g), IMAGE_GRID)
    video = VisionMedia.video(torch.randn(16 + 4 + 16, 3, 14, 14, generator=g),
                              torch.tensor(FRAME_GRIDS))
    return image, video


def test_batch_builder_carries_the_table(tokenizer):
    tokens = layout_tokens(tokenizer)
    image, video = _media()
    sample = VisionSample(tokens=tokens, media=[image, video], key="layout")
    batch = build_vision_batch(one_per_row([sample, sample]), seq_length=48,
                               ids=tokenizer.vision, pad_id=tokenizer.pad_id)
    n = len(tokens)
    assert batch["position_ids"].shape == (3, 2, 48)
    assert batch["position_ids"][:, 0, :n].T.tolist() == [list(r) for r in EXPECTED]
    # Row padding continues the text positions after the last id (29).
    assert batch["position_ids"][0, 0, n:].tolist() == list(range(30, 30 + 48 - n))
    # Pixel rows and grids: image, then the three frames, per row.
    assert batch["vision_grids"].tolist() == [IMAGE_GRID, *FRAME_GRIDS] * 2
    assert torch.equal(batch["pixel_values"][:24], image.pixel_values)
    assert torch.equal(batch["pixel_values"][24:60], video.pixel_values)
    # Labels are the next token; pads are never targets; the last token and padding are ignored.
    labels, weights, toks = batch["labels"][0], batch["loss_weights"][0], batch["tokens"][0]
    pads = {tokenizer.vision.image_pad, tokenizer.vision.video_pad}
    for i in range(n - 1):
        counted = toks[i + 1].item() not in pads
        assert weights[i].item() == float(counted)
        assert labels[i].item() == (toks[i + 1].item() if counted else IGNORE_INDEX)
    assert (labels[n - 1 :] == IGNORE_INDEX).all() and (weights[n - 1 :] == 0).all()
    assert "sample_ids" not in batch


def test_packed_rows_restart_positions(tokenizer):
    tokens = layout_tokens(tokenizer)
    image, video = _media()
    text = VisionSample(tokens=tokenizer.encode("a b c"), key="text")
    full = VisionSample(tokens=tokens, media=[image, video], key="full")
    batch = build_vision_batch([[text, full]], seq_length=48, ids=tokenizer.vision,
                               pad_id=tokenizer.pad_id, sample_multiple=4)
    t = len(text.tokens)
    span = -(-t // 4) * 4
    ids = batch["sample_ids"][0]
    assert ids[:span].eq(0).all() and ids[span : span + len(tokens)].eq(1).all()
    assert batch["position_ids"][:, 0, span : span + len(tokens)].T.tolist() == [
        list(r) for r in EXPECTED]
    assert batch["position_ids"][0, 0, :t].tolist() == list(range(t))


def test_media_mismatch_names_the_sample(tokenizer):
    tokens = layout_tokens(tokenizer)
    image, video = _media()
    with pytest.raises(ValueError, match="'bad'"):
        build_vision_batch([[VisionSample(tokens=tokens, media=[image], key="bad")]],
                           seq_length=48, ids=tokenizer.vision, pad_id=tokenizer.pad_id)
    with pytest.raises(ValueError, match="'swapped'.*vision block 0"):
        build_vision_batch([[VisionSample(tokens=tokens, media=[video, image], key="swapped")]],
                           seq_length=48, ids=tokenizer.vision, pad_id=tokenizer.pad_id)
    with pytest.raises(ValueError, match="'long'.*do not fit"):
        build_vision_batch([[VisionSample(tokens=tokens, media=[image, video], key="long")]],
                           seq_length=32, ids=tokenizer.vision, pad_id=tokenizer.pad_id)
