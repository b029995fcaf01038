"""Start-up checks of an RL (gspo) stage's `rl` section, naming the field to change.

Kept apart from the RL loop (`rl.py`) so that config validation (`config/validation.py`) can
call them without importing the loop and what it serves (generation, the reward model).
"""

from __future__ import annotations

from megatron_keye.config.loading import ConfigError
from megatron_keye.config.schema import TrainConfig
from megatron_keye.post_training.rewards import VERIFIERS


def check_rl_config(config: TrainConfig) -> None:
    """Refuse an RL stage that cannot run, naming the field (called by `validate`).

    Only a gspo stage with `rl.prompts` runs the loop; without it the gspo head trains on
    batches a caller supplies (precomputed rollouts, tests), and the trainer's own loader
    refuses to start."""
    rl, p = config.rl, config.parallel
    if config.stage.loss_head != "gspo" or not rl.prompts:
        return
    if p.context != 1 or p.sequence_parallel or p.virtual_pipeline != 1:
        raise ConfigError("parallel", "a gspo stage generates its rollouts on the training "
                          "model, which decodes without context/sequence parallelism and with one "
                          "chunk per rank: set parallel.context=1, sequence_parallel=false, "
                          "virtual_pipeline=1")
    for name in ("prompts_per_rollout", "group_size", "minibatches", "max_new_tokens"):
        if getattr(rl, name) < 1:
            raise ConfigError(f"rl.{name}", f"must be >= 1, got {getattr(rl, name)}")
    if rl.temperature != 1.0:
        raise ConfigError("rl.temperature", f"{rl.temperature}: the loss reads the sampler's "
                          "log-probs as pi_old at temperature 1; sample at 1.0")
    if len(rl.reward_terms) != len(rl.reward_weights) or not rl.reward_terms:
        raise ConfigError("rl.reward_weights", f"one weight per rl.reward_terms entry "
                          f"({rl.reward_terms} vs {rl.reward_weights})")
    unknown = sorted(set(rl.reward_terms) - set(VERIFIERS) - {"model"})
    if unknown:
        raise ConfigError("rl.reward_terms", f"unknown {unknown}; known: {sorted(VERIFIERS)} "
                          f"and 'model' (the score of rl.reward_model)")
    if "model" in rl.reward_terms and not rl.reward_model:
        raise ConfigError("rl.reward_model", "the 'model' reward term needs a reward model: set "
                          "rl.reward_model to a value-head checkpoint (model.output_head: value)")
    if rl.reward_model and "model" not in rl.reward_terms:
        raise ConfigError("rl.reward_terms", f"rl.reward_model={rl.reward_model} is set but no "
                          f"'model' term uses it; add 'model' (and its weight) or unset it")
    if rl.prompts_per_rollout * rl.group_size < rl.minibatches:
        raise ConfigError("rl.minibatches", f"{rl.minibatches} minibatches from "
                          f"{rl.prompts_per_rollout * rl.group_size} rollouts per batch")
    if config.schedule.train_iters % rl.minibatches:
        raise ConfigError("schedule.train_iters", f"{config.schedule.train_iters} is not a "
                          f"multiple of rl.minibatches={rl.minibatches} (steps per rollout batch)")
