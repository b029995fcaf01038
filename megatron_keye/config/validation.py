"""Start-up validation: refuse every layout that cannot work, naming the field to change.

Runs before any process group exists, so a bad layout fails in a second on every rank with the
same message instead of deadlocking or silently computing something else hours later.
"""

from __future__ import annotations

import re

from megatron_keye.config.loading import ConfigError
from megatron_keye.config.schema import ParallelConfig, TrainConfig


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """The data-parallel degree implied by the world size (checked by `validate`)."""
    model_parallel = parallel.tensor * parallel.pipeline * parallel.context
    return parallel.data if parallel.data > 0 else max(world_size // model_parallel, 1)


def num_microbatches(config: TrainConfig, world_size: int) -> int:
    """Micro-batches per data-parallel rank per step."""
    dp = data_parallel_size(config.parallel, world_size)
    return config.schedule.global_batch_size // (config.schedule.micro_batch_size * dp)


def validate(config: TrainConfig, world_size: int) -> None:
    """Raise `ConfigError` for the first setting that cannot work at this world size."""
    _validate_parallel(config, world_size)
    _validate_model(config)
    _validate_schedule(config, world_size)
    _validate_shard_data(config, world_size)
    if config.stage.loss_head == "gspo":
        from megatron_keye.post_training.rl_config import check_rl_config

        check_rl_config(config)


def _validate_parallel(config: TrainConfig, world_size: int) -> None:
    p = config.parallel
    for name in ("tensor", "pipeline", "virtual_pipeline", "context"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}")
    if p.data < 0:
        raise ConfigError("parallel.data", f"must be >= 0 (0 = derive), got {p.data}")
    model_parallel = p.tensor * p.pipeline * p.context
    dp = data_parallel_size(config.parallel, world_size)
    if model_parallel * dp != world_size:
        raise ConfigError(
            "parallel",
            f"world size {world_size} != tensor({p.tensor}) x pipeline({p.pipeline}) x "
            f"context({p.context}) x data({dp}); change parallel.tensor/pipeline/context/data "
            f"or the number of processes",
        )
    if p.virtual_pipeline > 1 and p.pipeline < 2:
        raise ConfigError(
            "parallel.virtual_pipeline", "virtual pipeline stages need parallel.pipeline >= 2"
        )
    if p.context > 1 and p.cp_comm == "a2a+p2p" and (
        p.cp_a2a_size < 2 or p.cp_a2a_size >= p.context or p.context % p.cp_a2a_size
    ):
        raise ConfigError(
            "parallel.cp_a2a_size",
            f"{p.cp_a2a_size} must divide parallel.context ({p.context}) and lie strictly "
            f"between 1 and it under parallel.cp_comm=a2a+p2p",
        )
    if p.overlap_param_gather and not p.distributed_optimizer:
        raise ConfigError(
            "parallel.overlap_param_gather", "needs parallel.distributed_optimizer=true"
        )
    _validate_zero_stage(config)



def _validate_zero_stage(config: TrainConfig) -> None:
    """zero_stage 2/3 (torch FSDP2 via megatron-core) and the settings it replaces or lacks."""
    p = config.parallel
    if p.zero_stage not in (1, 2, 3):
        raise ConfigError("parallel.zero_stage", f"must be 1, 2 or 3, got {p.zero_stage!r}")
    if p.zero_stage == 1:
        return
    if not p.distributed_optimizer:
        raise ConfigError(
            "parallel.distributed_optimizer",
            f"false (no ZeRO) contradicts parallel.zero_stage={p.zero_stage}, which shards the "
            f"optimizer state as well; set it true, or zero_stage=1 for unsharded DDP",
        )
    for name, why in (
        ("overlap_param_gather", "FSDP2 gathers each layer's parameters just in time itself"),
        ("overlap_grad_reduce", "FSDP2 reduce-scatters each layer's gradients in backward itself"),
    ):
        if getattr(p, name):
            raise ConfigError(
                f"parallel.{name}",
                f"applies to zero_stage 1 only ({why}); set it false under "
                f"parallel.zero_stage={p.zero_stage}",
            )
    if p.pipeline > 1:
        raise ConfigError(
            "parallel.pipeline",
            f"parallel.zero_stage={p.zero_stage} runs without pipeline parallelism "
            f"(megatron-core's FSDP2 wrapper shards whole chunks per step; untested with "
            f"pipeline schedules); use pipeline=1 or zero_stage=1",
        )

def _validate_model(config: TrainConfig) -> None:
    m, p = config.model, config.parallel
    # The reward head reads the value head's scores; every other head reads logits.
    if (config.stage.loss_head == "reward") != (m.output_head == "value"):
        raise ConfigError(
            "model.output_head",
            f"{m.output_head!r} does not fit stage.loss_head={config.stage.loss_head!r} (the "
            f"reward head needs model.output_head=value, the others need lm)",
        )
    if (config.stage.loss_head == "reward" and config.data.kind == "shards"
            and config.stage.head.reward.pad_token_id is None):
        # Packed samples end in the tokenizer's pad tokens; the score must skip them.
        raise ConfigError(
            "stage.head.reward.pad_token_id",
            "required with data.kind=shards: the id the loader pads samples with (the "
            "tokenizer's pad token, e.g. 151643 for <|endoftext|> of Qwen2 tokenizers)",
        )
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            "model.num_query_groups",
            f"{m.num_query_groups} does not divide model.num_attention_heads "
            f"({m.num_attention_heads})",
        )
    if m.num_attention_heads % p.tensor:
        raise ConfigError(
            "parallel.tensor",
            f"{p.tensor} does not divide model.num_attention_heads ({m.num_attention_heads})",
        )
    if m.num_query_groups % p.tensor:
        raise ConfigError(
            "parallel.tensor",
            f"{p.tensor} does not divide model.num_query_groups ({m.num_query_groups})",
        )
    if m.ffn_hidden_size % p.tensor:
        raise ConfigError(
            "parallel.tensor",
            f"{p.tensor} does not divide model.ffn_hidden_size ({m.ffn_hidden_size})",
        )
    if m.vocab_size < 1:
        raise ConfigError("model.vocab_size", f"must be >= 1, got {m.vocab_size}")
    if m.make_vocab_size_divisible_by < 1:
        raise ConfigError(
            "model.make_vocab_size_divisible_by",
            f"must be >= 1, got {m.make_vocab_size_divisible_by}",
        )
    if m.padded_vocab_size % p.tensor:
        raise ConfigError(
            "model.make_vocab_size_divisible_by",
            f"the padded vocabulary ({m.padded_vocab_size} = model.vocab_size {m.vocab_size} "
            f"rounded up to a multiple of {m.make_vocab_size_divisible_by}) is not divisible "
            f"by parallel.tensor ({p.tensor}); use a multiple of {p.tensor}",
        )
    stages = p.pipeline * p.virtual_pipeline
    if m.num_layers % stages:
        raise ConfigError(
            "parallel.pipeline",
            f"model.num_layers ({m.num_layers}) is not divisible by parallel.pipeline x "
            f"parallel.virtual_pipeline ({p.pipeline} x {p.virtual_pipeline})",
        )
    if m.head_dim % 2:
        raise ConfigError("model.head_dim", f"must be even for rotary embeddings, got {m.head_dim}")
    if len(m.mrope_section) != 3 or sum(m.mrope_section) != m.head_dim // 2:
        raise ConfigError(
            "model.mrope_section",
            f"needs three sections (t, h, w) summing to model.head_dim/2 = {m.head_dim // 2}, "
            f"got {m.mrope_section}",
        )
    seq = config.data.seq_length
    if p.sequence_parallel and p.tensor > 1 and seq % p.tensor:
        raise ConfigError(
            "data.seq_length",
            f"{seq} is not divisible by parallel.tensor ({p.tensor}) under sequence parallel",
        )
    if p.context > 1:
        _validate_context_parallel(config)
    if m.vision is not None:
        check_vision_config(m.vision, p)
        # Placeholder tokens must be real vocabulary rows (they are replaced by embeddings).
        for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                     "vision_end_token_id"):
            value = getattr(m, name)
            if not 0 <= value < m.vocab_size:
                raise ConfigError(f"model.{name}", f"{value} is outside the vocabulary "
                                  f"(model.vocab_size={m.vocab_size})")
        if m.image_token_id == m.video_token_id:
            raise ConfigError("model.video_token_id", "must differ from model.image_token_id")
    if m.attention_backend in ("flash", "te"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "model.attention_backend",
                f"{m.attention_backend!r} needs CUDA; use 'auto' or 'sdpa' on this machine",
            )


