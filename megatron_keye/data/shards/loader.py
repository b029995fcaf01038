"""The shard loader: packed multimodal rows from WebDataset shards, split by data-parallel rank,
decoded in DataLoader workers, resumable exactly, on any data-parallel size.

Order. The corpus is read by `num_streams` logical streams (streams.py); global row `j` is row
`j // num_streams` of stream `j % num_streams`, and step `k` consumes global rows
`[k G, (k + 1) G)` (G = global batch size), dealt round robin to data-parallel ranks. Rank `r`
therefore owns streams `r, r + dp, ...` and reads only their shards; its worker `w` owns the local
streams congruent to `w` modulo the worker count, which is the order in which a torch DataLoader
collects items from its workers. Nothing in this order depends on the data-parallel size or the
number of workers, so a run resumed on another layout continues the same global row sequence:
no row (hence no sample) is repeated or skipped.

Identical peers. Tensor-, context- and pipeline-parallel peers of one data-parallel rank build
the same loader from the same (config, dp_rank, dp_size, state): the construction is a pure
function of those, so they receive identical batches without any communication.

State. Every row a worker sends carries its stream's state after that row; the trainer-side
loader keeps the state of the last row it handed out per stream, so prefetched rows never leak
into a checkpoint. `state_dict` gathers the streams of all data-parallel ranks (a collective on
the data-parallel group) into one global dict: the checkpoint stores it once, and any layout can
resume from it.

Faults. Bad samples are skipped in the workers and counted per source (`metrics`); their events
are logged here with the sample's key. A vanished or truncated shard raises `ShardError` naming
it. A worker that dies is reported with the sample it was reading (each worker records what it
is about to read in a small progress file).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_keye.data.shards.packing import concat_rows
from megatron_keye.data.shards.row_stream import FAULT_KINDS, RowSettings, RowStream
from megatron_keye.data.shards.streams import EpochOrder, SourceShards, stream_assignment
from megatron_keye.data.shards.tar_reader import ShardCache

log = logging.getLogger(__name__)

STATE_VERSION = 1


class LoaderWorkerError(RuntimeError):
    """A loader worker process died; the message names the sample it was reading."""


@dataclass(frozen=True, kw_only=True)
class LoaderPlan:
    """Everything that defines the global row sequence (picklable: workers receive it)."""

    sources: tuple[SourceShards, ...]
    seed: int
    num_streams: int
    row: RowSettings
    encoder_factory: Callable[[], Callable]  # built once per worker process
    shuffle: bool = True  # permute shards per epoch (and draw from shuffle buffers)


def _orders(plan: LoaderPlan) -> list[EpochOrder]:
    return [EpochOrder(source, source_index=i, seed=plan.seed, num_streams=plan.num_streams,
                       shuffle=plan.shuffle) for i, source in enumerate(plan.sources)]


class _Progress:
    """What a worker is reading, in a file that outlives the worker (for death reports)."""

    def __init__(self, directory: str | None, worker: int):
        self.path = os.path.join(directory, f"worker{worker}.txt") if directory else None

    def __call__(self, text: str) -> None:
        if self.path is not None:
            with open(self.path, "w") as f:
                f.write(text)


class ShardRowDataset(IterableDataset):
    """One data-parallel rank's rows, in local order, as items of a DataLoader.

    Item `t` of the DataLoader is local row `first_row + t`; worker `w` of `workers` produces
    local rows `first_row + w + k * workers`.
    """

    def __init__(self, plan: LoaderPlan, *, dp_rank: int, dp_size: int, local_streams: list[int],
                 workers: int, first_row: int, states: dict[int, dict],
                 progress_dir: str | None = None):
        self.plan = plan
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.local_streams = local_streams
        self.workers = workers
        self.first_row = first_row
        self.states = states
        self.progress_dir = progress_dir

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # decoding runs in many processes; keep each on one core
        progress = _Progress(self.progress_dir, worker)
        orders = _orders(self.plan)
        encoder = self.plan.encoder_factory()
        cache = ShardCache()
        streams: dict[int, RowStream] = {}
        count = len(self.local_streams)
        for local_row in itertools.count(self.first_row + worker, self.workers):
            stream_id = self.local_streams[local_row % count]
            stream = streams.get(stream_id)
            if stream is None:
                stream = RowStream(stream=stream_id, orders=orders, settings=self.plan.row,
                                   encoder=encoder, cache=cache, progress=progress)
                if self.states.get(stream_id) is not None:
                    stream.load_state_dict(self.states[stream_id])
                streams[stream_id] = stream
            global_row = self.dp_rank + self.dp_size * local_row
            expected = global_row // self.plan.num_streams
            if stream.rows != expected:
                raise RuntimeError(f"loader stream {stream_id} is at row {stream.rows}, global row "
                                   f"{global_row} needs row {expected}: inconsistent loader state")
            row = stream.next_row()
            yield {"global_row": global_row, "stream": stream_id, "batch": row.batch,
                   "samples": row.samples, "state": stream.state_dict(),
                   "events": stream.take_events()}


class ShardBatchLoader:
    """This data-parallel rank's micro-batches of packed rows, one global batch per `next_step`.

    `dp_group` is the data-parallel process group used to gather the state of every rank's
    streams when saving (None in a single process).
    """

    def __init__(self, plan: LoaderPlan, *, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_workers: int, prefetch_rows: int = 4,
                 dp_group=None, log_events: bool = True):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("schedule.global_batch_size must divide into micro-batches x "
                             "data-parallel ranks")
        self.plan = plan
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_workers = num_workers
        self.prefetch_rows = prefetch_rows
        self.dp_group = dp_group
        self.log_events = log_events
        self.rows_consumed = 0  # global rows of all steps so far
        self.stream_states: dict[int, dict] = {}
        # (source, key@shard, epoch) of every sample of the last step, per row in batch order.
        self.last_step_rows: list[list[tuple[str, str, int]]] = []
        self._iterator = None
        self._loader: DataLoader | None = None
        self._progress_dir: str | None = None
        self._assign()

    def _assign(self) -> None:
        self.local_streams, self.workers = stream_assignment(
            num_streams=self.plan.num_streams, dp_rank=self.dp_rank, dp_size=self.dp_size,
            num_workers=self.num_workers)
        if self.num_workers and self.workers != self.num_workers:
            log.warning("data.num_workers=%d does not divide this rank's %d streams "
                        "(data.num_streams=%d / %d data-parallel ranks): using %d workers",
                        self.num_workers, len(self.local_streams), self.plan.num_streams,
                        self.dp_size, self.workers)

    @property
    def last_step_samples(self) -> list[tuple[str, str, int]]:
        """(source, key@shard, epoch) of every sample of the last step, in batch order."""
        return [sample for row in self.last_step_rows for sample in row]

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    # ----------------------------------------------------------------------------- rows
    def _start(self) -> None:
        local_first = self.rows_consumed // self.dp_size
        use_workers = self.num_workers > 0
        if use_workers:
            self._progress_dir = tempfile.mkdtemp(prefix="keye-loader-")
        dataset = ShardRowDataset(
            self.plan, dp_rank=self.dp_rank, dp_size=self.dp_size,
            local_streams=self.local_streams, workers=self.workers if use_workers else 1,
            first_row=local_first,
            states={s: self.stream_states.get(s) for s in self.local_streams},
            progress_dir=self._progress_dir)
        self._loader = DataLoader(
            dataset, batch_size=None, num_workers=self.workers if use_workers else 0,
            prefetch_factor=max(1, self.prefetch_rows) if use_workers else None,
            persistent_workers=False)
        self._iterator = iter(self._loader)
        self._expected_row = self._first_row = local_first

    def _next_item(self) -> dict:
        if self._iterator is None:
            self._start()
        try:
            item = next(self._iterator)
        except RuntimeError as error:
            if "DataLoader worker" in str(error) and ("exited unexpectedly" in str(error)
                                                      or "killed by signal" in str(error)):
                raise LoaderWorkerError(self._death_report(str(error))) from error
            raise
        global_row = self.dp_rank + self.dp_size * self._expected_row
        if item["global_row"] != global_row:
            raise RuntimeError(f"loader: expected global row {global_row}, a worker sent "
                               f"{item['global_row']}")
        self._expected_row += 1
        return item

    def _death_report(self, message: str) -> str:
        pids = {int(p) for p in re.findall(r"\d+", message.split("exited")[0].split("killed")[0])}
        workers = getattr(self._iterator, "_workers", [])
        dead = [i for i, w in enumerate(workers) if w.pid in pids]
        if not dead:
            dead = [(self._expected_row - self._first_row) % max(self.workers, 1)]
        reports = []
        for worker in dead:
            path = os.path.join(self._progress_dir or "", f"worker{worker}.txt")
            try:
                with open(path) as f:
                    doing = f.read().strip() or "nothing yet"
            except OSError:
                doing = "unknown (no progress record)"
            reports.append(f"worker {worker} was reading {doing}")
        return (f"data loader worker died (data-parallel rank {self.dp_rank}): "
                f"{'; '.join(reports)}. ({message})")

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the next global batch for this rank; advances the position."""
        batches = []
        self.last_step_rows = []
        names = [s.name for s in self.plan.sources]
        for _ in range(self.num_microbatches):
            rows = []
            for _ in range(self.micro_batch_size):
                item = self._next_item()
                rows.append(item["batch"])
                self.stream_states[item["stream"]] = item["state"]
                self.last_step_rows.append([(names[q], key, epoch)
                                            for q, key, epoch in item["samples"]])
                if self.log_events:
                    for event in item["events"]:
                        log.warning("%s", event)
            batches.append(concat_rows(rows))
        self.rows_consumed += self.global_batch_size
        return batches

    # ---------------------------------------------------------------------------- state
    def _gather(self, value):
        if self.dp_size == 1 or not dist.is_initialized():
            return [value]
        out = [None] * self.dp_size
        dist.all_gather_object(out, value, group=self.dp_group)
        return out

    def local_state_dict(self) -> dict:
        """This rank's part of the position (its streams only); `merge_states` joins the parts."""
        streams: list[dict | None] = [None] * self.plan.num_streams
        for s in self.local_streams:
            streams[s] = self.stream_states.get(s)
        return {
            "version": STATE_VERSION,
            "kind": "shards",
            "seed": self.plan.seed,
            "num_streams": self.plan.num_streams,
            "sources": [[s.name, s.total] for s in self.plan.sources],
            "rows_consumed": self.rows_consumed,
            "streams": streams,
        }

    def state_dict(self) -> dict:
        """The global loader position (collective over the data-parallel group)."""
        return merge_states(self._gather(self.local_state_dict()))

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (any data-parallel size that divides the streams)."""
        if state.get("kind") != "shards":
            raise ValueError("data.kind: the checkpoint's loader state is not a shard loader's "
                             f"(it has {sorted(state)})")
        saved_sources = [list(s) for s in state["sources"]]
        current = [[s.name, s.total] for s in self.plan.sources]
        if saved_sources != current:
            raise ValueError(f"data.sources: the checkpoint was trained on {saved_sources} "
                             f"(name, samples), the config gives {current}")
        if int(state["seed"]) != self.plan.seed:
            raise ValueError(f"data.seed: the checkpoint's loader used seed {state['seed']}, "
                             f"the config says {self.plan.seed}")
        rows = int(state["rows_consumed"])
        if rows % self.dp_size:
            raise ValueError(f"parallel.data: {rows} consumed rows cannot be split over "
                             f"{self.dp_size} data-parallel ranks")
        self.close()
        self.plan = _with_streams(self.plan, int(state["num_streams"]))
        self._assign()
        self.rows_consumed = rows
        self.stream_states = {s: st for s, st in enumerate(state["streams"]) if st is not None}

    # -------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """Skip and overlong counts per source over all data-parallel ranks (collective)."""
        mine = {s: self.stream_states[s]["faults"] for s in self.local_streams
                if s in self.stream_states}
        totals: dict[str, dict[str, int]] = {}
        for part in self._gather(mine):
            for faults in part.values():
                for name, counts in faults.items():
                    slot = totals.setdefault(name, dict.fromkeys(FAULT_KINDS, 0))
                    for kind, value in counts.items():
                        slot[kind] = slot.get(kind, 0) + int(value)
        out: dict[str, float] = {}
        for kind in FAULT_KINDS:
            out[f"data/{kind}"] = float(sum(c.get(kind, 0) for c in totals.values()))
        for name, counts in totals.items():
            skipped = counts.get("bad_record", 0) + counts.get("bad_media", 0)
            out[f"data/skipped/{name}"] = float(skipped)
        return out

    def close(self) -> None:
        """Stop the workers (a later `next_step` starts them again from the current state)."""
        self._iterator = None
        self._loader = None
        if self._progress_dir:
            shutil.rmtree(self._progress_dir, ignore_errors=True)
            self._progress_dir = None


def merge_states(parts: list[dict]) -> dict:
    """One global loader state from the per-rank parts of one step (each stream from its owner)."""
    merged = dict(parts[0])
    streams = list(merged["streams"])
    for part in parts[1:]:
        if part["rows_consumed"] != merged["rows_consumed"]:
            raise ValueError(f"loader states of different steps: rows {part['rows_consumed']} "
                             f"and {merged['rows_consumed']}")
        for s, state in enumerate(part["streams"]):
            if state is not None:
                streams[s] = state
    merged["streams"] = streams
    return merged


def _with_streams(plan: LoaderPlan, num_streams: int) -> LoaderPlan:
    return replace(plan, num_streams=num_streams)


def build_shard_loader(config, *, dp_rank: int, dp_size: int, context_parallel: int = 1,
                       dp_group=None, log_events: bool = True) -> ShardBatchLoader:
    """The shard loader a `TrainConfig` with `data.kind: shards` asks for."""
    from megatron_keye.data.media.image import TOKEN_PIXELS
    from megatron_keye.data.shards.corpus import resolve_sources, tokenizer_fingerprint
    from megatron_keye.data.shards.encode import EncoderSettings
    from megatron_keye.data.text.tokenizer import KeyeTokenizer

    data = config.data
    for name in ("num_workers", "num_streams", "prefetch_rows"):
        if getattr(data, name) < 0:
            raise ValueError(f"data.{name}: must be >= 0, got {getattr(data, name)}")
    if data.shuffle_buffer < 1:
        raise ValueError(f"data.shuffle_buffer: must be >= 1, got {data.shuffle_buffer}")
    tokenizer = KeyeTokenizer.from_dir(data.tokenizer) if data.tokenizer else KeyeTokenizer.default()
    defaults = EncoderSettings()
    encoder = EncoderSettings(
        tokenizer=data.tokenizer, seed=data.seed,
        image=replace(defaults.image, max_pixels=max(data.image_max_tokens, 4) * TOKEN_PIXELS),
        video=replace(defaults.video, total_pixels=data.video_max_tokens * TOKEN_PIXELS))
    settings = RowSettings(seq_length=data.seq_length, pad_multiple=2 * context_parallel,
                           overlong=data.overlong, open_rows=data.pack_open_rows,
                           shuffle_buffer=data.shuffle_buffer if data.shuffle else 1,
                           ids=tokenizer.vision,
                           pad_id=tokenizer.pad_id, ref_logprobs=data.ref_logprobs)
    num_streams = data.num_streams or dp_size * max(data.num_workers, 1)
    sources = resolve_sources(data.sources, tokenizer_sha256=tokenizer_fingerprint(data.tokenizer))
    plan = LoaderPlan(sources=tuple(sources), seed=data.seed,
                      num_streams=num_streams, row=settings, encoder_factory=encoder,
                      shuffle=data.shuffle)
    return ShardBatchLoader(plan, global_batch_size=config.schedule.global_batch_size,
                            micro_batch_size=config.schedule.micro_batch_size, dp_rank=dp_rank,
                            dp_size=dp_size, num_workers=data.num_workers,
                            prefetch_rows=data.prefetch_rows, dp_group=dp_group,
                            log_events=log_events)
