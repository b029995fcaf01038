"""Generation with the KV cache against a no-cache recompute reference and across layouts.

Two spawned worlds: one rank runs every TP=1 case (a text model's greedy and sampled tokens and
log-probs vs the reference, seeds, stop tokens; a vision model's image prompt through the front
end vs the reference; its full HF export imported back generating the same tokens, and
transformers' Qwen3ForCausalLM.generate on the exported language model) and saves the vision
model's checkpoint; four ranks then load it through the CLI's rank function at TP=2×PP=2,
TP=1×PP=2×DP=2, TP=2×DP=2 and PP=2×VPP=2×DP=2 (text and image prompts).
"""

from __future__ import annotations

import pytest

from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers_generation import (
    SAMPLED,
    STEPS,
    layouts_worker,
    single_rank_worker,
)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    paths = {"checkpoint_dir": str(root / "checkpoint"), "hf_dir": str(root / "hf")}
    (result,) = run_workers(single_rank_worker, 1, timeout=600, threads=2, **paths)
    return {"paths": paths, **result}


def _same_rows(ours: dict, reference: dict) -> None:
    assert ours["tokens"] == reference["tokens"]
    for mine, theirs in zip(ours["logprobs"], reference["logprobs"], strict=True):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            assert abs(a - b) <= TOLERANCE * max(1.0, abs(b)), (mine, theirs)


def test_cached_greedy_equals_recompute(single):
    _same_rows(single["greedy"], single["greedy_ref"])
    assert all(len(t) == STEPS for t in single["greedy"]["tokens"])
    # padded vocabulary columns (2000..2047) are never chosen
    assert max(max(t) for t in single["greedy"]["tokens"]) < 2000


def test_cached_sampling_equals_recompute(single):
    _same_rows(single["sampled"], single["sampled_ref"])
    assert len(single["sampled"]["tokens"]) == 6  # 3 prompts x 2 samples


def test_lean_decode_is_bit_identical_to_the_modules(single):
    assert single["lean_unsupported"] is None  # the tiny model takes the lean step
    for name in ("greedy", "sampled", "vision_sampled"):
        lean, modules = single[name], single[f"{name}_modules"]
        assert lean["tokens"] == modules["tokens"] and lean["logprobs"] == modules["logprobs"]


def test_sampling_is_reproducible_and_seeded(single):
    assert single["sampled_again"]["tokens"] == single["sampled"]["tokens"]
    assert single["sampled_again"]["logprobs"] == single["sampled"]["logprobs"]
    other = single["sampled_other_seed"]["tokens"]
    assert all(a != b for a, b in zip(other, single["sampled"]["tokens"], strict=True))
    # the two samples of one prompt differ (their own streams)
    rows = single["sampled"]["tokens"]
    assert rows[0] != rows[1] and rows[2] != rows[3]


def test_stop_token_ends_a_sample(single):
    stop = single["stop_token"]
    for greedy, stopped, ended in zip(single["greedy"]["tokens"], single["stopped"]["tokens"],
                                      single["stopped"]["stopped"], strict=True):
        expected = greedy[: greedy.index(stop) + 1] if stop in greedy else greedy
        assert stopped == expected
        assert ended == (stop in greedy)
    # after the stop: padding and zero log-probs
    full = single["stopped"]["full"]
    length = len(single["stopped"]["tokens"][0])
    assert length < STEPS and (full[0, length:] == 0).all()


def test_vision_prompt_equals_recompute(single):
    _same_rows(single["vision"], single["vision_ref"])
    _same_rows(single["vision_sampled"], single["vision_sampled_ref"])


def test_exported_model_generates_the_same(single):
    assert single["vision_reimported"]["tokens"] == single["vision"]["tokens"]
    assert single["vl_text_reimported"]["tokens"] == single["vl_text"]["tokens"]
    assert single["transformers"] == single["vl_text"]["tokens"]


def test_cli_prints_the_generation(single):
    """`megatron-keye generate --image PNG --json` (one rank) gives the front end's tokens; it
    stops at the tokenizer's eos/pad tokens by default."""
    from megatron_keye.data.text.tokenizer import KeyeTokenizer

    tok = KeyeTokenizer.default()
    (record,) = single["cli"]
    expected = single["vision"]["tokens"][0]
    stops = [i for i, t in enumerate(expected) if t in (tok.eos_id, tok.pad_id)]
    expected = expected[: stops[0] + 1] if stops else expected
    assert record["tokens"] == expected
    assert record["text"] == tok.decode(expected)
    assert len(record["logprobs"]) == len(expected) and record["prompt"] == 0


def test_layouts_equal_tp1(single):
    paths = single["paths"]
    cases = [
        dict(name="tp2pp2", tensor=2, pipeline=2, vision=False),
        dict(name="tp2pp2_sampled", tensor=2, pipeline=2, vision=False, sampling=SAMPLED,
             samples=2),
        dict(name="tp2pp2_sampled_modules", tensor=2, pipeline=2, vision=False,
             sampling=SAMPLED, samples=2, modules=True),
        dict(name="tp1pp2dp2_sampled", tensor=1, pipeline=2, vision=False, sampling=SAMPLED,
             samples=2),
        dict(name="tp2pp2_vision", tensor=2, pipeline=2, vision=True),
        dict(name="tp2dp2_vision_sampled", tensor=2, pipeline=1, vision=True, sampling=SAMPLED),
        dict(name="pp2vpp2dp2_vision", tensor=1, pipeline=2, virtual_pipeline=2, vision=True),
    ]
    results = run_workers(layouts_worker, 4, timeout=600, cases=cases,
                          checkpoint_dir=paths["checkpoint_dir"])
    for rank, result in enumerate(results):  # every rank returns every row
        _same_rows(result["tp2pp2"], single["vl_text"])
        _same_rows(result["tp2pp2_sampled"], single["vl_text_sampled"])
        lean, modules = result["tp2pp2_sampled"], result["tp2pp2_sampled_modules"]
        assert lean["tokens"] == modules["tokens"] and lean["logprobs"] == modules["logprobs"]
        _same_rows(result["tp1pp2dp2_sampled"], single["vl_text_sampled"])
        _same_rows(result["tp2pp2_vision"], single["vision"])
        _same_rows(result["tp2dp2_vision_sampled"], single["vision_sampled"])
        _same_rows(result["pp2vpp2dp2_vision"], single["vision"])
        assert result.keys() == results[0].keys(), rank