def check_vision_config(vision, parallel) -> None:
    """Raise a ConfigError naming the field when the vision shapes cannot work at this layout
    (start-up validation, and the vision modules' constructors)."""
    tp = parallel.tensor
    for field, value in (("num_attention_heads", vision.num_attention_heads),
                         ("ffn_hidden_size", vision.ffn_hidden_size),
                         ("hidden_size", vision.hidden_size)):
        if value % tp:
            raise ConfigError(f"model.vision.{field}",
                              f"{value} is not divisible by parallel.tensor={tp}")
    if vision.hidden_size % vision.num_attention_heads:
        raise ConfigError(
            "model.vision.hidden_size",
            f"{vision.hidden_size} is not divisible by model.vision.num_attention_heads="
            f"{vision.num_attention_heads}",
        )
    if vision.head_dim % 4:
        raise ConfigError(
            "model.vision.hidden_size",
            f"head_dim {vision.head_dim} (hidden_size / num_attention_heads) must be a multiple "
            f"of 4 for the 2D RoPE (height and width halves of head_dim / 2)",
        )


def _validate_context_parallel(config: TrainConfig) -> None:
    m, p, seq = config.model, config.parallel, config.data.seq_length
    sp = p.sequence_parallel and p.tensor > 1
    multiple = 2 * p.context * (p.tensor if sp else 1)
    if seq % multiple:
        raise ConfigError(
            "data.seq_length",
            f"{seq} is not divisible by 2 x parallel.context"
            + (" x parallel.tensor (sequence parallel)" if sp else "")
            + f" = {multiple}: each rank holds two of 2 x context zig-zag chunks",
        )
    a2a = {"a2a": p.context, "a2a+p2p": p.cp_a2a_size}.get(p.cp_comm)
    if a2a:
        kv_heads, heads = m.num_query_groups // p.tensor, m.num_attention_heads // p.tensor
        if kv_heads % a2a or heads % a2a:
            raise ConfigError(
                "parallel.cp_comm",
                f"{p.cp_comm} splits the {kv_heads} KV heads (and {heads} query heads) per "
                f"tensor-parallel rank over {a2a} ranks, which does not divide them; use "
                f"parallel.cp_comm=p2p or allgather, or a smaller parallel.context",
            )


