"""Progressive hints: escalate only while every rollout fails, train at the lowest level that
succeeded, and count the per-level table."""

from __future__ import annotations

import pytest

from megatron_keye.post_training.hints import (
    HintTable,
    hinted_query,
    progressive_rollouts,
    sample_hints,
)

HINTS = ["think about colours", "look at the top half", "compare with the palette",
         "the top half is mostly one colour", "the answer is blue"]


def planted_rollout(prompt: str) -> list[str]:
    """A planted prompt: fails without hints, succeeds once the L3 hint is in the prompt."""
    solved = "compare with the palette" in prompt or "mostly one colour" in prompt
    return ["blue" if solved else "red"] * 2 + ["green"] * 2


def test_planted_prompt_is_trained_at_level_3():
    table = HintTable()
    outcome = progressive_rollouts("What colour is the top?", HINTS, rollout=planted_rollout,
                                   reward=lambda s: float(s == "blue"), table=table)
    assert outcome.level == 3 and outcome.solved
    assert outcome.query == "What colour is the top?\nHint: compare with the palette"
    assert outcome.rewards == [1.0, 1.0, 0.0, 0.0]
    assert table.tried == [1, 1, 1, 1, 0, 0]
    assert table.solved == [0, 0, 0, 1, 0, 0]
    assert "L3 tool/formula" in table.format()


def test_solved_prompts_never_escalate_and_hopeless_ones_are_counted():
    table = HintTable()
    easy = progressive_rollouts("q", HINTS, rollout=lambda p: ["blue"],
                                reward=lambda s: float(s == "blue"), table=table)
    assert easy.level == 0
    hopeless = progressive_rollouts("q", HINTS, rollout=lambda p: ["red"],
                                    reward=lambda s: float(s == "blue"), table=table)
    assert hopeless.level == 5 and not hopeless.solved
    assert table.unsolved == 1 and table.tried[0] == 2 and table.solved[0] == 1
    restored = HintTable()
    restored.load_state_dict(table.state_dict())
    assert restored == table


def test_hint_formats_and_errors():
    assert sample_hints({"hints": {"L2": "b", "L1": "a"}}) == ["a", "b"]
    assert sample_hints({"hints": HINTS + ["extra"]}) == HINTS
    assert sample_hints({}) == []
    assert hinted_query("q", HINTS, 0) == "q"
    with pytest.raises(ValueError, match="hint level 2"):
        hinted_query("q", ["only one"], 2)
    with pytest.raises(ValueError, match="hints"):
        sample_hints({"hints": 3})
