"""`megatron-keye score`: a reward model's scores of preference pairs and its pairwise accuracy.

Pairs come from a JSONL file in any format `megatron-keye preprocess` accepts (TRL
`prompt`/`chosen`/`rejected`, ms-swift `rejected_response`, ...; media paths relative to the
file's directory) or from preprocessed shards (a `NAME.index.json` or a directory of them). Each
pair is rendered with the chat template and encoded like training data (`data/shards/encode.py`),
laid out as one row (chosen, then rejected, padded with the tokenizer's pad token) and scored by
the value model in any TP×PP layout; r is the score at each sample's last non-pad token
(`heads/reward.py::pair_rewards`, what the reward head trains). Non-pair records and lines the
preprocessor rejects are counted and skipped, with the first reasons logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class PairScores:
    """Scores of the scored pairs, in input order, and what was skipped."""

    keys: list[str]
    chosen: list[float]
    rejected: list[float]
    skipped: dict[str, int]

    @property
    def accuracy(self) -> float:
        """Fraction of pairs whose chosen response scores higher than the rejected one."""
        if not self.keys:
            return float("nan")
        return sum(c > r for c, r in zip(self.chosen, self.rejected)) / len(self.keys)

    @property
    def mean_margin(self) -> float:
        if not self.keys:
            return float("nan")
        return sum(c - r for c, r in zip(self.chosen, self.rejected)) / len(self.keys)


# ------------------------------------------------------------------------------ pair rows
def read_records(path: str, *, tokenizer, skipped: Counter) -> Iterator:
    """Shard `Record`s of a JSONL file, a shard index or a directory of indexes."""
    from megatron_keye.data.shards import format as fmt

    source = Path(path)
    if source.is_dir() or source.name.endswith(".index.json"):
        indexes = sorted(source.glob("*.index.json")) if source.is_dir() else [source]
        if not indexes:
            raise FileNotFoundError(f"{path}: no *.index.json shard index in this directory")
        from megatron_keye.data.shards.tar_reader import TarShard

        for index_file in indexes:
            index = fmt.read_index(index_file)
            for info in index.shards:
                shard = TarShard(str(index_file.parent / info.file),
                                 expected_samples=info.samples, expected_bytes=info.bytes)
                for i in range(len(shard)):
                    yield fmt.read_record(shard.read(i))
        return
    if not source.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file or shard index")
    from megatron_keye.data.shards.sources import RejectError, SourceOptions, convert_line

    options = SourceOptions(source=source.stem, media_root=source.parent)
    with open(source, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield convert_line(line, key=f"{source.stem}-{number:08d}", file=str(source),
                                   line_number=number, options=options, tokenizer=tokenizer)
            except RejectError as err:
                skipped[f"rejected:{err.reason}"] += 1
                if skipped[f"rejected:{err.reason}"] <= 3:
                    log.warning("%s line %d skipped: %s", source, number, err)


def encode_pairs(path: str, *, tokenizer_dir: str | None, seed: int = 1234):
    """(keys, pack units, margins, tokenizer, skip counts) of the pairs in `path`."""
    from megatron_keye.data.shards.encode import EncoderSettings
    from megatron_keye.data.shards.format import KIND_PAIR
    from megatron_keye.data.shards.row_stream import SampleSkip

    encoder = EncoderSettings(tokenizer=tokenizer_dir, seed=seed)()
    skipped: Counter = Counter()
    keys, units, margins = [], [], []
    for record in read_records(path, tokenizer=encoder.tokenizer, skipped=skipped):
        if record.kind != KIND_PAIR:
            skipped[f"not a pair ({record.kind})"] += 1
            continue
        try:
            unit = encoder(record, sample_index=len(keys))
        except SampleSkip as err:
            skipped[err.reason] += 1
            log.warning("pair %s skipped: %s", record.key, err)
            continue
        keys.append(record.key)
        units.append(unit)
        margins.append(record.margin or 0.0)
    return keys, units, margins, encoder.tokenizer, dict(skipped)


def pair_batches(units, margins, *, seq_length: int, batch_size: int, tokenizer) -> list[dict]:
    """Micro-batches of `batch_size` rows, one pair per row; the last one filled with rows that
    hold no pair (so every micro-batch has the same shape, as pipeline schedules need)."""
    from megatron_keye.data import batch as contract
    from megatron_keye.data.shards.packing import build_row, concat_rows

    rows = []
    for unit, margin in zip(units, margins):
        row = build_row([unit], seq_length=seq_length, pad_multiple=1, ids=tokenizer.vision,
                        pad_id=tokenizer.pad_id)
        row[contract.PAIR_MARGIN] = (row[contract.PAIR_ROLE] == contract.CHOSEN).float() * margin
        rows.append(row)
    filler = _empty_row(seq_length, tokenizer.pad_id)
    while len(rows) % batch_size:
        rows.append(filler)
    return [concat_rows(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def _empty_row(seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    from megatron_keye.data import batch as contract

    tokens = torch.full((1, seq_length), pad_id, dtype=torch.int64)
    zeros = torch.zeros_like(tokens)
    return {contract.TOKENS: tokens, contract.LABELS: torch.full_like(tokens, -100),
            contract.LOSS_WEIGHTS: zeros.float(), contract.SAMPLE_IDS: zeros,
            contract.PAIR_ROLE: zeros, contract.PAIR_MARGIN: zeros.float(),
            contract.POSITION_IDS: torch.arange(seq_length).expand(3, 1, seq_length).clone()}


# -------------------------------------------------------------------------------- scoring
class _CollectRewards:
    """A loss head for forward-only passes: keeps each micro-batch's pair rewards."""

    name = "score"

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.chosen: list[torch.Tensor] = []
        self.rejected: list[torch.Tensor] = []

    def __call__(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]):
        from megatron_keye.heads.reward import pair_rewards

        rewards = pair_rewards(output, batch, pad_token_id=self.pad_token_id)
        self.chosen.append(rewards.chosen.detach().float().cpu())
        self.rejected.append(rewards.rejected.detach().float().cpu())
        zero = output.new_zeros(())
        return zero, torch.zeros((), dtype=torch.int, device=zero.device), {}


