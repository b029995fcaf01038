"""The SlowFast token budget, case by case, with the arithmetic worked out by hand.

Budget search (released config): lo = 48.0, hi = 768.0, estimate(t) = S*t + F*max(int(0.3 t), 48)
tokens; the search returns the FIRST t with estimate(t) > 65536 (768 if none), then
slow = smart_resize(H, W, 28, 37632, lo*784) and fast = smart_resize(H, W, 28, 37632,
max(int(slow_tokens*0.3)*784, 37632)).
"""

from __future__ import annotations

import pytest

from megatron_keye.data.media.video_budget import search_slow_token_limit, solve_video_budget
from megatron_keye.data.media.video_config import VideoConfig

# (num_slow, num_fast, height, width) -> (slow h, slow w, fast h, fast w, token limit)
RELEASED_CASES = [
    # Nothing exceeds: estimate(768) = 768 <= 65536, so lo climbs to 768.
    # slow: 728x1288 > 602112, beta = sqrt(921600/602112) = 1.23718 -> floor(20.78) = 20 -> 560,
    #       floor(36.95) = 36 -> 1008 (720 tokens); fast cap int(720*0.3) = 216 tokens:
    #       beta = sqrt(921600/169344) = 2.33285 -> floor(11.02) = 11 -> 308, floor(19.60) = 19 -> 532.
    ((1, 0, 720, 1280), (560, 1008, 308, 532, 768)),
    # Still nothing exceeds: estimate(768) = 768 + 119*230 = 28138.
    ((1, 119, 720, 1280), (560, 1008, 308, 532, 768)),
    # 100 slow: 100 t > 65536 first at t = 656. 896x896 = 802816 > 656*784 = 514304,
    # beta = sqrt(802816/514304) = 1.24939 -> floor(25.61) = 25 -> 700 (625 tokens);
    # fast cap int(625*0.3) = 187 tokens: beta = 2.34007 -> floor(13.67) = 13 -> 364.
    ((100, 0, 896, 896), (700, 700, 364, 364, 656)),
    # Exact fit, the off-by-one: 128*512 = 65536 does NOT exceed, so lo = 513, and a 756x532
    # frame (27 x 19 = 513 tokens, 402192 px = 513*784) keeps its size: 128*513 = 65664 tokens,
    # over the budget. fast cap int(513*0.3) = 153 tokens: beta = sqrt(402192/119952) = 1.83110
    # -> floor(14.75) = 14 -> 392, floor(10.38) = 10 -> 280.
    ((128, 0, 756, 532), (756, 532, 392, 280, 513)),
    # One slow frame fewer: 127 t > 65536 first at t = 517 (127*516 = 65532); same sizes.
    ((127, 0, 756, 532), (756, 532, 392, 280, 517)),
    # Fast frames at 30%: 10 t + 300 int(0.3 t): t = 656 -> 6560 + 300*196 = 65360 <= 65536,
    # t = 657 -> 6570 + 300*197 = 65670 > 65536, so lo = 657.
    # slow: beta = sqrt(921600/515088) = 1.33761 -> floor(19.22) = 19 -> 532, floor(34.18) = 34
    # -> 952 (646 tokens); fast cap int(646*0.3) = 193: beta = 2.46794 -> floor(10.42) = 10 -> 280,
    # floor(18.52) = 18 -> 504.
    ((10, 300, 720, 1280), (532, 952, 280, 504, 657)),
    # Fast frames at their 48-token floor: t + 1364*48 > 65536 first at t = 65.
    # slow: beta = sqrt(921600/50960) = 4.25262 -> floor(6.05) = 6 -> 168, floor(10.75) = 10 -> 280
    # (60 tokens); fast cap max(int(60*0.3) = 18, 48) = 48 tokens: beta = 4.94872 -> floor(5.20) = 5
    # -> 140, floor(9.24) = 9 -> 252 (45 tokens: the floor is on the cap, not the result).
    ((1, 1364, 720, 1280), (168, 280, 140, 252, 65)),
]


@pytest.mark.parametrize(("counts", "expected"), RELEASED_CASES)
def test_released_budget_table(counts, expected):
    num_slow, num_fast, height, width = counts
    budget = solve_video_budget(num_slow=num_slow, num_fast=num_fast, height=height, width=width)
    got = (budget.slow_height, budget.slow_width, budget.fast_height, budget.fast_width)
    assert got == expected[:4]
    assert budget.token_limit == expected[4]
    assert (
        search_slow_token_limit(num_slow=num_slow, num_fast=num_fast, config=VideoConfig())
        == expected[4]
    )


def test_token_counts_and_over_budget_exact_fit():
    budget = solve_video_budget(num_slow=128, num_fast=0, height=756, width=532)
    assert budget.slow_tokens == 27 * 19 == 513
    assert budget.fast_tokens == 14 * 10
    assert budget.total_tokens(num_slow=128, num_fast=0) == 65664 > 65536


def test_paper_budget_is_75000_tokens_with_its_own_exact_fit():
    # 10 t + 300 int(0.3 t): t = 750 -> 7500 + 67500 = 75000 exactly (not over), t = 751 -> 75010.
    # slow: beta = sqrt(921600/588784) = 1.25110 -> floor(20.55) = 20 -> 560, floor(36.54) = 36
    # -> 1008 (720 tokens); fast 216-token cap -> 308 x 532 (209 tokens).
    paper = VideoConfig.paper()
    budget = solve_video_budget(num_slow=10, num_fast=300, height=720, width=1280, config=paper)
    assert budget.token_limit == 751
    assert (budget.slow_height, budget.slow_width) == (560, 1008)
    assert (budget.fast_height, budget.fast_width) == (308, 532)
    assert budget.total_tokens(num_slow=10, num_fast=300) == 10 * 720 + 300 * 209


def test_configured_min_pixels_is_floored_at_48_tokens():
    # min_pixels 10 tokens is raised to 48 in the budget, as the reference does.
    low = VideoConfig(min_pixels=10 * 784)
    assert search_slow_token_limit(num_slow=1, num_fast=1364, config=low) == 65


def test_budget_needs_frames():
    with pytest.raises(ValueError, match="num_slow=0, num_fast=0"):
        solve_video_budget(num_slow=0, num_fast=0, height=10, width=10)


def test_config_presets_and_validation():
    released, paper = VideoConfig.released(), VideoConfig.paper()
    assert released.frame_similarity_threshold == 0.9 and released.total_tokens == 65536
    assert paper.frame_similarity_threshold == 0.95 and paper.total_tokens == 75000
    assert paper.patch_similarity_threshold == released.patch_similarity_threshold == 0.7
    assert VideoConfig.paper(fps=1.0).fps == 1.0
    with pytest.raises(ValueError, match="fast_token_ratio"):
        VideoConfig(fast_token_ratio=0.0)
    with pytest.raises(ValueError, match="backend"):
        VideoConfig(backend="opencv")
    with pytest.raises(ValueError, match="max_frames"):
        VideoConfig(max_frames=0)
    with pytest.raises(ValueError, match="min_pixels"):
        VideoConfig(min_pixels=1000 * 784)
    with pytest.raises(TypeError):
        VideoConfig(0.5)  # keyword-only
