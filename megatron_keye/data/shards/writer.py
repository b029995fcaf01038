"""`megatron-keye preprocess`: JSONL corpora + media files -> WebDataset tar shards + index.

Lines are converted (`sources.convert_line`: parse, resolve and probe media, tokenize) by a pool of
worker processes, in chunks, and written by this process strictly in input order, so the shards
depend only on the input and the settings, never on the worker count. Shards are byte-identical
across runs: members sorted per sample, mtime 0, uid/gid 0, fixed user/group names and mode,
canonical JSON.

Unusable lines go to `NAME.rejects.jsonl` (file, line, reason, detail) and never stop the run.

Resuming: each shard is written as `.tmp`, flushed, renamed, and then a completion marker
(`.NAME.progress/NNNNNN.json`: the shard's size and sha256, the input position after it, its
rejects and per-source stats) is written atomically. A new run with the same settings keeps the
shards whose markers and files agree and continues from the input position of the last one; the
index (`NAME.index.json`) and the rejects file are written at the very end, then the progress
directory is removed. A run whose index exists is complete and is not redone (`overwrite` to
start over).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_keye.data.shards import format as fmt
from megatron_keye.data.shards.sources import RejectError, SourceOptions, convert_line

log = logging.getLogger(__name__)

TAR_MTIME = 0
TAR_MODE = 0o444
TAR_USER = "keye"
TAR_HEADER_BYTES = 512  # per member; data padded to 512-byte blocks


@dataclass(kw_only=True, frozen=True)
class InputSpec:
    """One JSONL file and the source name its records carry."""

    path: Path
    source: str

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """`PATH` (source = file stem) or `SOURCE=PATH`."""
        source, sep, path = text.partition("=")
        if not sep:
            source, path = Path(text).stem.split(".")[0], text
        if not source:
            raise ValueError(f"--input {text!r}: empty source name")
        return cls(path=Path(path), source=source)


@dataclass(kw_only=True)
class PreprocessConfig:
    inputs: list[InputSpec]  # JSONL files, processed in this order
    output_dir: Path
    name: str = "train"  # shard names: NAME-000000.tar, NAME.index.json
    media_root: Path | None = None  # media paths are relative to it (default: each input's dir)
    tokenizer: str | None = None  # tokenizer dir or tokenizer.json (default: the shipped tiny one)
    max_samples_per_shard: int = 10_000
    # A shard closes before its members would pass this (at least one sample per shard; the
    # tar's end blocks add up to 10 KiB more).
    max_bytes_per_shard: int = 1 << 30
    max_tokens: int | None = None  # reject records whose token estimate exceeds it
    workers: int = 0  # conversion processes; 0 = in this process
    chunk_lines: int = 16  # lines per worker task
    progress: bool = True  # a progress bar on stderr
    overwrite: bool = False  # delete an earlier complete or partial output of NAME first
    stop_after_shards: int | None = None  # stop (resumably) after writing this many new shards

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("preprocess: at least one --input is needed")
        if not self.name or any(c in self.name for c in "./\\ "):
            raise ValueError(f"preprocess: --name {self.name!r} must be non-empty without '.', "
                             "'/' or spaces")
        for field_name in ("max_samples_per_shard", "max_bytes_per_shard", "chunk_lines"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"preprocess: {field_name} must be >= 1")
        if self.workers < 0:
            raise ValueError("preprocess: workers must be >= 0")


@dataclass(kw_only=True)
class PreprocessSummary:
    complete: bool
    shards: list[fmt.ShardInfo]
    sources: dict[str, fmt.SourceStats]
    rejects: Counter = field(default_factory=Counter)  # reason -> count
    resumed_shards: int = 0
    lines: int = 0  # input lines read in this run
    seconds: float = 0.0

    def table(self) -> str:
        """A readable end-of-run summary."""
        lines = [f"{'source':<20} {'samples':>9} {'text tok':>11} {'est. tok':>12} "
                 f"{'images':>7} {'videos':>7}"]
        for name, stats in sorted(self.sources.items()):
            lines.append(f"{name:<20} {stats.samples:>9} {stats.text_tokens:>11} "
                         f"{stats.token_estimate:>12} {stats.images:>7} {stats.videos:>7}")
        total = sum(s.samples for s in self.shards)
        size = sum(s.bytes for s in self.shards)
        lines.append(f"shards: {len(self.shards)} ({self.resumed_shards} kept from an earlier "
                     f"run), samples: {total}, bytes: {size}")
        rejected = sum(self.rejects.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(self.rejects.items()))
        lines.append(f"rejected: {rejected}" + (f" ({detail})" if detail else ""))
        rate = self.lines / self.seconds if self.seconds > 0 else 0.0
        lines.append(f"{'complete' if self.complete else 'stopped early (resumable)'}; "
                     f"{self.lines} lines in {self.seconds:.1f}s ({rate:.0f} lines/s)")
        return "\n".join(lines)


# ---- workers ------------------------------------------------------------------------------------

_worker_tokenizer = None


def _load_tokenizer(spec: str | None):
    from megatron_keye.data.text.tokenizer import KeyeTokenizer

    if spec is None:
        return KeyeTokenizer.default()
    path = Path(spec)
    return KeyeTokenizer.from_dir(path) if path.is_dir() else KeyeTokenizer.from_file(path)


def _init_worker(tokenizer_spec: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = _load_tokenizer(tokenizer_spec)


def _convert_chunk(chunk: list[tuple], options: dict[int, SourceOptions]) -> list[tuple]:
    """Convert (file_index, file, line_number, text) lines -> (position, sample | reject)."""
    out = []
    for file_index, file, line_number, text in chunk:
        key = f"{file_index:03d}_{line_number:09d}"
        try:
            record = convert_line(text, key=key, file=file, line_number=line_number,
                                  options=options[file_index], tokenizer=_worker_tokenizer)
            result = ("ok", record)
        except RejectError as error:
            result = ("reject", (error.reason, error.detail))
        except Exception as error:  # a bug in conversion must not stop a long run
            result = ("reject", (fmt.REJECT_INTERNAL, f"{type(error).__name__}: {error}"[:300]))
        out.append(((file_index, line_number), file, len(text), result))
    return out


# ---- reading the input --------------------------------------------------------------------------

def _read_lines(config: PreprocessConfig, start: tuple[int, int]) -> Iterator[tuple]:
    """(file_index, file, line_number, raw bytes) from the input position `start` on (lines end
    at b"\\n", numbered from 1 as `sed -n Np` counts; blank lines are skipped; bytes that are not
    UTF-8 make that line a bad_json reject)."""
    for file_index, spec in enumerate(config.inputs):
        if file_index < start[0]:
            continue
        with open(spec.path, "rb") as handle:
            for line_number, text in enumerate(handle, start=1):
                if (file_index, line_number) < start or not text.strip():
                    continue
                yield file_index, str(spec.path), line_number, text


def _chunks(lines: Iterator[tuple], size: int) -> Iterator[list[tuple]]:
    chunk: list[tuple] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _converted(config: PreprocessConfig, start: tuple[int, int]) -> Iterator[tuple]:
    """Conversion results in input order, through a bounded window of worker tasks."""
    options = {
        index: SourceOptions(source=spec.source, max_tokens=config.max_tokens,
                             media_root=config.media_root or spec.path.resolve().parent)
        for index, spec in enumerate(config.inputs)
    }
    chunks = _chunks(_read_lines(config, start), config.chunk_lines)
    if config.workers == 0:
        _init_worker(config.tokenizer)
        for chunk in chunks:
            yield from _convert_chunk(chunk, options)
        return
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork":
        # Import what every conversion uses once here, so forked workers inherit it instead of
        # each importing torch (via the media size rules), PIL and PyAV again.
        import av  # noqa: F401
        import PIL.Image  # noqa: F401

        import megatron_keye.data.media.image  # noqa: F401
        import megatron_keye.data.media.video  # noqa: F401
    with ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context(method),
                             initializer=_init_worker, initargs=(config.tokenizer,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_convert_chunk, chunk, options))
            if len(pending) >= 4 * config.workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# ---- writing shards -----------------------------------------------------------------------------

class _HashingFile:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def _member_bytes(sample: dict) -> int:
    return sum(TAR_HEADER_BYTES + -(-len(v) // 512) * 512
               for k, v in sample.items() if not k.startswith("_"))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fingerprint(config: PreprocessConfig) -> dict:
    """What must agree for a run to continue an earlier one's shards."""
    from megatron_keye.data.text.tokenizer import DEFAULT_TOKENIZER_DIR

    tokenizer = Path(config.tokenizer) if config.tokenizer else DEFAULT_TOKENIZER_DIR
    tokenizer_file = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    inputs = []
    for spec in config.inputs:
        stat = spec.path.stat()
        inputs.append({"path": str(spec.path.resolve()), "source": spec.source,
                       "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {
        "format_version": fmt.FORMAT_VERSION,
        "inputs": inputs,
        "media_root": str(config.media_root.resolve()) if config.media_root else None,
        "tokenizer_sha256": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest(),
        "max_samples_per_shard": config.max_samples_per_shard,
        "max_bytes_per_shard": config.max_bytes_per_shard,
        "max_tokens": config.max_tokens,
    }


class _Run:
    """The state of one preprocessing run over the output directory."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.out = Path(config.output_dir)
        self.progress_dir = self.out / f".{config.name}.progress"
        self.fingerprint = _fingerprint(config)
        self.markers: list[dict] = []

    def shard_path(self, number: int) -> Path:
        return self.out / fmt.shard_file_name(self.config.name, number)

    def shard_files(self) -> list[tuple[int, Path]]:
        """(number, path) of this corpus' shard files, finished or `.tmp`."""
        pattern = re.compile(re.escape(self.config.name) + r"-(\d{6})\.tar(\.tmp)?")
        found = []
        for path in self.out.iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found.append((-1 if match.group(2) else int(match.group(1)), path))
        return found

    def clear(self) -> None:
        for _, path in self.shard_files():
            path.unlink()
        for suffix in (".index.json", ".rejects.jsonl"):
            (self.out / f"{self.config.name}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(self.progress_dir, ignore_errors=True)

    def load_markers(self) -> None:
        """Keep the leading run of shards whose marker, settings and file agree."""
        settings = self.progress_dir / "settings.json"
        if settings.exists() and json.loads(settings.read_text()) != self.fingerprint:
            raise ValueError(
                f"preprocess: {self.out} holds a partial run of {self.config.name!r} with "
                f"other inputs or settings ({settings}); pass --overwrite to start over")
        number = 0
        while True:
            marker_file = self.progress_dir / f"{number:06d}.json"
            path = self.shard_path(number)
            if not marker_file.exists() or not path.exists():
                break
            marker = json.loads(marker_file.read_text())
            if path.stat().st_size != marker["shard"]["bytes"]:
                log.warning("preprocess: %s does not match its marker; rewriting from there", path)
                break
            self.markers.append(marker)
            number += 1
        for shard_number, stale in self.shard_files():
            if shard_number < 0 or shard_number >= number:
                stale.unlink()
        for stale in self.progress_dir.glob("*.json"):
            if stale.name != "settings.json" and int(stale.stem) >= number:
                stale.unlink()

    def start(self) -> tuple[int, int]:
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.progress_dir / "settings.json", fmt.dumps_json(self.fingerprint))
        if not self.markers:
            return (0, 0)
        return tuple(self.markers[-1]["next"])


class _ShardWriter:
    """Accumulates records into the current shard and closes it with its marker."""

    def __init__(self, run: _Run):
        import webdataset as wds

        self._wds = wds
        self.run = run
        self.number = len(run.markers)
        self.tar = None
        self.file: _HashingFile | None = None
        self.samples = 0
        self.bytes = 0
        self.rejects: list[dict] = []
        self.stats: dict[str, fmt.SourceStats] = {}

    def _open(self) -> None:
        tmp = self.run.shard_path(self.number).with_suffix(".tar.tmp")
        self.file = _HashingFile(tmp)
        self.tar = self._wds.TarWriter(self.file, user=TAR_USER, group=TAR_USER, mode=TAR_MODE,
                                       mtime=TAR_MTIME, encoder=False)

    def fits(self, sample: dict) -> bool:
        config = self.run.config
        return self.tar is None or (
            self.samples < config.max_samples_per_shard
            and self.bytes + _member_bytes(sample) <= config.max_bytes_per_shard)

    def add(self, record: fmt.Record, sample: dict) -> None:
        if self.tar is None:
            self._open()
        self.tar.write(sample)
        self.samples += 1
        self.bytes += _member_bytes(sample)
        self.stats.setdefault(record.source, fmt.SourceStats()).add(record)

    def abort(self) -> None:
        """Drop the open shard's file handle after an error (its `.tmp` is redone on resume)."""
        try:
            if self.tar is not None:
                self.tar.close()  # ends the tar stream into the .tmp file, which stays unused
        finally:
            if self.file is not None:
                self.file._file.close()
            self.tar = self.file = None

    def close(self, next_position: tuple[int, int]) -> dict | None:
        """Finish the open shard (if any) and write its marker; returns the marker."""
        if self.tar is None:
            return None
        self.tar.close()
        self.file.close()
        path = self.run.shard_path(self.number)
        os.replace(path.with_suffix(".tar.tmp"), path)
        info = fmt.ShardInfo(file=path.name, samples=self.samples, bytes=self.file.size,
                             sha256=self.file.sha256.hexdigest())
        marker = {"shard": vars(info), "next": list(next_position), "rejects": self.rejects,
                  "sources": {k: vars(v) for k, v in self.stats.items()}}
        _atomic_write(self.run.progress_dir / f"{self.number:06d}.json", fmt.dumps_json(marker))
        self.run.markers.append(marker)
        log.info("preprocess: wrote %s (%d samples, %d bytes)", path.name, self.samples,
                 self.file.size)
        self.number += 1
        self.tar = self.file = None
        self.samples = self.bytes = 0
        self.rejects, self.stats = [], {}
        return marker


def _progress_bar(config: PreprocessConfig, start: tuple[int, int]):
    if not config.progress:
        return None
    from tqdm import tqdm

    total = sum(spec.path.stat().st_size for spec in config.inputs)
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"preprocess {config.name}",
                file=sys.stderr, mininterval=1.0)


