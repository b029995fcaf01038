"""Rewards for RL rollouts: rule-based verifiers, their weighted sum, and group advantages.

Verifiers score one response against one sample's reference and return a value in [0, 1]:
- `exact`: the final answer equals the reference after normalization (case, spaces, a trailing
  period, surrounding `$`), e.g. "Blue." == "blue".
- `numeric`: the final answer parses as a number (commas, `%`, fractions a/b) within an absolute
  or relative tolerance of the reference.
- `numeric_close`: partial credit for a numeric answer, so a weak policy sees a graded signal:
  the last number written in the final answer earns 1 - |got - reference| / range (at least 0;
  `range` per sample as `close_range`, default 10), halved when the final answer holds more than
  that number ("7 apples" earns half of "7"); 0 without a number.
- `choice`: the final answer names the same option letter (A-Z) as the reference: "(B)", "B.",
  "answer: b" all read as B.
- `format`: the response follows the mode it was asked for (spec §4): `think` = one
  `<think>…</think>` block followed by a non-empty answer; `no_think` = no think block;
  `auto` = either form, or `<analysis>…</analysis>` followed by an answer.
- `json`: the final answer (or a ```json fenced block) parses as JSON.
The final answer is the text after the think/analysis block, inside the last `\\boxed{…}` if
there is one, else after the last "answer:" marker, else the last non-empty line.

`combine` sums several verifiers with weights (`RewardSpec`), reporting each one, and
`group_advantages` turns the rewards of G rollouts per prompt into GSPO/GRPO advantages.
A model-based reward (the reward model's score) is added by the RL loop as another named term.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

THINK = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.S)
ANALYSIS = re.compile(r"^\s*<analysis>(.*?)</analysis>(.*)$", re.S)
BOXED = "\\boxed{"
ANSWER_MARK = re.compile(r"answer\s*(?:is)?\s*[:：]\s*", re.I)
CHOICE = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)\s]|$)")
FENCED_JSON = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def split_reasoning(response: str) -> tuple[str | None, str]:
    """(reasoning or None, what follows it) for `<think>` or `<analysis>` blocks."""
    for pattern in (THINK, ANALYSIS):
        match = pattern.match(response)
        if match:
            return match.group(1), match.group(2)
    return None, response


def _last_boxed(text: str) -> str | None:
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: no answer


def final_answer(response: str) -> str:
    """The response's final answer (see the module docstring); '' when there is none."""
    _, answer = split_reasoning(response)
    boxed = _last_boxed(answer)
    if boxed is not None:
        return boxed.strip()
    marks = list(ANSWER_MARK.finditer(answer))
    if marks:
        tail = answer[marks[-1].end():].strip()
        return tail.splitlines()[0].strip() if tail else ""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalize(text: str) -> str:
    text = text.strip().strip("$").strip()
    text = re.sub(r"\s+", " ", text).rstrip(".").strip()
    return text.lower()


def parse_number(text: str) -> float | None:
    """A number from an answer: 1,234.5 / -3 / 45% (0.45) / 3/4; None when it is not one."""
    text = normalize(text).replace(",", "").replace(" ", "")
    percent = text.endswith("%")
    text = text.rstrip("%")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        return None
    if not math.isfinite(value):
        return None
    return value / 100 if percent else value


def exact_reward(response: str, reference: str) -> float:
    return float(normalize(final_answer(response)) == normalize(reference))


def numeric_reward(response: str, reference: str, *, abs_tol: float = 1e-6,
                   rel_tol: float = 1e-4) -> float:
    got, want = parse_number(final_answer(response)), parse_number(reference)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol))


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def numeric_close_reward(response: str, reference: str, *, close_range: float = 10.0) -> float:
    """Partial credit for a numeric answer (module docstring); 0 when the reference is not a
    number or the final answer holds none."""
    if close_range <= 0:
        raise ValueError(f"numeric_close reward: close_range must be > 0, got {close_range}")
    want = parse_number(reference)
    answer = final_answer(response)
    alone = parse_number(answer)
    if want is None:
        return 0.0
    if alone is not None:
        got, share = alone, 1.0
    else:
        numbers = NUMBER.findall(answer.replace(",", ""))
        if not numbers:
            return 0.0
        got, share = float(numbers[-1]), 0.5
    return share * max(0.0, 1.0 - abs(got - want) / close_range)


