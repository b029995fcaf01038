"""The shard loader's order: every sample once per epoch across DP ranks and workers, identical
batches for peers of one DP rank, exact resume (same and different DP size, other worker
counts), and the blend of three sources."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from megatron_keye.config.loading import config_from_dict
from megatron_keye.data.shards.loader import build_shard_loader, merge_states
from tests.unit.shard_corpora import text_corpus


def make_config(sources, *, seq_length=128, workers=0, streams=4, gbs=8, mbs=2, buffer=4,
                **data):
    return config_from_dict({
        "model": {"flavor": "tiny"},
        "schedule": {"global_batch_size": gbs, "micro_batch_size": mbs},
        "data": {"kind": "shards", "seq_length": seq_length, "num_workers": workers,
                 "num_streams": streams, "shuffle_buffer": buffer,
                 "sources": [{"path": str(p), "weight": w} for p, w in sources], **data},
    })


def loaders(config, dp_size):
    return [build_shard_loader(config, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]


def global_rows(ranks, steps):
    """Run `steps` steps on every DP rank; rows (dict of 1-D tensors + sample keys) in global
    row order j = rank + dp * local_row."""
    dp = len(ranks)
    per_rank = []
    for loader in ranks:
        rows = []
        for _ in range(steps):
            for batch in loader.next_step():
                for b in range(batch["tokens"].shape[0]):
                    rows.append({name: batch[name][b] for name in ("tokens", "labels",
                                                                   "loss_weights", "sample_ids")}
                                | {"position_ids": batch["position_ids"][:, b]})
        per_rank.append(rows)
    return [per_rank[r][i] for i in range(len(per_rank[0])) for r in range(dp)]


def assert_rows_equal(got, want):
    assert len(got) == len(want)
    for j, (a, b) in enumerate(zip(got, want, strict=True)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"row {j} field {name} differs"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("text"), "docs", 60, per_shard=7)


def test_every_sample_once_per_epoch_across_dp_ranks_and_workers(corpus):
    config = make_config([(corpus, 1.0)], workers=2, streams=4)
    seen = Counter()
    for loader in loaders(config, 2):
        for _ in range(12):
            loader.next_step()
            seen.update((key, epoch) for _, key, epoch in loader.last_step_samples)
        loader.close()
    epoch0 = {key: n for (key, epoch), n in seen.items() if epoch == 0}
    assert len(epoch0) == 60, f"{60 - len(epoch0)} samples of epoch 0 never came"
    assert set(epoch0.values()) == {1}, "a sample came twice in one epoch"
    assert max(epoch for _, epoch in seen) >= 2  # the loop really ran past epoch 0
    for (key, epoch), n in seen.items():
        assert n == 1, f"{key} came {n} times in epoch {epoch}"


def test_peers_of_one_dp_rank_get_identical_batches(corpus):
    config = make_config([(corpus, 1.0)], workers=2, streams=4)
    first, second = (build_shard_loader(config, dp_rank=1, dp_size=2) for _ in range(2))
    other = build_shard_loader(config, dp_rank=0, dp_size=2)
    for _ in range(3):
        a, b, c = first.next_step(), second.next_step(), other.next_step()
        for x, y in zip(a, b, strict=True):
            assert x.keys() == y.keys()
            for name in x:
                assert torch.equal(x[name], y[name]), name
        assert not all(torch.equal(x["tokens"], z["tokens"]) for x, z in zip(a, c, strict=True))
    for loader in (first, second, other):
        loader.close()


def test_resume_equals_uninterrupted_run_batch_for_batch(corpus):
    config = make_config([(corpus, 1.0)], workers=2, streams=4, gbs=4, mbs=2)
    (reference,) = loaders(config, 1)
    want = [reference.next_step() for _ in range(6)]
    reference.close()
    (first,) = loaders(config, 1)
    got = [first.next_step() for _ in range(3)]
    state = first.state_dict()
    first.close()
    # Resume with another worker count: the order does not depend on it.
    (resumed,) = loaders(make_config([(corpus, 1.0)], workers=1, streams=4, gbs=4, mbs=2), 1)
    resumed.load_state_dict(state)
    got += [resumed.next_step() for _ in range(3)]
    resumed.close()
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for x, y in zip(g, w, strict=True):
            for name in y:
                assert torch.equal(x[name], y[name]), f"step {step}: {name}"


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_dp_size_continues_the_global_order(corpus, before, after):
    config = make_config([(corpus, 1.0)], workers=0, streams=4, gbs=4, mbs=1)
    want = global_rows(loaders(config, 1), 6)
    first = loaders(config, before)
    got = global_rows(first, 3)
    state = merge_states([loader.local_state_dict() for loader in first])
    second = loaders(config, after)
    for loader in second:
        loader.load_state_dict(state)
    got += global_rows(second, 3)
    assert_rows_equal(got, want)


def test_blend_of_three_sources_follows_the_weights(tmp_path):
    weights = {"video": 24, "image": 50, "text": 26}
    sources = [(text_corpus(tmp_path / name, name, 150, per_shard=25, seed=i, max_words=6), w)
               for i, (name, w) in enumerate(weights.items())]
    config = make_config(sources, seq_length=256, streams=2, gbs=8, mbs=4, buffer=50)
    (loader,) = loaders(config, 1)
    counts = Counter()
    while sum(counts.values()) < 2000:
        loader.next_step()
        counts.update(name for name, _, _ in loader.last_step_samples)
    total = sum(counts.values())
    for name, weight in weights.items():
        share = 100 * counts[name] / total
        assert abs(share - weight) <= 3, f"{name}: {share:.1f}% of {total} samples, want {weight}%"


@pytest.mark.parametrize("data,field", [
    ({}, "data.sources"),
    ({"sources": [{"path": "x", "weight": 0}]}, "data.sources"),
    ({"sources": [{"path": "x", "weight": -1}]}, "data.sources[0].weight"),
    ({"sources": [{"path": "x"}], "num_streams": 3}, "data.num_streams"),
    ({"sources": [{"path": "x"}], "shuffle_buffer": 0}, "data.shuffle_buffer"),
])
def test_bad_shard_settings_are_refused_naming_the_field(data, field):
    from megatron_keye.config.loading import ConfigError
    from megatron_keye.config.validation import validate

    config = config_from_dict({"model": {"flavor": "tiny"}, "data": {"kind": "shards", **data}})
    with pytest.raises(ConfigError, match=f"^{field.replace('[', '.').replace(']', '.')}"):
        validate(config, 2)


def test_missing_source_is_an_error_naming_it(tmp_path):
    config = make_config([(tmp_path / "nothing-{000..003}.tar", 1.0)])
    with pytest.raises(FileNotFoundError, match=r"data.sources\[0\].path: no shards"):
        build_shard_loader(config, dp_rank=0, dp_size=1)


def test_without_shuffle_one_stream_reads_the_corpus_in_file_order(corpus):
    config = make_config([(corpus, 1.0)], streams=1, gbs=2, mbs=1, shuffle=False,
                         pack_open_rows=1)  # one open row: rows keep the reading order
    (loader,) = loaders(config, 1)
    keys = []
    while len(keys) < 60:
        loader.next_step()
        keys += [key for _, key, _ in loader.last_step_samples]
    shard_order = [(key.split("@")[1], key.split("@")[0]) for key in keys[:60]]
    assert shard_order == sorted(shard_order)  # shards in name order, samples in tar order
    assert len(set(keys[:60])) == 60


def test_shards_of_another_tokenizer_are_refused(corpus, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(corpus.parent, copy)
    index = copy / corpus.name
    value = json.loads(index.read_text())
    value["tokenizer_sha256"] = "ab" * 32
    index.write_text(json.dumps(value))
    with pytest.raises(ValueError, match=r"data.sources\[0\].path: .* another tokenizer"):
        build_shard_loader(make_config([(index, 1.0)]), dp_rank=0, dp_size=1)


def test_deficit_blending_keeps_every_prefix_within_one_sample_of_the_weights():
    from megatron_keye.data.shards.streams import DeficitBlender

    blender = DeficitBlender([24, 50, 26])
    for n in range(1, 1001):
        blender.record(blender.choose())
        for weight, count in zip(blender.weights, blender.counts, strict=True):
            assert abs(count - weight * n) <= 1, (n, blender.counts)


def test_stream_assignment_deals_streams_to_dp_ranks_then_workers():
    from megatron_keye.data.shards.streams import stream_assignment

    assert stream_assignment(num_streams=8, dp_rank=1, dp_size=2, num_workers=2) == ([1, 3, 5, 7], 2)
    assert stream_assignment(num_streams=8, dp_rank=3, dp_size=4, num_workers=4) == ([3, 7], 2)
    assert stream_assignment(num_streams=4, dp_rank=0, dp_size=4, num_workers=2) == ([0], 1)
    with pytest.raises(ValueError, match="data.num_streams"):
        stream_assignment(num_streams=6, dp_rank=0, dp_size=4, num_workers=1)