def _finish(run: _Run, tail_rejects: list[dict]) -> None:
    """Write the rejects file and the index (last), then drop the progress directory."""
    config = run.config
    rejects = [r for marker in run.markers for r in marker["rejects"]] + tail_rejects
    lines = b"".join(fmt.dumps_json(r) + b"\n" for r in rejects)
    _atomic_write(run.out / f"{config.name}.rejects.jsonl", lines)
    sources: dict[str, fmt.SourceStats] = {}
    for marker in run.markers:
        for name, values in marker["sources"].items():
            total = sources.setdefault(name, fmt.SourceStats())
            total.samples += values["samples"]
            total.text_tokens += values["text_tokens"]
            total.token_estimate += values["token_estimate"]
            total.images += values["images"]
            total.videos += values["videos"]
            for kind, count in values["kinds"].items():
                total.kinds[kind] = total.kinds.get(kind, 0) + count
    for stats in sources.values():
        stats.kinds = dict(sorted(stats.kinds.items()))
    index = fmt.ShardIndex(
        name=config.name, shards=[fmt.ShardInfo(**m["shard"]) for m in run.markers],
        sources=sources, rejects=len(rejects),
        tokenizer_sha256=run.fingerprint["tokenizer_sha256"])
    _atomic_write(fmt.index_path(run.out, config.name),
                  json.dumps(fmt.index_to_json(index), indent=1, sort_keys=True).encode() + b"\n")
    shutil.rmtree(run.progress_dir, ignore_errors=True)