def _choice_letter(text: str) -> str | None:
    match = CHOICE.match(text.strip())
    return match.group(1).upper() if match else None


def choice_reward(response: str, reference: str) -> float:
    got, want = _choice_letter(final_answer(response)), _choice_letter(reference)
    return float(got is not None and got == want)


def format_reward(response: str, mode: str) -> float:
    """1 if the response has the form of `mode` (think | no_think | auto)."""
    if mode not in ("think", "no_think", "auto"):
        raise ValueError(f"format reward: mode must be think|no_think|auto, got {mode!r}")
    stray = response.count("<think>") + response.count("</think>")
    reasoning, answer = split_reasoning(response)
    has_answer = bool(answer.strip())
    if mode == "think":
        return float(THINK.match(response) is not None and stray == 2 and has_answer
                     and bool(reasoning.strip()))
    if mode == "no_think":
        return float(stray == 0 and "<analysis>" not in response and has_answer)
    if reasoning is None:
        return float(stray == 0 and has_answer)
    return float(has_answer and (stray == 2 or (stray == 0 and bool(ANALYSIS.match(response)))))


def json_reward(response: str, reference: str | None = None) -> float:
    """1 if the answer (or its ```json block) is valid JSON (equal to `reference` if given)."""
    _, answer = split_reasoning(response)
    fenced = FENCED_JSON.findall(answer)
    text = fenced[-1] if fenced else answer
    try:
        value = json.loads(text.strip())
    except (ValueError, TypeError):
        return 0.0
    if reference is None:
        return 1.0
    try:
        return float(value == json.loads(reference))
    except ValueError:
        return 0.0


VERIFIERS: dict[str, Callable[[str, Mapping], float]] = {
    "exact": lambda r, s: exact_reward(r, s["answer"]),
    "numeric": lambda r, s: numeric_reward(r, s["answer"], abs_tol=s.get("abs_tol", 1e-6),
                                           rel_tol=s.get("rel_tol", 1e-4)),
    "numeric_close": lambda r, s: numeric_close_reward(r, s["answer"],
                                                       close_range=s.get("close_range", 10.0)),
    "choice": lambda r, s: choice_reward(r, s["answer"]),
    "format": lambda r, s: format_reward(r, s.get("mode", "auto")),
    "json": lambda r, s: json_reward(r, s.get("answer")),
}


@dataclass(kw_only=True, frozen=True)
class RewardSpec:
    """Which verifiers to sum and with what weights (e.g. {"exact": 1.0, "format": 0.1})."""

    weights: dict[str, float] = field(default_factory=lambda: {"exact": 1.0})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(VERIFIERS) - {"model"})
        if unknown:
            raise ValueError(f"rewards: unknown verifier(s) {unknown}; known: "
                             f"{sorted(VERIFIERS)} and 'model' (the reward model)")


def combine(response: str, sample: Mapping, spec: RewardSpec, *,
            model_score: float | None = None) -> tuple[float, dict[str, float]]:
    """(weighted reward, each term) of one response; `sample` holds the reference `answer` and
    options (`mode`, tolerances). The `model` term needs `model_score`."""
    terms = {}
    for name in spec.weights:
        if name == "model":
            if model_score is None:
                raise ValueError("rewards: the 'model' term needs the reward model's score")
            terms[name] = float(model_score)
        else:
            terms[name] = VERIFIERS[name](response, sample)
    return sum(spec.weights[n] * v for n, v in terms.items()), terms


def group_advantages(rewards: Sequence[float], *, std_floor: float = 1e-6,
                     scale: bool = True) -> list[float]:
    """GRPO/GSPO advantages of one prompt's G rollouts: (r - mean) / (std + floor), std the
    unbiased group std (a group of one gets advantage 0); `scale=False` leaves them centred
    only (Dr. GRPO)."""
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    if n == 1:
        return [0.0]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    return [(r - mean) / (std + std_floor) if scale else r - mean for r in rewards]
