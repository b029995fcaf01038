"""`megatron-keye reference-logprobs`: the precomputed reference path equals the frozen-model path.

A small pair corpus (two shards) is preprocessed; a reference checkpoint's pass writes sidecars;
then on the same layout (TP=2 with SP) an MPO and a DPO step with `reference: precomputed` (rows'
ref_logprobs from the sidecars) give the loss of `reference: model` with that checkpoint, and a
policy equal to the reference gives DPO = log 2. A sidecar that does not match the rendered sample
is refused, naming it. One spawned world of two ranks.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers_reference_pass import precomputed_worker
from tests.unit.shard_corpora import WORDS, write_corpus

SEQ = 128


def pair_corpus(directory: Path, count: int = 6) -> Path:
    rng = random.Random(5)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    lines = [{"prompt": f"Pair {i}: {words(rng.randint(2, 6))}?", "chosen": words(rng.randint(2, 8)),
              "rejected": words(rng.randint(2, 8))} for i in range(count)]
    return write_corpus(directory, "pairs", lines, per_shard=4)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference_pass")
    index = pair_corpus(workdir)
    ranks = run_workers(precomputed_worker, 2, timeout=600.0, index=str(index),
                        workdir=str(workdir), seq=SEQ, layout={"tensor": 2, "sp": True})
    return {"ranks": ranks, "index": index, "workdir": workdir}


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_sidecars_written_next_to_every_shard(results):
    files = sorted({f for r in results["ranks"] for f in r["files"]})
    shards = sorted(Path(results["index"]).parent.glob("pairs-*.tar"))
    assert [Path(f).name for f in files] == [s.name[:-4] + ".reflogp-t1.npz" for s in shards]
    assert len(shards) == 2
    with np.load(files[0]) as data:
        assert set(data["parts"].tolist()) == {0, 1}  # chosen and rejected of each pair
        assert np.all(data["logprobs"] <= 0) and np.any(data["logprobs"] < 0)


@pytest.mark.parametrize("head", ["mpo", "dpo"])
def test_precomputed_equals_frozen_model(results, head):
    for rank in results["ranks"]:
        model, precomputed = rank[(head, "model")], rank[(head, "precomputed")]
        assert relative(precomputed["loss"], model["loss"]) <= 1e-5
        assert model["loss"] != pytest.approx(math.log(2), abs=1e-3)  # policy != reference
        for name, value in model["reports"].items():
            assert precomputed["reports"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        rows, labels = precomputed["ref_rows"], precomputed["labels"]
        assert bool((rows[labels == -100] == 0).all()) and bool((rows[labels != -100] < 0).all())


def test_policy_equal_to_reference_gives_log2(results):
    for rank in results["ranks"]:
        same = rank["dpo_same"]
        assert relative(same["loss"], math.log(2)) <= 1e-5
        margins = [v for k, v in same["reports"].items() if "margin" in k]
        assert margins and all(abs(m) <= 1e-5 for m in margins)


def test_mismatched_sidecar_is_refused_naming_the_sample(results, tmp_path):
    from megatron_keye.config import config_from_dict
    from megatron_keye.data.shards.format import SidecarMismatch, reflogp_path, write_reflogp
    from megatron_keye.data.shards.loader import build_shard_loader

    index = Path(results["index"])
    shard = sorted(index.parent.glob("pairs-*.tar"))[0]
    with np.load(reflogp_path(shard, "t1")) as data:
        keys, parts, tokens = data["keys"], data["parts"], data["tokens"]
        offsets, logprobs = data["offsets"], data["logprobs"]
    entries = [(str(k), int(p), str(t), logprobs[offsets[i]:offsets[i + 1]])
               for i, (k, p, t) in enumerate(zip(keys, parts, tokens, strict=True))]
    key, part, fingerprint, values = entries[0]
    entries[0] = (key, part, fingerprint, values[:-1])  # one log-prob short
    for other in sorted(index.parent.glob("pairs-*.tar")):
        target = reflogp_path(other, "bad")
        if other == shard:
            write_reflogp(target, entries, meta={"tag": "bad"})
        else:
            target.write_bytes(reflogp_path(other, "t1").read_bytes())
    config = config_from_dict({
        "model": {"flavor": "tiny"},
        "schedule": {"global_batch_size": 12, "micro_batch_size": 12},
        "data": {"kind": "shards", "seq_length": SEQ, "num_workers": 0, "num_streams": 1,
                 "shuffle_buffer": 1, "ref_logprobs": "bad",
                 "sources": [{"path": str(index), "weight": 1}]}})
    loader = build_shard_loader(config, dp_rank=0, dp_size=1)
    with pytest.raises(SidecarMismatch, match=rf"sample {key} \(part {part}\): .* tokens"):
        loader.next_step()


@pytest.mark.parametrize(("data", "message"), [
    ({"kind": "shards", "sources": [{"path": "x", "weight": 1}], "ref_logprobs": "a/b"},
     "sidecar tag"),
    ({"kind": "synthetic_text", "ref_logprobs": "ref"}, "data.kind=shards"),
])
def test_ref_logprobs_option_is_validated(data, message):
    from megatron_keye.config import config_from_dict, validate
    from megatron_keye.config.loading import ConfigError

    config = config_from_dict({"model": {"flavor": "tiny"}, "data": data})
    with pytest.raises(ConfigError, match=rf"data.ref_logprobs.*{message}"):
        validate(config, 1)
