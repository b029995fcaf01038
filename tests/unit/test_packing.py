"""Packing: best fit never overflows a row, samples stay whole unless truncation is configured,
truncation cuts before a media block, and a preference pair shares one row (chosen first)."""

from __future__ import annotations

import random
from collections import Counter

import torch

from megatron_keye.data.batch import CHOSEN, REJECTED
from megatron_keye.data.shards.format import read_record
from megatron_keye.data.shards.packing import BestFitPacker, truncate_sample
from megatron_keye.data.shards.tar_reader import TarShard
from megatron_keye.data.text.tokenizer import KeyeTokenizer
from megatron_keye.data.vision_batch import VisionMedia, VisionSample
from tests.unit.shard_corpora import text_corpus, write_corpus
from tests.unit.test_loader import loaders, make_config


def test_best_fit_never_overflows_and_places_every_unit():
    rng = random.Random(3)
    packer = BestFitPacker(capacity=100, max_open=3)
    placed, rows = [], []
    for unit in range(500):
        length = rng.randint(1, 100)
        placed.append((unit, length))
        rows += packer.add((unit, length), length)
    rows += packer.open_units()
    assert sorted(u for row in rows for u in row) == placed
    assert all(sum(length for _, length in row) <= 100 for row in rows)
    # Best fit keeps rows full: on average far above the 50% of one unit per row.
    assert sum(length for _, length in placed) / (100 * len(rows)) > 0.85


def _full_lengths(index_path):
    """Token count of every record as the loader encodes it (no truncation)."""
    from megatron_keye.data.shards.encode import EncoderSettings

    encoder = EncoderSettings()()
    lengths = {}
    for tar in sorted(index_path.parent.glob("*.tar")):
        shard = TarShard(str(tar))
        for i in range(len(shard)):
            record = read_record(shard.read(i))
            unit = encoder(record, sample_index=0)
            lengths[f"{shard.key(i)}@{tar}"] = len(unit.samples[0].tokens)
    return lengths


def _segments(batch, row):
    ids = batch["sample_ids"][row]
    return torch.unique_consecutive(ids, return_counts=True)[1].tolist()


def test_rows_hold_whole_samples_and_drop_overlong_ones(tmp_path):
    corpus = text_corpus(tmp_path, "docs", 40, per_shard=10, max_words=60)
    lengths = _full_lengths(corpus)
    seq = 64
    config = make_config([(corpus, 1.0)], seq_length=seq, gbs=4, mbs=2, overlong="drop")
    (loader,) = loaders(config, 1)
    seen = Counter()
    for _ in range(10):
        batches = loader.next_step()
        rows = loader.last_step_rows
        flat = [(b, r) for b in batches for r in range(b["tokens"].shape[0])]
        for (batch, r), samples in zip(flat, rows, strict=True):
            assert batch["tokens"].shape[1] == seq
            segments = _segments(batch, r)
            assert sum(segments) == seq
            if len(samples) == 1:  # a lone sample and the row's padding form one segment
                assert segments == [seq] and lengths[samples[0][1]] <= seq
            else:  # every sample whole, padded to 2 x CP = 2; the tail padding after them
                for (_, key, _), segment in zip(samples, segments, strict=False):
                    assert segment == lengths[key] + lengths[key] % 2, key
            seen.update(key for _, key, _ in samples)
    long = {k for k, n in lengths.items() if n > seq}
    assert long and not long & set(seen)
    assert loader.metrics()["data/overlong_dropped"] > 0
    assert loader.metrics()["data/overlong_truncated"] == 0


def test_truncation_keeps_the_first_tokens_of_overlong_samples(tmp_path):
    corpus = text_corpus(tmp_path, "docs", 20, per_shard=10, min_words=40, max_words=60)
    seq = 32
    config = make_config([(corpus, 1.0)], seq_length=seq, gbs=2, mbs=2, overlong="truncate")
    (loader,) = loaders(config, 1)
    batch = loader.next_step()[0]
    for r in range(2):
        segments = _segments(batch, r)
        assert segments == [seq]  # each overlong sample fills its row, cut at the limit
        assert (batch["labels"][r] != -100).any()
    assert loader.metrics()["data/overlong_truncated"] >= 2


def test_truncate_sample_cuts_before_an_image_that_would_not_fit():
    ids = KeyeTokenizer.default().vision
    image = VisionMedia.image(torch.randn(16, 3, 14, 14), (1, 4, 4))  # 4 tokens
    tokens = [5, 6, 7, ids.vision_start, *[ids.image_pad] * 4, ids.vision_end, 8, 9]
    sample = VisionSample(tokens=tokens, media=(image,), target_mask=[1.0] * len(tokens))
    cut = truncate_sample(sample, 6, ids)
    assert cut.tokens.tolist() == [5, 6, 7] and cut.media == () and len(cut.target_mask) == 3
    kept = truncate_sample(sample, 10, ids)
    assert kept.tokens.tolist() == tokens[:10] and len(kept.media) == 1
    assert truncate_sample(sample, 20, ids) is sample
    lead = VisionSample(tokens=tokens[3:], media=(image,))
    assert truncate_sample(lead, 4, ids) is None


def test_a_preference_pair_shares_one_row_chosen_first(tmp_path):
    lines = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.",
              "rejected": f"Bad {i}."} for i in range(12)]
    corpus = write_corpus(tmp_path, "pairs", lines, per_shard=5)
    config = make_config([(corpus, 1.0)], seq_length=128, gbs=4, mbs=2)
    (loader,) = loaders(config, 1)
    pairs = 0
    for _ in range(3):
        for batch in loader.next_step():
            for r in range(batch["tokens"].shape[0]):
                roles = torch.unique_consecutive(batch["pair_role"][r]).tolist()
                # chosen, rejected, chosen, rejected, ... then the tail padding (role 0)
                body = [x for x in roles if x]
                assert body == [CHOSEN, REJECTED] * (len(body) // 2) and body
                pairs += len(body) // 2
                ids = batch["sample_ids"][r]
                for sid in ids.unique().tolist():
                    sample_roles = batch["pair_role"][r][ids == sid].unique().tolist()
                    assert len(sample_roles) == 1  # a sample has one role
    assert pairs >= 12
