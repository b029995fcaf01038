"""Choosing the next token from vocab-parallel logits: greedy, temperature, top-p.

Every tensor-parallel rank of the last pipeline stage gathers the full-vocabulary fp32 logits
of the last position and makes the same choice: greedy is an argmax (ties to the lower id),
sampling draws one uniform number per row from that row's own generator (seeded from the run
seed and the row's global index, identical on every rank) and inverts the cumulative
distribution: over the vocabulary in id order when top_p = 1 (no sort needed), over the top-p
nucleus in descending probability order otherwise. Choices therefore agree across TP ranks and across layouts, and a row's samples
do not depend on which other rows share its batch.

The log-probability kept for each chosen token is log softmax(z / T) at that token, computed
in fp32 on the sharded vocabulary (`heads/logprobs.py`, the function the RL loss heads use),
with T = 1 for greedy decoding. Top-p truncation is not part of it: this is the policy's
probability π(token), what GSPO's ratio needs as π_old.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_keye.heads.logprobs import vocab_parallel_logprobs


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    """How tokens are chosen. temperature 0 = greedy."""

    temperature: float = 0.0  # 0: greedy argmax; > 0: sample from softmax(logits / T)
    top_p: float = 1.0  # sample from the smallest set of tokens whose probability reaches top_p
    seed: int = 0  # with the row's global index, seeds that row's sampling generator

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def row_generator(seed: int, row: int) -> torch.Generator:
    """The sampling generator of global row `row` (same stream on every rank and layout)."""
    digest = hashlib.sha256(f"generate/{seed}/{row}".encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


def gather_vocab(logits: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Full-vocabulary [b, V] from this rank's columns [b, V/tp] (TP rank order)."""
    if group is None or dist.get_world_size(group) == 1:
        return logits
    pieces = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, logits.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)


def choose_tokens(
    local_logits: torch.Tensor,
    *,
    params: SamplingParams,
    generators: list[torch.Generator],
    vocab_size: int,
    group: dist.ProcessGroup | None,
    tp_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [b] int64, their log-probs [b] fp32) from vocab-parallel logits [b, V/tp].

    `generators` has one generator per row (unused when greedy); every TP rank must pass
    generators in the same state so the ranks agree.
    """
    local = local_logits.float()
    full = gather_vocab(local, group)[:, :vocab_size]
    if params.greedy:
        tokens = full.argmax(dim=-1)
    else:
        tokens = _sample_top_p(full / params.temperature, top_p=params.top_p,
                               generators=generators)
    temperature = 1.0 if params.greedy else params.temperature
    logprobs, _ = vocab_parallel_logprobs(local, tokens, vocab_size=vocab_size,
                                          temperature=temperature, group=group, tp_rank=tp_rank)
    return tokens, logprobs


def _sample_top_p(scaled: torch.Tensor, *, top_p: float,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `scaled` [b, V] from the top-p nucleus of softmax(scaled)."""
    if len(generators) != scaled.size(0):
        raise ValueError(f"sampling: {scaled.size(0)} rows but {len(generators)} generators")
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float64)
    draws = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    if top_p >= 1.0:  # the whole distribution: invert its cumulative sum in vocabulary order
        cumulative = probs.cumsum(dim=-1)
        target = draws.to(scaled.device) * cumulative[:, -1]
        index = torch.searchsorted(cumulative, target.unsqueeze(-1), right=True).squeeze(-1)
        return torch.minimum(index, torch.full_like(index, probs.size(-1) - 1))
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the better tokens
    keep = before < top_p
    keep[:, 0] = True  # the most likely token is always in the nucleus
    kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    cumulative = kept.cumsum(dim=-1)
    target = draws.to(scaled.device) * cumulative[:, -1]
    index = torch.searchsorted(cumulative, target.unsqueeze(-1), right=True).squeeze(-1)
    index = torch.minimum(index, keep.sum(dim=-1) - 1)  # never past the nucleus
    return order.gather(-1, index.unsqueeze(-1)).squeeze(-1)