def _summary_from(run: _Run, *, complete: bool, resumed: int, lines: int, started: float,
                  tail_rejects: list[dict]) -> PreprocessSummary:
    sources: dict[str, fmt.SourceStats] = {}
    reasons: Counter = Counter()
    for marker in run.markers:
        reasons.update(r["reason"] for r in marker["rejects"])
        for name, values in marker["sources"].items():
            stats = sources.setdefault(name, fmt.SourceStats())
            for attr in ("samples", "text_tokens", "token_estimate", "images", "videos"):
                setattr(stats, attr, getattr(stats, attr) + values[attr])
    reasons.update(r["reason"] for r in tail_rejects)
    return PreprocessSummary(
        complete=complete, shards=[fmt.ShardInfo(**m["shard"]) for m in run.markers],
        sources=sources, rejects=reasons, resumed_shards=resumed, lines=lines,
        seconds=time.perf_counter() - started)


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Convert the inputs into shards (resuming a partial run); see the module docstring."""
    started = time.perf_counter()
    for spec in config.inputs:
        if not spec.path.is_file():
            raise FileNotFoundError(f"preprocess: input {spec.path} does not exist")
    run = _Run(config)
    run.out.mkdir(parents=True, exist_ok=True)
    index_file = fmt.index_path(run.out, config.name)
    if config.overwrite:
        run.clear()
    elif index_file.exists():
        index = fmt.read_index(index_file)
        log.info("preprocess: %s is complete; nothing to do (--overwrite to redo)", index_file)
        rejects_file = run.out / f"{config.name}.rejects.jsonl"
        reasons = Counter(json.loads(line)["reason"] for line in
                          rejects_file.read_text().splitlines()) if rejects_file.exists() else Counter()
        return PreprocessSummary(complete=True, shards=index.shards, sources=index.sources,
                                 rejects=reasons, seconds=time.perf_counter() - started)
    run.load_markers()
    resumed = len(run.markers)
    start = run.start()
    if resumed:
        log.info("preprocess: resuming after %d shard(s) at input %s line %d", resumed,
                 config.inputs[start[0]].path, start[1])
    writer = _ShardWriter(run)
    bar = _progress_bar(config, start)
    lines = 0
    new_shards = 0
    results = _converted(config, start)
    try:
        for position, file, size, (status, payload) in results:
            lines += 1
            if bar is not None:
                bar.update(size)
            if status == "reject":
                reason, detail = payload
                writer.rejects.append({"file": file, "line": position[1], "reason": reason,
                                       "detail": detail,
                                       "source": config.inputs[position[0]].source})
                continue
            sample = fmt.record_to_sample(payload)
            if not writer.fits(sample):
                writer.close(position)
                new_shards += 1
                if config.stop_after_shards is not None and new_shards >= config.stop_after_shards:
                    return _summary_from(run, complete=False, resumed=resumed, lines=lines,
                                         started=started, tail_rejects=[])
            writer.add(payload, sample)
    except BaseException:
        writer.abort()
        raise
    finally:
        results.close()  # shuts the worker pool down
        if bar is not None:
            bar.close()
    end = (len(config.inputs), 0)
    tail = writer.rejects if writer.tar is None else []
    writer.close(end)
    _finish(run, tail)
    return _summary_from(run, complete=True, resumed=resumed, lines=lines, started=started,
                         tail_rejects=tail)


# ---- command line -------------------------------------------------------------------------------

def cli_main(argv: list[str]) -> int:
    """`megatron-keye preprocess ...` and `tools/preprocess_data.py ...`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="megatron-keye preprocess",
        description="Convert JSONL corpora (conversations, ms-swift messages, captions, text, "
                    "preference/reward pairs) and their media into WebDataset shards + index. "
                    "Re-running resumes an interrupted run; the output is byte-identical.")
    parser.add_argument("--input", action="append", required=True, metavar="[SOURCE=]PATH",
                        help="a JSONL file (repeatable); SOURCE names its records' source "
                             "(default: the file name's stem)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--name", default="train", help="shard prefix: NAME-000000.tar")
    parser.add_argument("--media-root", default=None,
                        help="media paths are relative to it (default: each input's directory)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory or tokenizer.json (default: the tiny one)")
    parser.add_argument("--max-samples-per-shard", type=int, default=10_000)
    parser.add_argument("--max-shard-bytes", type=float, default=float(1 << 30),
                        help="close a shard before it would pass this many bytes")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="reject records whose estimated tokens (text + vision) exceed it")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--chunk-lines", type=int, default=16)
    parser.add_argument("--overwrite", action="store_true", help="discard earlier output of NAME")
    parser.add_argument("--stop-after-shards", type=int, default=None,
                        help="write at most this many new shards, then stop (resumable)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = PreprocessConfig(
        inputs=[InputSpec.parse(text) for text in args.input],
        output_dir=Path(args.output_dir), name=args.name,
        media_root=Path(args.media_root) if args.media_root else None, tokenizer=args.tokenizer,
        max_samples_per_shard=args.max_samples_per_shard,
        max_bytes_per_shard=int(args.max_shard_bytes), max_tokens=args.max_tokens,
        workers=args.workers, chunk_lines=args.chunk_lines, progress=not args.no_progress,
        overwrite=args.overwrite, stop_after_shards=args.stop_after_shards)
    summary = preprocess(config)
    print(summary.table())
    print(f"output: {config.output_dir}/{config.name}-*.tar, {config.name}.index.json, "
          f"{config.name}.rejects.jsonl")
    return 0
