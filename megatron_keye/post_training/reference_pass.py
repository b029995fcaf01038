"""`megatron-keye reference-logprobs`: precompute a frozen reference model's log-probs into the
shards, so preference training (`stage.head.preference.reference: precomputed`) needs no second
model in memory.

One pass over every sample of the recipe's shard sources (`data.kind: shards`): each sample is
read, rendered and expanded exactly as the training loader does (`RowStream.unit_at`: same
template options, seed, media budgets, truncation of overlong samples), put alone in a row (a
pair's chosen and rejected share one), forwarded by the reference checkpoint on the config's
layout (any TP/PP/CP; data-parallel ranks split the shards), and its per-token log p(label) is
written to the shard's sidecar `NAME-000003.reflogp-TAG.npz` (format in `data/shards/format.py`).
Training with `data.ref_logprobs: TAG` fills each packed row's `ref_logprobs` from the sidecars;
a sample whose rendering changed since the pass is refused by name.

A sample's log-probs do not depend on what else shares its row: packed samples attend only
within themselves and their M-RoPE positions restart per sample.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from megatron_keye.config.schema import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_TAG = "ref"
_GROUP_MICROBATCHES = 8  # micro-batches forwarded per reference call (bounds activation memory)


@dataclass
class PassSummary:
    """What one rank's pass wrote (the writing ranks only report files)."""

    files: list[str]
    samples: int
    skipped: int


def _pending_unit(stream, ref):
    """(sample key, the unit as training packs it) or None when training would skip it."""
    unit = stream.unit_at(ref)
    if unit is None:
        return None
    return stream.sample_key(ref), unit


def _forward_rows(step, units: list, *, settings, group: int) -> list[torch.Tensor] | None:
    """Full-row reference log-probs [seq] per unit (None off the last pipeline stage)."""
    from megatron_keye.data.shards.packing import build_row, concat_rows
    from megatron_keye.post_training.reference import reference_logprobs

    mbs = step.micro_batch_size
    rows = [build_row([unit], seq_length=settings.seq_length, pad_multiple=settings.pad_multiple,
                      ids=settings.ids, pad_id=settings.pad_id) for unit in units]
    padded = rows + [rows[-1]] * (-len(rows) % mbs)  # fill the last micro-batch; discarded
    microbatches = [concat_rows(padded[i:i + mbs]) for i in range(0, len(padded), mbs)]
    microbatches += [microbatches[-1]] * (-len(microbatches) % group)  # schedule multiple
    results = reference_logprobs(step, microbatches)
    if results is None:
        return None
    return list(torch.cat(results))[:len(units)]


