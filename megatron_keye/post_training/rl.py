"""The RL loop on the training runtime: prompts → rollouts → rewards → hints → GSPO updates.

A `stage.loss_head: gspo` stage is trained by the ordinary `Trainer` (so `megatron-keye train`
and `megatron-keye pipeline` run it as any other stage, e.g. after MPO); its data loader is a
`RolloutSource`, which produces each global batch from the policy being trained:

1. Prompt stream: the `rl.prompts` JSONL (`prompt`, reference `answer`, optional `mode`, `hints`,
   `image(s)`/`video(s)`, `source`), `rl.prompts_per_rollout` prompts per rollout batch, in a
   seeded order per epoch; with `rl.filter_solved` a prompt whose trained group passed 0% or 100%
   leaves the later epochs.
2. Rollouts: `generation.generate` on the trainer's own model chunks (same TP/PP layout, KV
   cache), `rl.group_size` samples per prompt, each data-parallel rank generating a contiguous
   share of the prompts; every rank then holds every row (all-gathered over data ranks). Each
   generation call k of rollout batch n samples with seed (rl.seed, n, k), so a rollout batch
   depends only on the weights, the prompt position and the seed — not on the layout.
3. Rewards: the weighted terms of `rl.reward_terms`/`rl.reward_weights` (`rewards.combine`):
   verifiers, and `model`, the score of the reward model `rl.reward_model`, held frozen next to
   the policy on the same layout and run after every generation call on each rollout's prompt
   (as rendered, hint included) and response (`reward_model.RewardModelScorer`; every rank gets
   the same scores); a rollout whose reward reaches `rl.success_reward` is a success.
4. Progressive hints: the prompts whose G rollouts all failed are generated again with hint L1,
   those still failing with L2, … (batched per level, `hints.hinted_query`); each prompt is
   trained on the lowest level that succeeded (else the last one tried), and the per-level table
   (`hints.HintTable`) is logged and checkpointed.
5. Group advantages (`rewards.group_advantages`) → packed rows with π_old and advantages
   (`rl_batch.py`) → `rl.minibatches` global batches, one optimizer step each with the gspo head.

The source's `state_dict` (in the checkpoint with the trainer's) holds the prompt order and
position, the rollout counter (the seeds), the hint table, running reward statistics, the
filtered prompts and the not yet trained minibatches of the current rollout batch, so a run
killed anywhere resumes to the same rollouts and losses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_keye.config.loading import ConfigError
from megatron_keye.config.schema import TrainConfig
from megatron_keye.post_training.generation import GenerationOptions, Prompt, generate
from megatron_keye.post_training.hints import HintTable, hinted_query, sample_hints
from megatron_keye.post_training.rewards import (
    RewardSpec,
    combine,
    group_advantages,
)
from megatron_keye.post_training.rl_batch import Rollout, local_microbatches, split_minibatches
from megatron_keye.post_training.rl_config import check_rl_config

log = logging.getLogger(__name__)

# Per-rank wall-clock metrics (logged, not checkpointed).
TIMINGS = ("rl/rollout_s", "rl/reward_s", "rl/generated_tokens_per_s")


# ------------------------------------------------------------------------------ prompt file
@dataclass(kw_only=True)
class PromptRecord:
    """One line of the prompt file."""

    index: int
    text: str
    sample: dict  # the whole record: answer, mode, tolerances (what the verifiers read)
    images: list[str]
    videos: list[str]
    hints: list[str]
    source: str


def _paths(record: Mapping, single: str, plural: str, root: Path) -> list[str]:
    items = record.get(plural) or ([record[single]] if record.get(single) else [])
    if isinstance(items, str):
        items = [items]
    return [str(Path(item) if Path(item).is_absolute() else root / item) for item in items]


def read_prompt_file(path: str) -> list[PromptRecord]:
    """The prompt records of a JSONL file; a bad line is a ValueError naming file and line."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"rl.prompts: {path} does not exist")
    records = []
    with open(file) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err})") from None
            text = record.get("prompt", record.get("question"))
            if not isinstance(text, str) or "answer" not in record:
                raise ValueError(f"{where}: a prompt record needs a 'prompt' string and an "
                                 f"'answer'")
            record["answer"] = str(record["answer"])
            try:
                hints = sample_hints(record)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            records.append(PromptRecord(
                index=len(records), text=text, sample=record, hints=hints,
                images=_paths(record, "image", "images", file.parent),
                videos=_paths(record, "video", "videos", file.parent),
                source=str(record.get("source", file.stem))))
    if not records:
        raise ValueError(f"rl.prompts: {path} holds no prompts")
    return records


