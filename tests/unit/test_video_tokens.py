"""Vision token layout, grids (merge_thw / split_thw), placeholder expansion and M-RoPE ids."""

from __future__ import annotations

import pytest
import torch

from megatron_keye.data.text.tokenizer import KeyeTokenizer, VisionTokenIds
from megatron_keye.data.text.vision_tokens import (
    expand_vision_placeholders,
    image_token_ids,
    merge_thw,
    mrope_position_ids,
    split_thw,
    video_frame_token_ids,
    video_token_ids,
)

# Made-up ids for hand-written sequences (the real ones come from the tokenizer by content).
IDS = VisionTokenIds(
    vision_start=900,
    vision_end=901,
    image_pad=902,
    video_pad=903,
    frame=904,
    fast_start=905,
    fast_end=906,
)


class CharTokenizer:
    """One token per character, ids 100 + ord(c) - ord('.') (enough for timestamps)."""

    vision = IDS

    def encode(self, text: str) -> list[int]:
        return [100 + ord(c) - ord(".") for c in text]


DOT, ZERO, FIVE, ONE = 100, 102, 107, 103  # ".", "0", "5", "1"


def test_merge_and_split_thw():
    frames = [[1, 34, 46]] + [[1, 18, 24]] * 59
    merged = merge_thw(frames)
    assert merged.tolist() == [[1, 34, 46], [59, 18, 24]]
    assert split_thw(merged).tolist() == frames
    # Only adjacent equal rows merge: slow, fast, slow stays three rows.
    assert merge_thw([[1, 8, 8], [1, 4, 4], [1, 8, 8]]).tolist() == [
        [1, 8, 8],
        [1, 4, 4],
        [1, 8, 8],
    ]
    assert split_thw(torch.empty(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match="positive"):
        merge_thw([[1, 0, 4]])


def test_image_tokens():
    # grid (1, 4, 6) patches -> 2 x 3 = 6 merged tokens.
    assert image_token_ids((1, 4, 6), ids=IDS) == [900] + [902] * 6 + [901]
    with pytest.raises(ValueError, match="merge size"):
        image_token_ids((1, 3, 4), ids=IDS)


def test_video_tokens_by_hand():
    grids = [[1, 4, 4], [1, 2, 4], [1, 4, 4]]
    ids = video_token_ids(
        grids, fast=[False, True, False], timestamps=[0.0, 0.5, 1.04], tokenizer=CharTokenizer()
    )
    expected = (
        [900]
        + [904, ZERO, DOT, ZERO]
        + [903] * 4  # slow frame at 0.0: 2 x 2 tokens
        + [904, ZERO, DOT, FIVE, 905]
        + [903] * 2
        + [906]  # fast frame at 0.5: 1 x 2 tokens
        + [904, ONE, DOT, ZERO]
        + [903] * 4  # slow frame, format(1.04, ".1f") = "1.0"
        + [901]
    )
    assert ids == expected
    # Without timestamps the text is left out.
    bare = video_frame_token_ids(
        grids[:1], fast=[False], timestamps=None, tokenizer=CharTokenizer()
    )
    assert bare == [904] + [903] * 4
    with pytest.raises(ValueError, match="2 frame types"):
        video_frame_token_ids(grids, fast=[False, True], timestamps=None, tokenizer=CharTokenizer())


def test_timestamps_are_formatted_like_the_reference():
    tokenizer = KeyeTokenizer.default()
    # format(x, ".1f") rounds the binary value: 0.25 -> "0.2", 0.35 -> "0.3" (0.34999...), 2.75 -> "2.8"
    for value, text in ((0.25, "0.2"), (0.35, "0.3"), (2.75, "2.8"), (12.0, "12.0")):
        ids = video_frame_token_ids(
            [[1, 2, 2]], fast=[False], timestamps=[value], tokenizer=tokenizer
        )
        assert tokenizer.decode(ids[1:-1]) == text


def test_expand_placeholders_of_a_rendered_chat():
    tokenizer = KeyeTokenizer.default()
    v = tokenizer.vision
    text = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and<|vision_start|>"
        "<|video_pad|><|vision_end|><|im_end|>"
    )
    frames = video_frame_token_ids(
        [[1, 2, 2], [1, 2, 2]], fast=[False, True], timestamps=[0.0, 0.5], tokenizer=tokenizer
    )
    expanded = expand_vision_placeholders(
        tokenizer.encode(text), image_grids=[(1, 4, 4)], video_frames=[frames], ids=v
    )
    assert expanded.count(v.image_pad) == 4
    assert expanded.count(v.video_pad) == 2
    assert tokenizer.decode(expanded) == (
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>and"
        "<|vision_start|><|frame|>0.0<|video_pad|><|frame|>0.5<|fast_start|><|video_pad|>"
        "<|fast_end|><|vision_end|><|im_end|>"
    )
    with pytest.raises(ValueError, match="1 image and 1 video placeholders for 2 images"):
        expand_vision_placeholders(
            tokenizer.encode(text), image_grids=[(1, 4, 4)] * 2, video_frames=[frames], ids=v
        )


