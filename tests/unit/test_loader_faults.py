"""Loader faults: a corrupt tar member and an undecodable video are skipped, counted per source and
logged by key while batches keep coming; a vanished or truncated shard is an error naming it; a
dying worker is reported with the sample it was reading."""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_keye.data.shards.encode import EncoderSettings, RecordEncoder
from megatron_keye.data.shards.loader import LoaderWorkerError
from megatron_keye.data.shards.tar_reader import ShardError, TarShard
from tests.unit.shard_corpora import media_corpus
from tests.unit.test_loader import loaders, make_config


def overwrite_member(tar: Path, member_suffix: str, nth: int = 0) -> str:
    """Garble the bytes of the nth member ending in `member_suffix` in place (same size, so
    the tar and its index stay consistent); returns its sample key."""
    with tarfile.open(tar) as archive:
        members = [m for m in archive.getmembers() if m.name.endswith(member_suffix)]
    member = members[nth]
    with open(tar, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\x00garbage" * (member.size // 8) + b"\x00" * (member.size % 8))
    return member.name.split(".")[0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Media corpus with one corrupt JSON member and one undecodable video."""
    index = media_corpus(tmp_path_factory.mktemp("media"), "media", images=5, videos=3,
                         per_shard=4)
    shards = sorted(index.parent.glob("*.tar"))
    bad_json = overwrite_member(shards[0], ".json", nth=1)
    bad_video = overwrite_member(shards[-1], ".mp4", nth=0)
    return index, bad_json, bad_video


def test_corrupt_member_and_undecodable_video_are_skipped_counted_and_logged(planted, caplog):
    index, bad_json, bad_video = planted
    config = make_config([(index, 1.0)], seq_length=512, workers=2, streams=2, gbs=2, mbs=1,
                         video_max_tokens=128)
    (loader,) = loaders(config, 1)
    keys = set()
    with caplog.at_level(logging.WARNING, logger="megatron_keye.data.shards.loader"):
        for _ in range(6):
            batches = loader.next_step()
            assert batches and all(b["tokens"].shape == (1, 512) for b in batches)
            keys.update(key.split("@")[0] for _, key, _ in loader.last_step_samples)
    loader.close()
    metrics = loader.metrics()
    assert metrics["data/bad_record"] >= 1 and metrics["data/bad_media"] >= 1
    assert metrics["data/skipped/media"] == metrics["data/bad_record"] + metrics["data/bad_media"]
    assert bad_json not in keys and bad_video not in keys
    assert len(keys) == 6  # every other sample still arrives
    logged = caplog.text
    assert f"skipped sample {bad_json}" in logged and "bad_record" in logged
    assert f"skipped sample {bad_video}" in logged and "bad_media" in logged


def _copy(planted, tmp_path):
    index = planted[0]
    target = tmp_path / "copy"
    shutil.copytree(index.parent, target)
    return target / index.name


def test_vanished_shard_is_an_error_naming_it(planted, tmp_path):
    index = _copy(planted, tmp_path)
    shard = sorted(index.parent.glob("*.tar"))[1]
    os.remove(shard)
    config = make_config([(index, 1.0)], seq_length=512, workers=1, streams=1, gbs=2, mbs=1,
                         video_max_tokens=128)
    (loader,) = loaders(config, 1)
    with pytest.raises(ShardError, match=f"{shard}.*vanished"):
        for _ in range(8):
            loader.next_step()
    loader.close()


def test_truncated_shard_is_an_error_naming_it(planted, tmp_path):
    index = _copy(planted, tmp_path)
    shard = sorted(index.parent.glob("*.tar"))[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    config = make_config([(index, 1.0)], seq_length=512, workers=0, streams=1, gbs=2, mbs=1,
                         video_max_tokens=128)
    (loader,) = loaders(config, 1)
    with pytest.raises(ShardError, match=f"{shard}.*truncated"):
        for _ in range(8):
            loader.next_step()


class _DyingEncoder(EncoderSettings):
    """Encoder settings whose encoder kills its worker process at one sample key."""

    def __call__(self):
        encoder = RecordEncoder(self)
        victim = self.template.system_prompt  # the key travels in an unused-by-test field

        def encode(record, **kwargs):
            if record.key == victim:
                os._exit(3)
            return encoder(record, **kwargs)

        encode.wants_companions = encoder.wants_companions
        encode.companions = encoder.companions
        return encode


def test_dead_worker_is_reported_with_its_sample(planted):
    index, bad_json, bad_video = planted
    config = make_config([(index, 1.0)], seq_length=512, workers=2, streams=2, gbs=2, mbs=1,
                         video_max_tokens=128)
    (loader,) = loaders(config, 1)
    first_shard = TarShard(str(sorted(index.parent.glob("*.tar"))[0]))
    victim = next(first_shard.key(i) for i in range(len(first_shard))
                  if first_shard.key(i) not in (bad_json, bad_video))
    settings = loader.plan.encoder_factory
    dying = _DyingEncoder(**{f: getattr(settings, f) for f in settings.__dataclass_fields__})
    dying = replace(dying, template=replace(dying.template, system_prompt=victim))
    loader.plan = replace(loader.plan, encoder_factory=dying)
    with pytest.raises(LoaderWorkerError, match=f"worker \\d was reading sample {victim}"):
        for _ in range(8):
            loader.next_step()
    loader.close()
