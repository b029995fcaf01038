"""The text loader: deterministic, split by data-parallel rank, resumable from its position."""

from __future__ import annotations

import pytest
import torch

from megatron_keye.data.text.text_dataset import (
    TextBatchLoader,
    TokenSequenceDataset,
    make_text_batch,
)


def dataset(n_tokens=1000, seq=16, shuffle=True):
    return TokenSequenceDataset(torch.arange(n_tokens), seq_length=seq, seed=5, shuffle=shuffle)


def rows_of(loader, steps):
    out = []
    for _ in range(steps):
        out.append(torch.cat([mb["tokens"] for mb in loader.next_step()]))
    return out


def test_samples_are_shifted_windows():
    ds = dataset(shuffle=False)
    batch = make_text_batch(torch.stack([ds.sample(0), ds.sample(3)]))
    assert batch["tokens"][1].tolist() == list(range(48, 64))
    assert batch["labels"][1].tolist() == list(range(49, 65))
    assert batch["position_ids"].shape == (3, 2, 16)
    assert torch.equal(batch["position_ids"][0], batch["position_ids"][2])


def test_data_parallel_ranks_partition_each_global_batch():
    one = TextBatchLoader(dataset(), global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1)
    two = [TextBatchLoader(dataset(), global_batch_size=8, micro_batch_size=2, dp_rank=r,
                           dp_size=2) for r in range(2)]
    for step in range(3):
        (full,) = rows_of(one, 1)
        parts = torch.cat([rows_of(loader, 1)[0] for loader in two])
        assert sorted(map(tuple, full.tolist())) == sorted(map(tuple, parts.tolist())), step


def test_resume_continues_with_the_next_samples():
    a = TextBatchLoader(dataset(), global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1)
    expected = rows_of(a, 5)
    b = TextBatchLoader(dataset(), global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1)
    rows_of(b, 2)
    state = b.state_dict()
    c = TextBatchLoader(dataset(), global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1)
    c.load_state_dict(state)
    for got, want in zip(rows_of(c, 3), expected[2:]):
        assert torch.equal(got, want)


def test_epochs_reshuffle_and_cover_every_sample():
    ds = dataset(n_tokens=161, seq=16)  # 10 samples
    first = [tuple(ds.sample(i).tolist()) for i in range(10)]
    second = [tuple(ds.sample(i).tolist()) for i in range(10, 20)]
    assert sorted(first) == sorted(second) and first != second


def test_too_small_corpus_is_refused():
    with pytest.raises(ValueError, match="data.seq_length"):
        TokenSequenceDataset(torch.arange(10), seq_length=16, seed=0)