def test_mrope_position_ids_by_hand():
    """text(2) + image 4x4 patches + text + a video with a slow 4x6 and a fast 2x4 frame."""
    tokens = (
        [1, 2, 900]
        + [902] * 4
        + [901, 3]  # "a b", image (2x2 merged), "x"
        + [900, 904, ZERO, DOT, ZERO]
        + [903] * 6  # slow frame at 0.0: 2 x 3 merged
        + [904, ZERO, DOT, FIVE, 905]
        + [903] * 2
        + [906, 901]  # fast frame at 0.5: 1 x 2
    )
    positions = mrope_position_ids(
        tokens, image_grids=[[1, 4, 4]], video_frame_grids=[[1, 4, 6], [1, 2, 4]], ids=IDS
    )
    t, h, w = positions.tolist()
    # text 0, 1, 2 (vision_start); image block at next = 3: t = 3, h = 3 + row, w = 3 + col;
    # next = 3 + max(2, 2) = 5: vision_end 5, "x" 6, vision_start 7, frame 8, "0.0" 9-11;
    # frame block at 12 (2 x 3): next = 12 + 3 = 15: frame 15, "0.5" 16-18, fast_start 19;
    # fast block at 20 (1 x 2): next = 22: fast_end 22, vision_end 23.
    assert t == [0, 1, 2, 3, 3, 3, 3, 5, 6, 7, 8, 9, 10, 11] + [12] * 6 + [15, 16, 17, 18, 19] + [
        20,
        20,
        22,
        23,
    ]
    assert h == [0, 1, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11] + [12, 12, 12, 13, 13, 13] + [
        15,
        16,
        17,
        18,
        19,
        20,
        20,
        22,
        23,
    ]
    assert w == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9, 10, 11] + [12, 13, 14, 12, 13, 14] + [
        15,
        16,
        17,
        18,
        19,
        20,
        21,
        22,
        23,
    ]
    assert positions.dtype == torch.int64 and positions.shape == (3, len(tokens))


def test_mrope_text_only_is_arange_and_mismatches_are_refused():
    assert mrope_position_ids([5, 6, 7], ids=IDS).tolist() == [[0, 1, 2]] * 3
    with pytest.raises(ValueError, match="expected 4 consecutive pads"):
        mrope_position_ids([902, 902, 902], image_grids=[[1, 4, 4]], ids=IDS)
    with pytest.raises(ValueError, match="more video frame pads"):
        mrope_position_ids([903], ids=IDS)
    with pytest.raises(ValueError, match="2 image grids given but the tokens hold 1"):
        mrope_position_ids([902], image_grids=[[1, 2, 2], [1, 2, 2]], ids=IDS)
