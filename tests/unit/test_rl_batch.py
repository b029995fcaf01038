"""Rollouts → packed GSPO rows, minibatches and data-parallel shares; the prompt file; RFT's
selection (pure functions, no processes)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_keye.data.batch import (
    ADVANTAGES,
    LABELS,
    LOSS_WEIGHTS,
    OLD_LOGPROBS,
    PIXEL_VALUES,
    POSITION_IDS,
    SAMPLE_IDS,
    TOKENS,
    VISION_GRIDS,
)
from megatron_keye.post_training.generation import Prompt
from megatron_keye.post_training.rft import select
from megatron_keye.post_training.rl import read_prompt_file
from megatron_keye.post_training.rl_batch import (
    Rollout,
    local_microbatches,
    pack_rows,
    rollout_rows,
    split_minibatches,
)

IMAGE_PAD, VIDEO_PAD = 1900, 1901


def _rollout(prompt_len: int, response: list[int], *, seed: int, advantage: float,
             image: bool = False) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, 1000, (prompt_len,), generator=g)
    pixels = grids = None
    if image:  # one 2x2-patch image = one merged token
        tokens[1] = IMAGE_PAD
        pixels = torch.randn(4, 3, 14, 14, generator=g)
        grids = torch.tensor([[1, 2, 2]])
    positions = torch.arange(prompt_len).view(1, -1).repeat(3, 1) * 2  # not 0..L-1 on purpose
    prompt = Prompt(tokens=tokens, position_ids=positions, pixel_values=pixels,
                    vision_grids=grids)
    logprobs = (-torch.rand(len(response), generator=g)).tolist()
    return Rollout(prompt=prompt, response=response, logprobs=logprobs, prompt_index=seed,
                   advantage=advantage)


def test_rows_carry_labels_logprobs_and_advantages_on_response_tokens():
    a = _rollout(5, [100, 101, 102], seed=1, advantage=0.5, image=True)
    b = _rollout(4, [200, 201], seed=2, advantage=-1.5)
    c = _rollout(6, [300, 301, 302, 303], seed=3, advantage=2.0, image=True)
    batch = rollout_rows([a, b, c], seq_length=16, pad_id=0)
    assert batch[TOKENS].shape == (2, 16)  # a (8) + b (6) fit one row; c (10) opens another
    assert pack_rows([8, 6, 10], 16) == [[0, 1], [2]]
    for row, cursor, rollout in ((0, 0, a), (0, 8, b), (1, 0, c)):
        p, n = rollout.prompt.tokens.numel(), len(rollout.response)
        span = slice(cursor, cursor + p + n)
        full = torch.cat([rollout.prompt.tokens, torch.tensor(rollout.response)])
        assert torch.equal(batch[TOKENS][row, span], full)
        labels = batch[LABELS][row, span]
        weights = batch[LOSS_WEIGHTS][row, span]
        # label t predicts token t+1; only response tokens are trained
        assert (labels[: p - 1] == -100).all() and labels[-1] == -100
        assert labels[p - 1 : p + n - 1].tolist() == rollout.response
        assert weights.sum() == n and (weights[p - 1 : p + n - 1] == 1).all()
        old = batch[OLD_LOGPROBS][row, span][p - 1 : p + n - 1]
        assert torch.allclose(old, torch.tensor(rollout.logprobs))
        assert (batch[ADVANTAGES][row, span][weights > 0] == rollout.advantage).all()
        assert (batch[ADVANTAGES][row, span][weights == 0] == 0).all()
        # positions: the prompt's own ids, then the response after their max on all axes
        pos = batch[POSITION_IDS][:, row, span]
        assert torch.equal(pos[:, :p], rollout.prompt.position_ids)
        start = int(rollout.prompt.position_ids.max()) + 1
        assert (pos[:, p:] == torch.arange(start, start + n)).all()
    # packed row 0: sample ids 0, 1 and the tail padding 2; row 1 (one sample) pads as 1
    assert batch[SAMPLE_IDS][0].tolist() == [0] * 8 + [1] * 6 + [2] * 2
    assert batch[SAMPLE_IDS][1].tolist() == [0] * 10 + [1] * 6
    # media in row order: a's image, then c's
    assert torch.equal(batch[PIXEL_VALUES], torch.cat([a.prompt.pixel_values,
                                                       c.prompt.pixel_values]))
    assert batch[VISION_GRIDS].tolist() == [[1, 2, 2], [1, 2, 2]]


def test_minibatches_padded_for_data_ranks_and_shared_out():
    rollouts = [_rollout(5, [7] * (1 + i % 3), seed=i, advantage=float(i), image=i % 2 == 0)
                for i in range(10)]
    batches = split_minibatches(rollouts, minibatches=4, seq_length=8, pad_id=0, row_multiple=4)
    assert len(batches) == 4
    trained = 0
    for batch in batches:
        assert batch[TOKENS].shape[0] % 4 == 0
        trained += int((batch[LOSS_WEIGHTS] > 0).sum())
        shares = [local_microbatches(batch, dp_rank=r, dp_size=2, micro_batch=2,
                                     image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD)
                  for r in range(2)]
        rows = [mb[TOKENS] for share in shares for mb in share]
        assert torch.equal(torch.cat(rows), batch[TOKENS])
        pixels = [mb[PIXEL_VALUES] for share in shares for mb in share if PIXEL_VALUES in mb]
        if PIXEL_VALUES in batch:
            assert torch.equal(torch.cat(pixels), batch[PIXEL_VALUES])
    assert trained == sum(len(r.response) for r in rollouts)
    with pytest.raises(ValueError, match="do not fit"):
        rollout_rows([_rollout(7, [1, 2, 3], seed=0, advantage=0.0)], seq_length=8, pad_id=0)


def test_prompt_file_reads_records_and_names_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "answer": 4, "hints": ["add"],
                                "image": "img/a.png", "source": "math"}) + "\n\n"
                    + json.dumps({"question": "Colour?", "answer": "red"}) + "\n")
    first, second = read_prompt_file(str(path))
    assert first.sample["answer"] == "4" and first.hints == ["add"] and first.source == "math"
    assert first.images == [str(tmp_path / "img/a.png")]
    assert second.text == "Colour?" and second.source == "p" and second.hints == []
    path.write_text('{"prompt": "no answer"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: .*'answer'"):
        read_prompt_file(str(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: not JSON"):
        read_prompt_file(str(path))


def test_rft_selection_dedupes_and_picks_the_best():
    candidates = [{"text": "A  b", "reward": 1.0}, {"text": "wrong", "reward": 0.0},
                  {"text": "A b", "reward": 1.0}, {"text": "C", "reward": 1.5},
                  {"text": "  ", "reward": 2.0}]
    assert [c["text"] for c in select(candidates, mode="all", success=1.0)] == ["A  b", "C"]
    assert [c["text"] for c in select(candidates, mode="best", success=1.0)] == ["C"]
    assert select(candidates, mode="all", success=3.0) == []
