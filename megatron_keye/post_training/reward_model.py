"""A reward model served next to a sampler: scores of generated responses (RL loop and RFT).

The reward model is a native checkpoint of a value model (`model.output_head: value`, trained
with the `reward` head, `heads/reward.py`). Its model config comes from the checkpoint's saved
run config (`generate_cli.generation_config`), so its architecture may differ from the policy's
(depth, width, no vision tower), but it must read the same token ids: `reward_model_config`
refuses a checkpoint that is not a value model, or whose vocabulary, tokenizer or vision token
ids differ from the policy's, naming the field that points at it.

`RewardModelScorer` builds it as frozen chunks on the parallel state already initialized (the
trainer's or the sampler's TP×PP layout, `runtime.frozen_model.build_frozen_model`) and scores
(prompt, response) items the way the reward model saw its training samples: the prompt's tokens
as rendered for the policy (chat template, media, hint) followed by the response, closed with
the assistant turn's end token `<|im_end|>` (a trailing stop token is replaced by it, a cut
response gets it appended), and r = the score at the sample's last non-pad token
(`heads/reward.last_token_mask`, what the reward head trains). Items are packed into rows
(`rl_batch.rollout_rows`: M-RoPE ids, media, one segment per item), each data-parallel rank
forwards a contiguous share of the rows in micro-batches (`runtime/step.ModelStep`, forward
only), and the scores are broadcast from the last pipeline stage over the pipeline and tensor
groups and gathered over the data group, so every rank returns the same list.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_keye.config.loading import ConfigError
from megatron_keye.config.schema import TrainConfig
from megatron_keye.post_training.generation import Prompt
from megatron_keye.post_training.rl_batch import (
    Rollout,
    local_microbatches,
    pack_rows,
    rollout_rows,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ the config
def reward_model_config(saved: Mapping, *, checkpoint: str, field: str, policy_model: Mapping,
                        tokenizer, tensor: int, pipeline: int,
                        precision: str | None = None) -> TrainConfig:
    """The run config to build the reward model from: the checkpoint's saved model, the
    sampler's TP×PP layout (and `precision` when given).

    Raises ConfigError naming `field` (the option that points at the checkpoint) when the
    checkpoint is not a value model or reads other token ids than the policy: another
    `model.vocab_size` or image/video token id, or another tokenizer (compared by vocabulary
    when the reward model's `data.tokenizer` directory is here; the shipped tokenizer when
    unset)."""
    from megatron_keye.post_training.generate_cli import generation_config

    model = dict(saved.get("model") or {})
    if model.get("output_head", "lm") != "value":
        raise ConfigError(field, f"{checkpoint} is not a reward model: its model.output_head is "
                          f"{model.get('output_head', 'lm')!r}, a reward model is a value model "
                          f"(model.output_head: value, trained with stage.loss_head: reward)")
    for key in ("vocab_size", "image_token_id", "video_token_id"):
        theirs, ours = model.get(key), policy_model.get(key)
        if theirs is not None and ours is not None and theirs != ours:
            raise ConfigError(field, f"{checkpoint} has model.{key}={theirs}, the policy "
                              f"{ours}: the reward model must share the policy's tokenizer")
    reason = _tokenizer_mismatch((saved.get("data") or {}).get("tokenizer"), tokenizer)
    if reason:
        raise ConfigError(field, f"{checkpoint}: {reason}; the reward model must share the "
                          f"policy's tokenizer")
    saved = dict(saved)
    if precision is not None:
        saved["precision"] = precision
    return generation_config(saved, tensor=tensor, pipeline=pipeline)


def _tokenizer_mismatch(directory: str | None, tokenizer) -> str | None:
    """Why the reward model's tokenizer (a directory, None = the shipped one) differs from
    `tokenizer` (a KeyeTokenizer), or None when they agree or cannot be compared."""
    from megatron_keye.data.text.tokenizer import KeyeTokenizer

    if directory and not (Path(directory) / "tokenizer.json").is_file():
        log.warning("reward model tokenizer %s is not here: compared by vocabulary size and "
                    "vision token ids only", directory)
        return None
    theirs = KeyeTokenizer.from_dir(directory) if directory else KeyeTokenizer.default()
    if theirs.backend.get_vocab(with_added_tokens=True) != tokenizer.backend.get_vocab(
            with_added_tokens=True):
        return (f"its tokenizer ({theirs.source}) has another vocabulary than the policy's "
                f"({tokenizer.source})")
    if (theirs.eos_id, theirs.pad_id) != (tokenizer.eos_id, tokenizer.pad_id):
        return (f"its tokenizer's eos/pad ids {theirs.eos_id}/{theirs.pad_id} differ from the "
                f"policy's {tokenizer.eos_id}/{tokenizer.pad_id}")
    return None


def has_vision(config: TrainConfig) -> bool:
    """Whether a model config has a vision tower (can read images and videos)."""
    return config.model.vision is not None


# ------------------------------------------------------------------------------ the items
def closed_response(tokens: Sequence[int], *, eos_id: int, stop_ids: Sequence[int],
                    vision_pads: Sequence[int] = ()) -> list[int]:
    """A response as the reward model's training samples end: cut before any image/video pad
    token (the prompt holds no media for it), trailing stop tokens dropped, `eos_id`
    (`<|im_end|>`, the assistant turn's end) appended."""
    out = list(tokens)
    for i, token in enumerate(out):
        if token in vision_pads:
            out = out[:i]
            break
    while out and out[-1] in stop_ids:
        out.pop()
    return out + [eos_id]


class _CollectSampleScores:
    """A forward-only loss head: keeps each micro-batch's last-token score per sample slot."""

    name = "reward-model-scores"

    def __init__(self, *, pad_token_id: int, num_slots: int):
        self.pad_token_id = pad_token_id
        self.num_slots = num_slots
        self.scores: list[torch.Tensor] = []

    def __call__(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]):
        from megatron_keye.data.batch import SAMPLE_IDS
        from megatron_keye.heads.reward import last_token_mask
        from megatron_keye.heads.sequence import sample_sums

        if output.dim() != 2:
            raise ValueError(f"reward model: expected per-token scores [s, b], got shape "
                             f"{tuple(output.shape)}")
        last = last_token_mask(batch, num_slots=self.num_slots, pad_token_id=self.pad_token_id,
                               group=None).float()
        per_token = output.detach().float().transpose(0, 1)
        self.scores.append(sample_sums(per_token * last, batch.get(SAMPLE_IDS),
                                       num_slots=self.num_slots, group=None).cpu())
        zero = output.new_zeros(())
        return zero, torch.zeros((), dtype=torch.int, device=zero.device), {}


