"""Config loading, overrides, and the start-up validation that names the field to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_keye.config import ConfigError, config_to_dict, load_config, validate
from megatron_keye.config.loading import RECIPE_DIR, config_from_dict


def test_flavor_fills_model_and_fields_override():
    config = load_config(None, ["model.flavor=small", "model.num_layers=4"])
    assert config.model.hidden_size == 512
    assert config.model.num_layers == 4


def test_overrides_are_typed():
    config = load_config(None, ["parallel.tensor=2", "optimizer.lr=1e-4",
                                "parallel.sequence_parallel=true", "stage.freeze=[embedding.*]"])
    assert config.parallel.tensor == 2 and isinstance(config.optimizer.lr, float)
    assert config.parallel.sequence_parallel is True
    assert config.stage.freeze == ["embedding.*"]


@pytest.mark.parametrize("override,field", [
    ("parallel.tensr=2", "parallel.tensr"),
    ("parallel.tensor=two", "parallel.tensor"),
    ("schedule.decay_style=exp", "schedule.decay_style"),
    ("model.flavor=huge", "model.flavor"),
    ("parallel.sequence_parallel=1", "parallel.sequence_parallel"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'tensor'"):
        load_config(None, ["parallel.tensr=2"])


def test_resolved_config_round_trips():
    config = load_config("tiny-cpu-text", ["parallel.tensor=1"])
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("recipe", sorted(p.stem for p in Path(RECIPE_DIR).glob("*.yaml")))
def test_every_recipe_loads(recipe):
    config = load_config(recipe)
    p = config.parallel
    validate(config, p.tensor * p.pipeline * p.context * max(p.data, 1))


REFUSED = [
    # (overrides, world size, field named in the error)
    (["parallel.data=2"], 3, "parallel"),  # 3 != TP x PP x CP x DP
    (["parallel.tensor=2"], 3, "parallel"),  # 3 ranks cannot hold TP=2 replicas
    (["parallel.tensor=2", "parallel.data=1"], 4, "parallel"),
    (["parallel.tensor=3"], 3, "parallel.tensor"),  # 4 heads
    (["model.num_attention_heads=8", "model.num_query_groups=2", "parallel.tensor=4"], 4,
     "parallel.tensor"),  # 2 KV groups over TP=4
    (["model.num_attention_heads=4", "model.num_query_groups=3"], 1, "model.num_query_groups"),
    (["parallel.pipeline=3"], 3, "parallel.pipeline"),  # 4 layers
    (["parallel.pipeline=2", "parallel.virtual_pipeline=4"], 2, "parallel.pipeline"),
    (["parallel.virtual_pipeline=2"], 1, "parallel.virtual_pipeline"),  # VPP without PP
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "data.seq_length=33"], 2,
     "data.seq_length"),
    (["parallel.context=2", "data.seq_length=66"], 2, "data.seq_length"),  # 2 x CP chunks
    (["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true",
      "data.seq_length=68"], 4, "data.seq_length"),  # 2 x CP x TP under SP
    (["parallel.context=4", "parallel.cp_comm=a2a"], 4, "parallel.cp_comm"),  # 2 KV heads
    (["parallel.context=4", "parallel.cp_comm=a2a+p2p"], 4, "parallel.cp_a2a_size"),
    (["parallel.context=4", "parallel.cp_comm=a2a+p2p", "parallel.cp_a2a_size=3"], 4,
     "parallel.cp_a2a_size"),
    (["schedule.global_batch_size=6", "schedule.micro_batch_size=4"], 1,
     "schedule.global_batch_size"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "schedule.global_batch_size=6",
      "schedule.micro_batch_size=2"], 2, "schedule.global_batch_size"),  # 3 mb, PP=2
    (["schedule.warmup_iters=500", "schedule.train_iters=100"], 1, "schedule.warmup_iters"),
    (["schedule.decay_style=wsd"], 1, "schedule.wsd_decay_iters"),
    (["model.mrope_section=[4,4,5]"], 1, "model.mrope_section"),
    (["model.attention_backend=flash"], 1, "model.attention_backend"),
    (["schedule.exit_at_iteration=5"], 1, "checkpoint.save_dir"),  # would stop and lose the run
]


@pytest.mark.parametrize("overrides,world,field", REFUSED)
def test_refused_layouts_name_the_field(overrides, world, field):
    config = load_config(None, ["schedule.global_batch_size=8", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(config, world)
    assert err.value.field == field, str(err.value)


def test_a_valid_4_rank_layout_passes():
    config = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2",
                                "parallel.sequence_parallel=true", "schedule.global_batch_size=8"])
    validate(config, 4)