def compute_reference_logprobs(cfg: TrainConfig, checkpoint: str, *, tag: str) -> PassSummary:
    """Write the sidecars of this data-parallel rank's shards (parallel state initialized).

    Shards are numbered over all sources in config order; data-parallel rank r handles shards
    r, r + dp, ...; within a model-parallel group every rank forwards the same rows and the last
    pipeline stage's TP/CP rank 0 writes.
    """
    from megatron.core import parallel_state

    from megatron_keye.data.shards.format import reflogp_path, token_fingerprint, write_reflogp
    from megatron_keye.data.shards.loader import build_shard_loader
    from megatron_keye.data.shards.packing import padded_length
    from megatron_keye.data.shards.row_stream import RowStream
    from megatron_keye.data.shards.streams import EpochOrder, SampleRef
    from megatron_keye.data.shards.tar_reader import ShardCache
    from megatron_keye.runtime.frozen_model import build_frozen_model
    from megatron_keye.runtime.parallel import compute_device
    from megatron_keye.runtime.step import ModelStep

    if cfg.data.kind != "shards":
        raise ValueError(f"data.kind: reference-logprobs reads shard sources, the config has "
                         f"{cfg.data.kind!r}")
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    cp_size = parallel_state.get_context_parallel_world_size()
    plan = build_shard_loader(cfg, dp_rank=dp_rank, dp_size=dp_size, context_parallel=cp_size,
                              log_events=False).plan
    settings = plan.row
    orders = [EpochOrder(source, source_index=i, seed=plan.seed, num_streams=1,
                         shuffle=plan.shuffle) for i, source in enumerate(plan.sources)]
    stream = RowStream(stream=0, orders=orders, settings=settings,
                       encoder=plan.encoder_factory(), cache=ShardCache())

    device = compute_device()
    chunks = build_frozen_model(cfg, device, layout={}, source=checkpoint)
    step = ModelStep(model=chunks, loss_head=None, device=device, seq_length=settings.seq_length,
                     micro_batch_size=cfg.schedule.micro_batch_size, reference_model=chunks,
                     vocab_size=cfg.model.vocab_size)
    group = parallel_state.get_pipeline_model_parallel_world_size()
    group = max(group, -(-_GROUP_MICROBATCHES // group) * group)
    writer = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
              and parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_context_parallel_rank() == 0)
    meta = {"tag": tag, "checkpoint": str(checkpoint), "seq_length": settings.seq_length,
            "seed": plan.seed}
    shards = [(s, k) for s, source in enumerate(plan.sources) for k in range(len(source.shards))]
    summary = PassSummary(files=[], samples=0, skipped=0)
    for number, (s, k) in enumerate(shards):
        if number % dp_size != dp_rank:
            continue
        pending = []
        for index in range(plan.sources[s].counts[k]):
            found = _pending_unit(stream, SampleRef(source=s, epoch=0, shard=k, index=index))
            if found is None:
                summary.skipped += 1
            else:
                pending.append(found)
        entries = []
        rows_per_call = group * step.micro_batch_size
        for first in range(0, len(pending), rows_per_call):
            part = pending[first:first + rows_per_call]
            logps = _forward_rows(step, [unit for _, unit in part], settings=settings, group=group)
            if logps is None:
                continue
            for (key, unit), row in zip(part, logps, strict=True):
                cursor = 0
                for role, sample in enumerate(unit.samples):
                    tokens = torch.as_tensor(sample.tokens).flatten()
                    n = tokens.numel()
                    entries.append((key, role, token_fingerprint(tokens.tolist()),
                                    row[cursor:cursor + n].numpy()))
                    cursor += padded_length(n, settings.pad_multiple)
        summary.samples += len(pending)
        if writer:
            path = reflogp_path(plan.sources[s].shards[k], tag)
            write_reflogp(path, entries, meta=meta)
            summary.files.append(str(path))
    for name, counts in stream.faults.items():
        for kind, count in counts.items():
            if count:
                log.warning("reference-logprobs: source %s: %d samples %s (as training would)",
                            name, count, kind)
    return summary


def reference_pass_on_ranks(*, config: dict, checkpoint: str, tag: str, world: int) -> dict:
    """One rank of a launched or spawned world: initialize the layout, run the pass."""
    from megatron_keye.config import config_from_dict, validate
    from megatron_keye.runtime.parallel import ParallelDims

    cfg = config_from_dict(config)
    validate(cfg, world)
    ParallelDims.from_config(cfg.parallel, world).initialize(seed=cfg.seed)
    summary = compute_reference_logprobs(cfg, checkpoint, tag=tag)
    return {"files": summary.files, "samples": summary.samples, "skipped": summary.skipped}


def cli_main(argv: list[str], *, prog: str = "megatron-keye reference-logprobs") -> int:
    """`megatron-keye reference-logprobs --recipe R --checkpoint REF [--out-tag T] [--nproc N]
    [--section.field=value ...]`: write the sidecars; print how many samples and files."""
    import argparse

    from megatron_keye.config import config_to_dict, load_config
    from megatron_keye.config.arguments import split_recipe_args
    from megatron_keye.runtime.spawn import spawn_ranks

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="the reference model's checkpoint")
    parser.add_argument("--out-tag", help="sidecar tag (default: data.ref_logprobs, else 'ref')")
    parser.add_argument("--nproc", type=int, help="local processes (default: 1, or the launched "
                                                  "world under torchrun)")
    args, rest = parser.parse_known_args(argv)
    recipe, overrides = split_recipe_args(rest)
    cfg = load_config(recipe, overrides)
    tag = args.out_tag or cfg.data.ref_logprobs or DEFAULT_TAG
    cfg.data.ref_logprobs = tag  # validated as a tag with the rest
    kwargs = dict(config=config_to_dict(cfg), checkpoint=args.checkpoint, tag=tag)
    if "RANK" in os.environ:
        results = [reference_pass_on_ranks(world=int(os.environ["WORLD_SIZE"]), **kwargs)]
    else:
        world = args.nproc or 1
        results = spawn_ranks(reference_pass_on_ranks, world, timeout=7 * 24 * 3600.0,
                              threads=max(1, (os.cpu_count() or 1) // world), world=world,
                              **kwargs)
    files = sorted({f for r in results for f in r["files"]})
    samples = sum(r["samples"] for r in results if r["files"])
    print(f"reference-logprobs {tag}: {samples} samples, {len(files)} sidecar files written "
          f"({', '.join(files[:3])}{' ...' if len(files) > 3 else ''})")
    return 0


__all__ = ["DEFAULT_TAG", "PassSummary", "cli_main", "compute_reference_logprobs",
           "reference_pass_on_ranks"]
