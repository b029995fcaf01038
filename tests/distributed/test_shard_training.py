"""Training from shards: a TP=2 run on image, video and text shards with a planted corrupt member
and an undecodable video trains on and counts the skips; its checkpoint resumed as DP=2 continues
the same global row order (the third step equals the uninterrupted run's)."""

from __future__ import annotations

import math
import shutil

from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers_shards import train_from_shards_worker
from tests.unit.shard_corpora import media_corpus, text_corpus
from tests.unit.test_loader_faults import overwrite_member


def test_train_from_shards_skips_bad_samples_and_resumes_on_another_dp_size(tmp_path):
    text = text_corpus(tmp_path / "text", "text", 30)
    media = media_corpus(tmp_path / "media", "media", images=5, videos=3, per_shard=4)
    shards = sorted(media.parent.glob("*.tar"))
    overwrite_member(shards[0], ".json", nth=1)
    overwrite_member(shards[-1], ".mp4", nth=0)
    ckpt = tmp_path / "ckpt"
    common = [
        "model.flavor=tiny", "model.vision.flavor=tiny", "parallel.pipeline=1",
        "schedule.train_iters=3", "schedule.warmup_iters=1", "schedule.global_batch_size=4",
        "schedule.micro_batch_size=2", "optimizer.lr=0.003",
        "data.kind=shards", "data.seq_length=256", "data.video_max_tokens=128",
        "data.num_workers=1", "data.num_streams=2",
        f"data.sources=[{{path: {text}, weight: 1}}, {{path: {media}, weight: 3}}]",
        "logging.log_interval=1", "logging.wandb_mode=disabled",
        f"logging.output_dir={tmp_path / 'logs'}", f"checkpoint.save_dir={ckpt}",
    ]
    full = run_workers(train_from_shards_worker, 2,
                       overrides=[*common, "parallel.tensor=2", "checkpoint.save_interval=2"])
    assert full[0]["batches"] == full[1]["batches"]  # TP peers got identical batches
    losses = full[0]["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    m = full[0]["metrics"]
    assert m["data/bad_record"] >= 1 and m["data/bad_media"] >= 1
    assert m["data/skipped/media"] >= 2 and m["data/skipped/text"] == 0

    # Resume iteration 2 as DP=2 (TP=1): the TP=2 run's loader position continues there.
    shutil.rmtree(ckpt / "iter_0000003")
    (ckpt / "latest").write_text("iter_0000002\n")
    resumed = run_workers(train_from_shards_worker, 2,
                          overrides=[*common, "parallel.tensor=1", "checkpoint.save_at_end=false"])
    assert [r["start"] for r in resumed] == [2, 2]
    assert resumed[0]["batches"] != resumed[1]["batches"]  # DP ranks got different rows
    (third,) = resumed[0]["losses"]
    assert math.isclose(third, losses[2], rel_tol=1e-5), (third, losses)
