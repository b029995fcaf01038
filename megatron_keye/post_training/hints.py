"""Progressive hints for RL prompts that fail every rollout (Keye-VL-1.5 §4).

A prompt whose G rollouts all fail is retried with a hint appended after the query, escalating
L1 concept → L2 strategy → L3 tool/formula → L4 first step → L5 full solution until some rollout
succeeds; the update then trains on the lowest level that succeeded (its rollouts, with the hint
in the prompt). Hints come with the data: a sample's `hints` is a list of up to five strings
(index 0 = L1) or a mapping {"L1": ..., ...}; a prompt without hints stays at level 0.

`HintTable` counts, per level, how many prompts were tried there and how many first succeeded
there (the shape of the paper's Table 9), and is part of the RL loop's checkpointed state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LEVEL_NAMES = ("none", "L1 concept", "L2 strategy", "L3 tool/formula", "L4 first step",
               "L5 full solution")
MAX_LEVEL = 5
HINT_PREFIX = "\nHint: "


def sample_hints(sample: Mapping[str, Any]) -> list[str]:
    """The sample's hints in level order (L1 first); [] when it has none."""
    hints = sample.get("hints")
    if not hints:
        return []
    if isinstance(hints, Mapping):
        levels = sorted(hints, key=lambda k: int(str(k).lstrip("Ll")))
        return [str(hints[k]) for k in levels][:MAX_LEVEL]
    if isinstance(hints, Sequence) and not isinstance(hints, str):
        return [str(h) for h in hints][:MAX_LEVEL]
    raise ValueError(f"hints: expected a list of strings or an L1..L5 mapping, got "
                     f"{type(hints).__name__}")


def hinted_query(query: str, hints: Sequence[str], level: int) -> str:
    """The query with the level-`level` hint appended (level 0: unchanged)."""
    if level == 0:
        return query
    if not 1 <= level <= len(hints):
        raise ValueError(f"hint level {level}: the sample has {len(hints)} hint(s)")
    return query + HINT_PREFIX + hints[level - 1]


@dataclass
class HintTable:
    """Per level: prompts tried at that level and prompts whose first success was there."""

    tried: list[int] = field(default_factory=lambda: [0] * (MAX_LEVEL + 1))
    solved: list[int] = field(default_factory=lambda: [0] * (MAX_LEVEL + 1))
    unsolved: int = 0  # prompts that failed at every available level

    def state_dict(self) -> dict:
        return {"tried": list(self.tried), "solved": list(self.solved), "unsolved": self.unsolved}

    def load_state_dict(self, state: Mapping) -> None:
        self.tried, self.solved = list(state["tried"]), list(state["solved"])
        self.unsolved = int(state["unsolved"])

    def format(self) -> str:
        lines = [f"{'hint level':<18} {'tried':>6} {'solved':>7} {'rate':>6}"]
        for level, name in enumerate(LEVEL_NAMES):
            tried, solved = self.tried[level], self.solved[level]
            rate = f"{solved / tried:.1%}" if tried else "-"
            lines.append(f"{name:<18} {tried:>6} {solved:>7} {rate:>6}")
        lines.append(f"{'unsolved':<18} {self.unsolved:>6}")
        return "\n".join(lines)


@dataclass(frozen=True)
class HintOutcome:
    """The level trained on (the lowest that succeeded, or the highest tried), its rollouts
    and their rewards; `solved` says whether any rollout at that level succeeded."""

    level: int
    query: str
    rollouts: list
    rewards: list[float]
    solved: bool


def progressive_rollouts(query: str, hints: Sequence[str], *,
                         rollout: Callable[[str], list], reward: Callable[[Any], float],
                         success: float = 1.0, table: HintTable | None = None) -> HintOutcome:
    """Roll out `query`, escalating through `hints` while every rollout's reward < `success`.

    `rollout(prompt)` returns the G rollouts of one prompt; `reward(rollout)` scores one.
    """
    outcome = None
    for level in range(0, len(hints) + 1):
        prompt = hinted_query(query, hints, level)
        samples = rollout(prompt)
        rewards = [float(reward(s)) for s in samples]
        solved = any(r >= success for r in rewards)
        if table is not None:
            table.tried[level] += 1
            if solved:
                table.solved[level] += 1
        outcome = HintOutcome(level=level, query=prompt, rollouts=samples, rewards=rewards,
                              solved=solved)
        if solved:
            return outcome
    if table is not None:
        table.unsolved += 1
    return outcome
