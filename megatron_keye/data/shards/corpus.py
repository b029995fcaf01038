"""`data.sources` → the shard files of each source and their sample counts.

A source's `path` is a `NAME.index.json` written by `megatron-keye preprocess` (shard names,
sample counts and sizes come from it, so nothing is opened at start-up), a directory holding
such indexes (all of them, in name order), or a tar pattern (`dir/x-{000000..000009}.tar`,
braces and globs) whose sample counts are read from the tar headers.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

from braceexpand import braceexpand

from megatron_keye.config.schema import DataSourceConfig
from megatron_keye.data.shards.format import read_index
from megatron_keye.data.shards.streams import SourceShards
from megatron_keye.data.shards.tar_reader import TarShard


def tokenizer_fingerprint(spec: str | None) -> str:
    """sha256 of the tokenizer.json a `data.tokenizer` value names (None: the shipped one), as
    the preprocess writer records it in each index."""
    from megatron_keye.data.text.tokenizer import DEFAULT_TOKENIZER_DIR

    path = Path(spec) if spec else DEFAULT_TOKENIZER_DIR
    path = path / "tokenizer.json" if path.is_dir() else path
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _from_indexes(indexes: list[Path], *, tokenizer_sha256: str | None,
                  where: str) -> tuple[list[str], list[int], list[int]]:
    shards, counts, sizes = [], [], []
    for index_file in indexes:
        index = read_index(index_file)
        if tokenizer_sha256 and index.tokenizer_sha256 and index.tokenizer_sha256 != tokenizer_sha256:
            raise ValueError(f"{where}: {index_file} was tokenized with another tokenizer than "
                             f"data.tokenizer names (sha256 {index.tokenizer_sha256[:12]}... vs "
                             f"{tokenizer_sha256[:12]}...); preprocess again or set data.tokenizer")
        for info in index.shards:
            shards.append(str(index_file.parent / info.file))
            counts.append(info.samples)
            sizes.append(info.bytes)
    return shards, counts, sizes


def resolve_source(config: DataSourceConfig, *, position: int,
                   tokenizer_sha256: str | None = None) -> SourceShards:
    """One configured source as shard files with sample counts; errors name the field."""
    where = f"data.sources[{position}].path"
    if not config.path:
        raise ValueError(f"{where}: required")
    if not config.weight >= 0:
        raise ValueError(f"data.sources[{position}].weight: must be >= 0, got {config.weight}")
    path = Path(config.path)
    name = config.name
    if path.is_file() and path.name.endswith(".index.json"):
        shards, counts, sizes = _from_indexes([path], tokenizer_sha256=tokenizer_sha256,
                                              where=where)
        name = name or path.name.removesuffix(".index.json")
    elif path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        if indexes:
            shards, counts, sizes = _from_indexes(indexes, tokenizer_sha256=tokenizer_sha256,
                                                  where=where)
        else:
            shards = sorted(str(p) for p in path.glob("*.tar"))
            counts, sizes = [len(TarShard(s, source=str(path))) for s in shards], []
        name = name or path.name
    else:
        shards = sorted({m for pattern in braceexpand(config.path) for m in glob.glob(pattern)})
        counts, sizes = [len(TarShard(s, source=config.path)) for s in shards], []
        name = name or config.path
    if not shards:
        raise FileNotFoundError(f"{where}: no shards at {config.path} (an index file, a "
                                f"directory of indexes or tars, or a tar pattern)")
    if sum(counts) == 0:
        raise ValueError(f"{where}: the shards at {config.path} hold no samples")
    return SourceShards(name=name, weight=float(config.weight), shards=tuple(shards),
                        counts=tuple(counts), sizes=tuple(sizes))


def resolve_sources(configs: list[DataSourceConfig], *,
                    tokenizer_sha256: str | None = None) -> list[SourceShards]:
    """Every configured source, resolved; names must be unique, and indexes must have been
    written with the tokenizer whose fingerprint is given (when given)."""
    if not configs:
        raise ValueError("data.sources: data.kind=shards needs at least one source")
    sources = [resolve_source(c, position=i, tokenizer_sha256=tokenizer_sha256)
               for i, c in enumerate(configs)]
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"data.sources: names {duplicates} appear twice; set data.sources[i].name")
    if sum(s.weight for s in sources) <= 0:
        raise ValueError("data.sources: the weights must not all be zero")
    return sources
