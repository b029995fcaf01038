"""Rule-based rewards on hand-written answers, malformed outputs included, and group advantages."""

from __future__ import annotations

import math

import pytest

from megatron_keye.post_training.rewards import (
    RewardSpec,
    choice_reward,
    combine,
    exact_reward,
    final_answer,
    format_reward,
    group_advantages,
    json_reward,
    numeric_close_reward,
    numeric_reward,
)


@pytest.mark.parametrize("response,answer", [
    ("The top is blue.", "The top is blue."),
    ("<think>top half looks blue</think>The answer is: Blue.", "blue"),
    ("so \\boxed{ Blue } is it", "blue"),
    ("reasoning\nmore\nAnswer: blue", "blue"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("line one\n\n  blue  \n", "blue"),
])
def test_final_answer_and_exact_match(response, answer):
    assert exact_reward(response, answer) == 1.0


@pytest.mark.parametrize("response,answer", [
    ("The top is red.", "The top is blue."),
    ("", "blue"),
    ("<think>blue</think>", "blue"),  # nothing after the thinking
    ("\\boxed{blue", "blue"),  # unbalanced box: the raw line is not 'blue'
    ("blue and red", "blue"),
])
def test_exact_rejects(response, answer):
    assert exact_reward(response, answer) == 0.0


@pytest.mark.parametrize("response,answer,expected", [
    ("Answer: 1,234.5", "1234.5", 1.0),
    ("\\boxed{3/4}", "0.75", 1.0),
    ("about 45%", "0.45", 0.0),  # the last line is 'about 45%': not a number
    ("45%", "0.45", 1.0),
    ("Answer: 12.00001", "12", 1.0),  # within rel 1e-4
    ("Answer: 12.01", "12", 0.0),
    ("Answer: twelve", "12", 0.0),
    ("Answer: 1/0", "12", 0.0),
    ("Answer: nan", "12", 0.0),
    ("Answer: -3", "-3", 1.0),
])
def test_numeric(response, answer, expected):
    assert numeric_reward(response, answer) == expected


@pytest.mark.parametrize("response,answer,expected", [
    ("7", "7", 1.0),
    ("Answer: 7.", "7", 1.0),
    ("5", "7", 0.8),  # alone, 2 away of a range of 10
    ("-3", "7", 0.0),  # 10 away: nothing left
    ("42", "7", 0.0),  # never negative
    ("it is 7 bands", "7", 0.5),  # right, with other words: half
    ("3 or 6 bands", "7", 0.45),  # the last number counts
    ("1,234 apples", "1234", 0.5),
    ("\\boxed{3/4}", "0.75", 1.0),
    ("seven", "7", 0.0),  # no digits
    ("", "7", 0.0),
    ("<think>7</think>", "7", 0.0),  # nothing after the thinking
    ("7\nthe end", "7", 0.0),  # the last line is the answer
    ("7", "blue", 0.0),  # a non-numeric reference gives no credit
])
def test_numeric_close(response, answer, expected):
    assert numeric_close_reward(response, answer) == pytest.approx(expected)


def test_numeric_close_range_comes_with_the_sample():
    spec = RewardSpec(weights={"numeric_close": 1.0})
    assert combine("4", {"answer": "2", "close_range": 4}, spec)[0] == pytest.approx(0.5)
    assert combine("4", {"answer": "2"}, spec)[0] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="close_range"):
        numeric_close_reward("4", "2", close_range=0)


@pytest.mark.parametrize("response,answer,expected", [
    ("(B)", "B", 1.0), ("Answer: b. because", "B", 1.0), ("B) blue", "(b)", 1.0),
    ("\\boxed{C}", "B", 0.0), ("Both", "B", 0.0), ("", "B", 0.0),
])
def test_choice(response, answer, expected):
    assert choice_reward(response, answer) == expected


@pytest.mark.parametrize("response,mode,expected", [
    ("<think>look at the top</think>Blue.", "think", 1.0),
    ("Blue.", "think", 0.0),
    ("<think></think>Blue.", "think", 0.0),  # empty thinking
    ("<think>a</think><think>b</think>Blue.", "think", 0.0),
    ("<think>unclosed Blue.", "think", 0.0),
    ("Blue.", "no_think", 1.0),
    ("<think>x</think>Blue.", "no_think", 0.0),
    ("<analysis>easy. /no_think mode is more appropriate.</analysis>Blue.", "auto", 1.0),
    ("<think>x</think>Blue.", "auto", 1.0),
    ("Blue.", "auto", 1.0),
    ("<think>x</think>", "auto", 0.0),
    ("</think>Blue.", "auto", 0.0),
])
def test_format(response, mode, expected):
    assert format_reward(response, mode) == expected


def test_format_mode_is_checked():
    with pytest.raises(ValueError, match="mode"):
        format_reward("x", "thinking")


@pytest.mark.parametrize("response,reference,expected", [
    ('{"colour": "blue"}', None, 1.0),
    ('```json\n{"colour": "blue"}\n```', '{"colour": "blue"}', 1.0),
    ('{"colour": "red"}', '{"colour": "blue"}', 0.0),
    ('{"colour": blue}', None, 0.0),
    ("", None, 0.0),
])
def test_json(response, reference, expected):
    assert json_reward(response, reference) == expected


def test_weighted_sum_reports_every_term():
    spec = RewardSpec(weights={"exact": 1.0, "format": 0.25, "model": 0.5})
    total, terms = combine("<think>t</think>Blue.", {"answer": "blue", "mode": "think"}, spec,
                           model_score=0.4)
    assert terms == {"exact": 1.0, "format": 1.0, "model": 0.4}
    assert total == pytest.approx(1.0 + 0.25 + 0.2)
    with pytest.raises(ValueError, match="model"):
        combine("Blue.", {"answer": "blue"}, spec)
    with pytest.raises(ValueError, match="unknown verifier"):
        RewardSpec(weights={"exactly": 1.0})


def test_group_advantages():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    std = math.sqrt(1 / 3)
    assert adv == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], rel=1e-5)
    assert group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]  # all equal: no signal
    assert group_advantages([0.7]) == [0.0]  # a group of one
    assert group_advantages([2.0, 0.0], scale=False) == [1.0, -1.0]
    assert final_answer("x\nAnswer:") == ""