def _derived_seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


# ---------------------------------------------------------------------------- the source
class RolloutSource:
    """The data loader of an RL stage: each rollout batch's minibatches, one per step."""

    def __init__(self, config: TrainConfig, *, trainer, records: list[PromptRecord] | None = None,
                 tokenizer=None):
        from megatron_keye.data.text.tokenizer import KeyeTokenizer
        from megatron_keye.post_training.prompts import media_configs

        if not config.rl.prompts:
            raise ConfigError("rl.prompts", "a gspo stage generates its batches from a prompt "
                              "file (JSONL); set rl.prompts")
        check_rl_config(config)
        self.config = config
        self.rl = config.rl
        self.trainer = trainer
        self.records = records if records is not None else read_prompt_file(config.rl.prompts)
        self.tokenizer = tokenizer or (KeyeTokenizer.from_dir(config.data.tokenizer)
                                       if config.data.tokenizer else KeyeTokenizer.default())
        self.spec = RewardSpec(weights=dict(zip(self.rl.reward_terms, self.rl.reward_weights,
                                                strict=True)))
        self.image_config, self.video_config = media_configs(
            {"data": {"image_max_tokens": config.data.image_max_tokens,
                      "video_max_tokens": config.data.video_max_tokens}})
        self._prompts: dict[tuple[int, int], Prompt] = {}
        self.reward_model = self._reward_model() if "model" in self.spec.weights else None
        # checkpointed state
        self.rollouts_done = 0
        self.epoch = 0
        self.position = 0
        self.order: list[int] = []
        self.retired: set[int] = set()
        self.hint_table = HintTable()
        self.totals = {"rollouts": 0, "reward_sum": 0.0, "prompts": 0}
        self.pending: list[dict[str, torch.Tensor]] = []
        self.last_metrics: dict[str, float] = {}
        self.last_rollouts: list[Rollout] = []
        self.timings: dict[str, float] = {}
        self.cut_responses = 0  # responses cut before a sampled image/video pad token

    def _reward_model(self):
        """The frozen reward model on the trainer's layout; refuses prompts with media when it
        has no vision tower (naming the field and the first such prompt)."""
        from megatron_keye.config import config_to_dict
        from megatron_keye.post_training.reward_model import RewardModelScorer

        scorer = RewardModelScorer.from_checkpoint(
            self.rl.reward_model, field="rl.reward_model",
            policy_model=config_to_dict(self.config)["model"], tokenizer=self.tokenizer,
            device=self.trainer.device, layout=self.trainer.layout(),
            micro_batch_size=self.config.schedule.micro_batch_size,
            precision=self.config.precision,
            row_length=-(-(self.config.data.seq_length + 1) // 8) * 8)
        with_media = next((r for r in self.records if r.images or r.videos), None)
        if with_media is not None and not scorer.reads_media:
            raise ConfigError("rl.reward_model", f"{self.rl.reward_model} has no vision tower "
                              f"but rl.prompts line {with_media.index + 1} has images/videos")
        return scorer

    # ----------------------------------------------------------------------- prompt stream
    def _new_epoch_order(self) -> list[int]:
        active = [r.index for r in self.records if r.index not in self.retired]
        if not active:
            raise ValueError("rl.filter_solved: every prompt has been filtered out (each "
                             "passed 0% or 100% of its rollouts)")
        if self.rl.shuffle:
            random.Random(_derived_seed("rl-order", self.rl.seed, self.epoch)).shuffle(active)
        return active

    def _take(self, count: int) -> list[int]:
        taken = []
        while len(taken) < count:
            if self.position >= len(self.order):
                if self.order:
                    self.epoch += 1
                self.order, self.position = self._new_epoch_order(), 0
            taken.append(self.order[self.position])
            self.position += 1
        return taken

    def prompt(self, index: int, level: int) -> Prompt:
        """Prompt `index` with its level-`level` hint, tokenized through the front end."""
        from megatron_keye.post_training.prompts import build_prompt

        key = (index, level)
        if key not in self._prompts:
            record = self.records[index]
            text = hinted_query(record.text, record.hints, level)
            prompt = build_prompt(text, tokenizer=self.tokenizer, images=record.images,
                                  videos=record.videos, chat=self.rl.chat,
                                  image_config=self.image_config,
                                  video_config=self.video_config)
            need = prompt.tokens.numel() + self.rl.max_new_tokens
            if need > self.config.data.seq_length:
                raise ValueError(f"rl.prompts line {index + 1} (hint level {level}): "
                                 f"{prompt.tokens.numel()} prompt tokens + rl.max_new_tokens="
                                 f"{self.rl.max_new_tokens} exceed data.seq_length="
                                 f"{self.config.data.seq_length}")
            self._prompts[key] = prompt
        return self._prompts[key]

    # ---------------------------------------------------------------------------- rollouts
    def _generate(self, prompts: list[Prompt], *, call: int):
        """Every row of `prompts` × G (all ranks hold all rows); data ranks split the prompts."""
        trainer = self.trainer
        trainer.finish_param_sync()
        options = GenerationOptions(
            max_new_tokens=self.rl.max_new_tokens, temperature=self.rl.temperature,
            top_p=self.rl.top_p, seed=_derived_seed("rl", self.rl.seed, self.rollouts_done, call),
            stop_token_ids=(self.tokenizer.eos_id, self.tokenizer.pad_id),
            samples_per_prompt=self.rl.group_size)
        dp_size = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        share = -(-len(prompts) // dp_size)
        first = min(dp_rank * share, len(prompts))
        mine = prompts[first : first + share]
        rows = []
        if mine:
            result = generate(trainer.model, mine, options, pad_id=self.tokenizer.pad_id,
                              first_row=first * self.rl.group_size)
            rows = [(first * self.rl.group_size + r, result.row_tokens(r),
                     result.logprobs[r, : int(result.lengths[r])].tolist())
                    for r in range(result.tokens.size(0))]
        if dp_size > 1:
            gathered = [None] * dp_size
            dist.all_gather_object(gathered, rows, group=parallel_state.get_data_parallel_group())
            rows = sorted((row for part in gathered for row in part), key=lambda row: row[0])
        return [self._cut_at_vision_pads(tokens, logprobs) for _, tokens, logprobs in rows]

    def _cut_at_vision_pads(self, tokens: list[int], logprobs: list[float]):
        """A response ends before any image/video pad token it sampled: such a token would ask
        the model for vision embeddings the prompt does not have (counted in the metrics)."""
        pads = (self.config.model.image_token_id, self.config.model.video_token_id)
        for i, token in enumerate(tokens):
            if token in pads:
                self.cut_responses += 1
                return tokens[:i], logprobs[:i]
        return tokens, logprobs

    def _score(self, record: PromptRecord, prompt: Prompt, level: int, rows,
               model_scores: list[float] | None) -> list[Rollout]:
        out = []
        for k, (tokens, logprobs) in enumerate(rows):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            reward, terms = combine(text, record.sample, self.spec,
                                    model_score=None if model_scores is None else model_scores[k])
            out.append(Rollout(prompt=prompt, response=tokens, logprobs=logprobs,
                               prompt_index=record.index, level=level, source=record.source,
                               text=text, reward=reward, terms=terms))
        return out

    def rollout_batch(self) -> list[Rollout]:
        """Generate, score and escalate one rollout batch; returns the rollouts trained on."""
        rl = self.rl
        indices = self._take(rl.prompts_per_rollout)
        g = rl.group_size
        chosen: dict[int, list[Rollout]] = {}
        active = list(range(len(indices)))
        level = 0
        rollout_s = reward_s = 0.0
        generated = 0
        while active:
            start = time.perf_counter()
            prompts = [self.prompt(indices[i], level) for i in active]
            rows = self._generate(prompts, call=level)
            rollout_s += time.perf_counter() - start
            generated += sum(len(t) for t, _ in rows)
            start = time.perf_counter()
            model_scores = None
            if self.reward_model is not None:  # the prompts as rendered, hints included
                model_scores = self.reward_model.score(
                    [(prompts[n // g], tokens) for n, (tokens, _) in enumerate(rows)])
            still = []
            for k, i in enumerate(active):
                record = self.records[indices[i]]
                share = slice(k * g, (k + 1) * g)
                scored = self._score(record, prompts[k], level, rows[share],
                                     None if model_scores is None else model_scores[share])
                solved = any(r.reward >= rl.success_reward for r in scored)
                self.hint_table.tried[level] += 1
                self.hint_table.solved[level] += int(solved)
                chosen[i] = scored
                if not solved:
                    if rl.hints and level < len(record.hints):
                        still.append(i)
                    else:
                        self.hint_table.unsolved += 1
            reward_s += time.perf_counter() - start
            active, level = still, level + 1
        rollouts = []
        for i in range(len(indices)):
            group = chosen[i]
            advantages = group_advantages([r.reward for r in group], std_floor=rl.std_floor,
                                          scale=rl.scale_advantages)
            for rollout, advantage in zip(group, advantages, strict=True):
                rollout.advantage = advantage
            passed = sum(r.reward >= rl.success_reward for r in group)
            if rl.filter_solved and passed in (0, len(group)):
                self.retired.add(indices[i])
            rollouts.extend(group)
        self.timings = {"rollout_s": rollout_s, "reward_s": reward_s,
                        "generated_tokens": float(generated)}
        self._account(rollouts)
        self.rollouts_done += 1
        return rollouts

    def _account(self, rollouts: list[Rollout]) -> None:
        rewards = [r.reward for r in rollouts]
        n = len(rewards)
        mean = sum(rewards) / n
        metrics = {
            "rl/reward_mean": mean,
            "rl/reward_std": math.sqrt(sum((x - mean) ** 2 for x in rewards) / n),
            "rl/response_length": sum(len(r.response) for r in rollouts) / n,
            "rl/hint_level_mean": sum(r.level for r in rollouts) / n,
            "rl/filtered_prompts": float(len(self.retired)),
            "rl/cut_at_vision_pad": float(self.cut_responses),
            "rl/rollout_s": self.timings["rollout_s"],
            "rl/reward_s": self.timings["reward_s"],
            "rl/generated_tokens_per_s": (self.timings["generated_tokens"]
                                          / max(self.timings["rollout_s"], 1e-9)),
        }
        for name in self.spec.weights:
            metrics[f"rl/term/{name}"] = sum(r.terms[name] for r in rollouts) / n
        for source in sorted({r.source for r in rollouts}):
            values = [r.reward for r in rollouts if r.source == source]
            m = sum(values) / len(values)
            metrics[f"rl/reward/{source}_mean"] = m
            metrics[f"rl/reward/{source}_std"] = math.sqrt(
                sum((x - m) ** 2 for x in values) / len(values))
        self.totals["rollouts"] += n
        self.totals["reward_sum"] += sum(rewards)
        self.totals["prompts"] += n // self.rl.group_size
        metrics["rl/reward_running_mean"] = self.totals["reward_sum"] / self.totals["rollouts"]
        self.last_metrics = metrics
        self.last_rollouts = rollouts
        if dist.get_rank() == 0:
            log.info("rollout batch %d: reward %.3f ± %.3f, response %.1f tokens\n%s",
                     self.rollouts_done, mean, metrics["rl/reward_std"],
                     metrics["rl/response_length"], self.hint_table.format())

    # ------------------------------------------------------------------- loader interface
    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This data-parallel rank's micro-batches of the next optimizer step."""
        cfg = self.config
        dp_size = parallel_state.get_data_parallel_world_size()
        if not self.pending:
            rollouts = self.rollout_batch()
            self.pending = split_minibatches(
                rollouts, minibatches=self.rl.minibatches, seq_length=cfg.data.seq_length,
                pad_id=self.tokenizer.pad_id,
                row_multiple=dp_size * cfg.schedule.micro_batch_size)
        batch = self.pending.pop(0)
        return local_microbatches(
            batch, dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp_size,
            micro_batch=cfg.schedule.micro_batch_size,
            image_token_id=cfg.model.image_token_id, video_token_id=cfg.model.video_token_id)

    def metrics(self) -> dict[str, float]:
        """The latest rollout batch's metrics (logged with every step's)."""
        return dict(self.last_metrics)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to draw the same rollouts (identical on every rank)."""
        return {"rollouts_done": self.rollouts_done, "epoch": self.epoch,
                "position": self.position, "order": list(self.order),
                "retired": sorted(self.retired), "hint_table": self.hint_table.state_dict(),
                "totals": dict(self.totals),
                # timings differ per rank; everything else is identical on every rank
                "metrics": {k: v for k, v in self.last_metrics.items() if k not in TIMINGS},
                "cut_responses": self.cut_responses,
                "pending": [dict(b) for b in self.pending]}

    def load_state_dict(self, state: Mapping) -> None:
        self.rollouts_done = int(state["rollouts_done"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.order = [int(i) for i in state["order"]]
        self.retired = {int(i) for i in state["retired"]}
        self.hint_table.load_state_dict(state["hint_table"])
        self.totals = dict(state["totals"])
        self.cut_responses = int(state.get("cut_responses", 0))
        self.last_metrics = dict(state.get("metrics") or {})
        self.pending = [dict(b) for b in state["pending"]]
