"""Text pretraining data: fixed-length samples cut from a token stream, and a resumable loader.

The loader is a pure function of (dataset, consumed samples): step k of a run reads global samples
[k * global_batch, (k + 1) * global_batch) of a seeded per-epoch permutation, and each
data-parallel rank takes its own contiguous part. Its whole state is `consumed_samples`, which the
checkpoint stores, so resuming (on any data-parallel size) continues with exactly the next samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_keye.config.schema import DataConfig
from megatron_keye.models.keye_vl.rope import text_position_ids


class TokenSequenceDataset:
    """Samples of `seq_length + 1` consecutive tokens (inputs and shifted labels)."""

    def __init__(self, tokens: torch.Tensor, *, seq_length: int, seed: int, shuffle: bool = True):
        if tokens.dim() != 1:
            raise ValueError("tokens must be a 1-D tensor of token ids")
        self.tokens = tokens.to(torch.int64)
        self.seq_length = seq_length
        self.num_samples = (self.tokens.numel() - 1) // seq_length
        if self.num_samples < 1:
            raise ValueError(
                f"data: the corpus has {self.tokens.numel()} tokens, fewer than one sample of "
                f"data.seq_length={seq_length} + 1"
            )
        self.seed = seed
        self.shuffle = shuffle
        self._epoch_order: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epoch_order:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._epoch_order = {epoch: torch.randperm(self.num_samples, generator=g)}
            else:
                self._epoch_order = {epoch: torch.arange(self.num_samples)}
        return self._epoch_order[epoch]

    def sample(self, global_index: int) -> torch.Tensor:
        """Tokens [seq_length + 1] of the sample at a global (multi-epoch) position."""
        epoch, offset = divmod(global_index, self.num_samples)
        start = int(self._order(epoch)[offset]) * self.seq_length
        return self.tokens[start : start + self.seq_length + 1]


class TextBatchLoader:
    """This data-parallel rank's micro-batches, one global batch per `next_step()` call."""

    def __init__(
        self,
        dataset: TokenSequenceDataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch must divide into micro-batches x data-parallel ranks")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = 0

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the next global batch for this rank; advances the position."""
        per_rank = self.global_batch_size // self.dp_size
        first = self.consumed_samples + self.dp_rank * per_rank
        batches = []
        for m in range(self.num_microbatches):
            start = first + m * self.micro_batch_size
            rows = torch.stack(
                [self.dataset.sample(i) for i in range(start, start + self.micro_batch_size)]
            )
            batches.append(make_text_batch(rows))
        self.consumed_samples += self.global_batch_size
        return batches

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def make_text_batch(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """A model batch from [b, s + 1] token rows: inputs, shifted labels, mask, M-RoPE ids."""
    tokens = rows[:, :-1].contiguous()
    labels = rows[:, 1:].contiguous()
    b, s = tokens.shape
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_weights": torch.ones(b, s, dtype=torch.float32),
        "position_ids": text_position_ids(b, s),
    }


def build_text_dataset(config: DataConfig) -> TokenSequenceDataset:
    """Tokenize the configured corpus into a `TokenSequenceDataset`."""
    from megatron_keye.data.text.tokenizer import KeyeTokenizer

    tokenizer = (
        KeyeTokenizer.from_dir(config.tokenizer) if config.tokenizer else KeyeTokenizer.default()
    )
    if config.kind == "synthetic_text":
        from megatron_keye.data.text.synthetic_text import generate_documents

        documents = generate_documents(config.num_documents, seed=config.seed)
    elif config.kind == "text_jsonl":
        documents = list(read_jsonl_texts(config.path))
    else:
        raise ValueError(f"data.kind: {config.kind!r} is not a text corpus")
    eod = tokenizer.special_token_id("<|endoftext|>")
    stream: list[int] = []
    for doc in documents:
        stream.extend(tokenizer.encode(doc))
        stream.append(eod)
    return TokenSequenceDataset(
        torch.tensor(stream, dtype=torch.int64),
        seq_length=config.seq_length,
        seed=config.seed,
        shuffle=config.shuffle,
    )


def read_jsonl_texts(path: str | None):
    """Yield the "text" field of every line of a JSONL file or a directory of them."""
    if not path:
        raise ValueError("data.path: required for data.kind=text_jsonl")
    root = Path(path)
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else [root]
    if not files or not all(f.exists() for f in files):
        raise FileNotFoundError(f"data.path: no JSONL files at {path}")
    for file in files:
        with open(file) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError) as err:
                    raise ValueError(f"{file}:{number}: not a JSON object with a 'text' field") from err
