"""Typed run configuration: schema, recipe loading with dotted overrides, validation."""

from megatron_keye.config.loading import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
)
from megatron_keye.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    StageConfig,
    TrainConfig,
)
from megatron_keye.config.validation import data_parallel_size, num_microbatches, validate

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "StageConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "data_parallel_size",
    "load_config",
    "num_microbatches",
    "parse_overrides",
    "validate",
]