def _validate_schedule(config: TrainConfig, world_size: int) -> None:
    s, p = config.schedule, config.parallel
    dp = data_parallel_size(config.parallel, world_size)
    if s.micro_batch_size < 1 or s.global_batch_size < 1:
        raise ConfigError("schedule.micro_batch_size", "batch sizes must be >= 1")
    if s.global_batch_size % (s.micro_batch_size * dp):
        raise ConfigError(
            "schedule.global_batch_size",
            f"{s.global_batch_size} is not divisible by schedule.micro_batch_size "
            f"({s.micro_batch_size}) x data-parallel size ({dp})",
        )
    m = num_microbatches(config, world_size)
    if p.virtual_pipeline > 1 and m % p.pipeline:
        raise ConfigError(
            "schedule.global_batch_size",
            f"interleaved pipelining needs the micro-batches per data-parallel rank ({m}) to be "
            f"a multiple of parallel.pipeline ({p.pipeline})",
        )
    if s.train_iters < 0:
        raise ConfigError("schedule.train_iters", f"must be >= 0, got {s.train_iters}")
    if s.warmup_iters > s.train_iters:
        raise ConfigError(
            "schedule.warmup_iters",
            f"{s.warmup_iters} exceeds schedule.train_iters ({s.train_iters})",
        )
    if s.decay_style == "wsd" and not 0 < s.wsd_decay_iters <= s.train_iters - s.warmup_iters:
        raise ConfigError(
            "schedule.wsd_decay_iters",
            f"must be in (0, train_iters - warmup_iters] under decay_style=wsd, "
            f"got {s.wsd_decay_iters}",
        )
    if config.stage.max_consecutive_nonfinite < 1:
        raise ConfigError("stage.max_consecutive_nonfinite", "must be >= 1")
    ck = config.checkpoint
    if ck.load_weights_only and ck.load_state == "weights+optimizer":
        raise ConfigError(
            "checkpoint.load_state",
            "weights+optimizer contradicts checkpoint.load_weights_only=true (which means "
            "load_state=weights); set one of them",
        )
    if 0 < s.exit_at_iteration < s.train_iters and not config.checkpoint.save_dir:
        raise ConfigError(
            "checkpoint.save_dir",
            f"required with schedule.exit_at_iteration={s.exit_at_iteration}: stopping early "
            f"without a checkpoint would lose the run",
        )


def _validate_shard_data(config: TrainConfig, world_size: int) -> None:
    """`data.kind: shards`: sources, weights and the loader's counts (files are checked later)."""
    d = config.data
    if d.kind != "shards":
        if d.ref_logprobs is not None:
            raise ConfigError("data.ref_logprobs", f"reference log-prob sidecars come with "
                                                   f"data.kind=shards, not {d.kind}")
        return
    if not d.sources:
        raise ConfigError("data.sources", "data.kind=shards needs at least one source "
                          "(path to a NAME.index.json, a directory or a tar pattern)")
    for i, source in enumerate(d.sources):
        if not source.path:
            raise ConfigError(f"data.sources[{i}].path", "is empty")
        if not source.weight >= 0 or source.weight == float("inf"):
            raise ConfigError(f"data.sources[{i}].weight", f"must be a finite number >= 0, "
                                                           f"got {source.weight}")
    if sum(s.weight for s in d.sources) <= 0:
        raise ConfigError("data.sources", "the weights must not all be zero")
    minimums = {"num_workers": 0, "num_streams": 0, "shuffle_buffer": 1, "pack_open_rows": 1,
                "prefetch_rows": 1, "image_max_tokens": 4, "video_max_tokens": 48}
    for name, least in minimums.items():
        if getattr(d, name) < least:
            raise ConfigError(f"data.{name}", f"must be >= {least}, got {getattr(d, name)}")
    if d.ref_logprobs is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", d.ref_logprobs):
        raise ConfigError("data.ref_logprobs", f"a sidecar tag of letters, digits, _ and -, got "
                                               f"{d.ref_logprobs!r}")
    dp = data_parallel_size(config.parallel, world_size)
    if d.num_streams and d.num_streams % dp:
        raise ConfigError("data.num_streams", f"{d.num_streams} is not a multiple of the "
                                              f"data-parallel size {dp}")