def score_on_ranks(*, checkpoint: str, data: str, tokenizer: str | None, batch_size: int,
                   seq_length: int | None, tensor: int, pipeline: int) -> dict | None:
    """Score every pair in this world (TP×PP ranks); the last stage's TP rank 0 returns them."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_keye.config import config_from_dict, validate
    from megatron_keye.models.keye_vl.builder import build_model_chunks
    from megatron_keye.runtime.checkpoint import Checkpointer, resolve_checkpoint_dir
    from megatron_keye.runtime.parallel import ParallelDims
    from megatron_keye.runtime.step import ModelStep

    directory = resolve_checkpoint_dir(checkpoint)
    if directory is None:
        raise FileNotFoundError(f"{checkpoint}: no checkpoint there (nor a `latest` naming one)")
    saved = dist_checkpointing.load_common_state_dict(str(directory))["config"]
    config = config_from_dict({**saved, "parallel": {"tensor": tensor, "pipeline": pipeline}})
    if config.model.output_head != "value":
        raise ValueError(f"{checkpoint}: model.output_head is {config.model.output_head!r}; "
                         f"scoring needs a reward (value) model")
    keys, units, margins, tok, skipped = encode_pairs(
        data, tokenizer_dir=tokenizer or config.data.tokenizer, seed=config.data.seed)
    if not keys:
        raise ValueError(f"{data}: no pair to score (skipped: {skipped or 'none'})")
    longest = max(unit.length(1) for unit in units)
    if seq_length is None:
        seq_length = -(-longest // 8) * 8
    elif longest > seq_length:
        raise ValueError(f"--seq-length {seq_length}: a pair needs {longest} tokens")
    config.data.seq_length = seq_length
    config.schedule.micro_batch_size = config.schedule.global_batch_size = batch_size
    validate(config, tensor * pipeline)
    device = ParallelDims.from_config(config.parallel, tensor * pipeline).initialize(
        seed=config.seed)
    chunks = build_model_chunks(config, device)
    layout = {"tensor": tensor, "pipeline": pipeline, "virtual_pipeline": 1, "context": 1,
              "data": 1}
    Checkpointer(config.checkpoint, run_config=saved, layout=layout).load(
        directory, chunks=chunks, optimizer=None, weights_only=True)
    for chunk in chunks:
        chunk.eval()
    collector = _CollectRewards(tok.pad_id)
    step = ModelStep(model=chunks, loss_head=collector, device=device, seq_length=seq_length,
                     micro_batch_size=batch_size)
    batches = pair_batches(units, margins, seq_length=seq_length, batch_size=batch_size,
                           tokenizer=tok)
    with torch.no_grad():
        for batch in batches:
            step.run([batch], forward_only=True)
    if not (parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0):
        return None
    return {"keys": keys, "chosen": torch.cat(collector.chosen).tolist(),
            "rejected": torch.cat(collector.rejected).tolist(), "skipped": skipped}


def score_pairs(checkpoint: str, data: str, *, tokenizer: str | None = None,
                batch_size: int = 8, seq_length: int | None = None, tensor: int = 1,
                pipeline: int = 1) -> PairScores:
    """Score the pairs of `data` with the reward model `checkpoint` (spawns TP×PP ranks unless
    this process already is such a launched world)."""
    from megatron_keye.runtime.spawn import spawn_ranks

    world = tensor * pipeline
    kwargs = dict(checkpoint=checkpoint, data=data, tokenizer=tokenizer, batch_size=batch_size,
                  seq_length=seq_length, tensor=tensor, pipeline=pipeline)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == world:
        results = [score_on_ranks(**kwargs)]
    else:
        results = spawn_ranks(score_on_ranks, world, timeout=7 * 24 * 3600.0,
                              threads=max(1, (os.cpu_count() or 1) // world), **kwargs)
    found = next((r for r in results if r is not None), None)
    if found is None:  # a launched world where this rank is not the reporting one
        return PairScores(keys=[], chosen=[], rejected=[], skipped={})
    return PairScores(**found)


def cli_main(argv: list[str], *, prog: str = "megatron-keye score") -> int:
    """`megatron-keye score --checkpoint CKPT --data PAIRS`: print accuracy (and per-pair scores
    with --out)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a reward model checkpoint or save dir")
    parser.add_argument("--data", required=True,
                        help="JSONL of pairs (any preprocess format) or shards (index or dir)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    parser.add_argument("--seq-length", type=int, help="row length (default: the longest pair)")
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--out", help="write one JSON line per pair: key, chosen, rejected")
    args = parser.parse_args(argv)
    scores = score_pairs(args.checkpoint, args.data, tokenizer=args.tokenizer,
                         batch_size=args.batch_size, seq_length=args.seq_length,
                         tensor=args.tensor, pipeline=args.pipeline)
    if not scores.keys:
        return 0
    if args.out:
        with open(args.out, "w") as f:
            for key, c, r in zip(scores.keys, scores.chosen, scores.rejected):
                f.write(json.dumps({"key": key, "chosen": c, "rejected": r}) + "\n")
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(scores.skipped.items())) or "none"
    print(f"pairs {len(scores.keys)}  accuracy {scores.accuracy:.4f}  "
          f"mean margin {scores.mean_margin:.4f}  skipped {skipped}")
    return 0


__all__ = ["PairScores", "cli_main", "encode_pairs", "pair_batches", "read_records",
           "score_on_ranks", "score_pairs"]
