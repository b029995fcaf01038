"""The trainer's data loader for `data.kind`: fixed-length text rows or packed shard rows.

Both loaders serve one global batch per `next_step()` as this data-parallel rank's micro-batches
and keep their position in `state_dict()` for the checkpoint. Peers of one data-parallel rank
(tensor, context and pipeline parallel) build identical loaders and get identical batches.
"""

from __future__ import annotations

from megatron.core import parallel_state

from megatron_keye.config.loading import ConfigError
from megatron_keye.config.schema import TrainConfig
from megatron_keye.data.text.tokenizer import KeyeTokenizer


def build_data_loader(config: TrainConfig):
    """The loader `config.data.kind` names, for this rank's data-parallel coordinates."""
    check_tokenizer_fits(config)  # token ids must index real (not padded) embedding rows
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    if config.data.kind == "shards":
        from megatron_keye.data.shards.loader import build_shard_loader

        first_of_peers = (parallel_state.get_tensor_model_parallel_rank() == 0
                          and parallel_state.get_context_parallel_rank() == 0
                          and parallel_state.get_pipeline_model_parallel_rank() == 0)
        return build_shard_loader(
            config, dp_rank=dp_rank, dp_size=dp_size,
            context_parallel=parallel_state.get_context_parallel_world_size(),
            dp_group=parallel_state.get_data_parallel_group() if dp_size > 1 else None,
            log_events=first_of_peers)
    from megatron_keye.data.text.text_dataset import TextBatchLoader, build_text_dataset

    return TextBatchLoader(
        build_text_dataset(config.data),
        global_batch_size=config.schedule.global_batch_size,
        micro_batch_size=config.schedule.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )


def check_tokenizer_fits(config: TrainConfig, tokenizer=None) -> None:
    """Refuse a tokenizer with more ids than `model.vocab_size` (an error naming both).

    `tokenizer` defaults to the one `data.tokenizer` names (the shipped one when unset). Called
    by `build_data_loader`, before any batch is built: an id >= vocab_size would otherwise index
    a padded (masked) embedding row or crash inside the embedding lookup. It lives here, not in
    `config/validation.py`, because it reads the data's tokenizer (config/ stays below data/).
    """
    if tokenizer is None:
        source = config.data.tokenizer
        tokenizer = KeyeTokenizer.from_dir(source) if source else KeyeTokenizer.default()
    size = tokenizer.vocab_size
    if size > config.model.vocab_size:
        where = config.data.tokenizer or "the shipped default tokenizer"
        raise ConfigError(
            "model.vocab_size",
            f"the tokenizer ({where}, data.tokenizer) has {size} tokens but model.vocab_size is "
            f"{config.model.vocab_size}; use a model with at least {size} token ids",
        )