# ----------------------------------------------------------------------------- the scorer
class RewardModelScorer:
    """A frozen reward model on this rank's TP×PP layout; `score` gives every rank all scores."""

    def __init__(self, *, checkpoint: str, config: TrainConfig, device: torch.device,
                 layout: dict, tokenizer, micro_batch_size: int,
                 row_length: int | None = None):
        from megatron_keye.runtime.frozen_model import build_frozen_model

        if parallel_state.get_context_parallel_world_size() != 1:
            raise ValueError("reward model: scoring runs without context parallelism")
        self.config = config
        self.device = device
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.row_length = row_length  # packed row length; None: the longest item, rounded up
        self.stop_ids = (tokenizer.eos_id, tokenizer.pad_id)
        self.vision_pads = (config.model.image_token_id, config.model.video_token_id)
        with torch.random.fork_rng():  # the fresh draw before loading leaves the run's RNG be
            self.chunks = build_frozen_model(config, device, layout=layout, source=checkpoint)

    @classmethod
    def from_checkpoint(cls, checkpoint: str, *, field: str, policy_model: Mapping, tokenizer,
                        device: torch.device, layout: dict, micro_batch_size: int,
                        precision: str | None = None,
                        row_length: int | None = None) -> RewardModelScorer:
        """Check the checkpoint against the policy (`reward_model_config`) and load it on the
        initialized parallel state's TP×PP layout."""
        from megatron_keye.config import validate
        from megatron_keye.post_training.generate_cli import saved_config

        try:
            saved = saved_config(checkpoint)
        except FileNotFoundError as err:
            raise ConfigError(field, str(err)) from None
        config = reward_model_config(
            saved, checkpoint=checkpoint, field=field, policy_model=policy_model,
            tokenizer=tokenizer, tensor=parallel_state.get_tensor_model_parallel_world_size(),
            pipeline=parallel_state.get_pipeline_model_parallel_world_size(),
            precision=precision)
        # scoring runs its own micro-batches: the reward model's training batch sizes do not
        # apply (they might not even divide this world's data-parallel size)
        config.schedule.micro_batch_size = micro_batch_size
        config.schedule.global_batch_size = (
            micro_batch_size * parallel_state.get_data_parallel_world_size())
        try:
            validate(config, dist.get_world_size())
        except ValueError as err:
            raise ConfigError(field, f"{checkpoint} does not fit this layout: {err}") from None
        return cls(checkpoint=checkpoint, config=config, device=device, layout=layout,
                   tokenizer=tokenizer, micro_batch_size=micro_batch_size,
                   row_length=row_length)

    @property
    def reads_media(self) -> bool:
        return has_vision(self.config)

    def score(self, items: Sequence[tuple[Prompt, Sequence[int]]]) -> list[float]:
        """r(prompt, response) of every item (see the module docstring); identical on every
        rank, whichever rank's share an item was."""
        if not items:
            return []
        rollouts = []
        for i, (prompt, response) in enumerate(items):
            if prompt.vision_grids is not None and not self.reads_media:
                raise ValueError(f"reward model: item {i} has images/videos but the reward "
                                 f"model has no vision tower")
            closed = closed_response(response, eos_id=self.tokenizer.eos_id,
                                     stop_ids=self.stop_ids, vision_pads=self.vision_pads)
            rollouts.append(Rollout(prompt=prompt, response=closed, logprobs=[0.0] * len(closed),
                                    prompt_index=i))
        longest = max(r.length for r in rollouts)
        length = self.row_length or -(-longest // 8) * 8
        if longest > length:
            raise ValueError(f"reward model: an item of {longest} tokens exceeds the scoring "
                             f"row length {length}")
        placement = pack_rows([r.length for r in rollouts], length)
        slots = max(len(row) for row in placement) + 1  # + the tail padding
        dp_size = parallel_state.get_data_parallel_world_size()
        multiple = dp_size * self.micro_batch_size
        rows = -(-len(placement) // multiple) * multiple
        batch = rollout_rows(rollouts, seq_length=length, pad_id=self.tokenizer.pad_id,
                             num_rows=rows)
        microbatches = local_microbatches(
            batch, dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp_size,
            micro_batch=self.micro_batch_size, image_token_id=self.config.model.image_token_id,
            video_token_id=self.config.model.video_token_id)
        table = self._forward(microbatches, slots=slots, length=length)
        if dp_size > 1:
            parts = [torch.empty_like(table) for _ in range(dp_size)]
            dist.all_gather(parts, table, group=parallel_state.get_data_parallel_group())
            table = torch.cat(parts)
        table = table.cpu()
        return [float(table[r, s]) for r, row in enumerate(placement) for s in range(len(row))]

    def _forward(self, microbatches: list[dict], *, slots: int, length: int) -> torch.Tensor:
        """[this data rank's rows, slots] scores (float64, on the device) on every rank of this
        model-parallel group: the last stage computes them, the others receive them."""
        from megatron_keye.runtime.step import ModelStep

        collector = _CollectSampleScores(pad_token_id=self.tokenizer.pad_id, num_slots=slots)
        step = ModelStep(model=self.chunks, loss_head=collector, device=self.device,
                         seq_length=length, micro_batch_size=self.micro_batch_size)
        with torch.no_grad():
            step.run(microbatches, forward_only=True)
        rows = len(microbatches) * self.micro_batch_size
        table = torch.zeros((rows, slots), dtype=torch.float64, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            table.copy_(torch.cat(collector.scores).to(torch.float64))
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(table, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        if parallel_state.get_tensor_model_parallel_world_size() > 1:  # one copy for all TP
            dist.broadcast(table, src=parallel_state.get_tensor_model_parallel_src_rank(),
                           group=parallel_state.get_tensor_model_parallel_group())
        return table


__all__ = ["RewardModelScorer", "closed_response", "has_vision", "reward_model_config"]
