"""RL loop workers: rollouts at several layouts, π = π_old at the start of every rollout batch,
kill-and-resume, a rising reward on an easy task, and RFT (several cases per spawned world)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.distributed.workers import tiny_config

VOWELS = "aeiou"


def vowel_reward(response: str, _sample) -> float:
    """The easy task: the fraction of the response's letters that are vowels."""
    letters = [c for c in response.lower() if c.isalpha()]
    return sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0


def register_test_verifiers() -> None:
    from megatron_keye.post_training.rewards import VERIFIERS

    VERIFIERS["vowels"] = vowel_reward


def write_prompts(root: str, *, colour: int, arithmetic: int) -> str:
    from megatron_keye.data.rl_prompts import RLPromptConfig, write_rl_prompts

    return str(write_rl_prompts(root, RLPromptConfig(colour=colour, arithmetic=arithmetic)))


def rl_config(prompts: str, *, layout: dict, steps: int, extra: tuple = ()):
    return tiny_config(layout, global_batch=4, micro_batch=2, seq=192, extra=(
        # peaked distributions (init std 0.1): a draw rarely sits within rounding of a token
        # boundary, so fp32 reduction-order differences between layouts keep the same samples
        "model.vision.flavor=tiny", "model.attention_backend=sdpa", "model.init_std=0.1",
        "stage.loss_head=gspo",
        f"rl.prompts={prompts}", "rl.prompts_per_rollout=2", "rl.group_size=4",
        "rl.minibatches=2", "rl.max_new_tokens=6", f"schedule.train_iters={steps}",
        "data.image_max_tokens=16", "parallel.distributed_optimizer=false", *extra))


def _recording_trainer(config):
    """A set-up trainer whose rollout batches are recorded as (prompt, level, tokens, logps)."""
    from megatron_keye.runtime.trainer import Trainer

    trainer = Trainer(config).setup()
    seen: list = []
    original = trainer.loader.rollout_batch

    def recording():
        rollouts = original()
        seen.append([(r.prompt_index, r.level, r.response, r.logprobs, r.reward)
                     for r in rollouts])
        return rollouts

    trainer.loader.rollout_batch = recording
    return trainer, seen


def _history(results) -> list[dict]:
    return [{"loss": r.loss, **r.reports} for r in results]


def run_loop(*, prompts: str, layout: dict, steps: int, save_dir: str | None = None,
             exit_at: int = 0, extra: tuple = ()) -> dict:
    """Train an RL stage for `steps` optimizer steps (or until `exit_at`); every rank returns
    the step reports and the rollouts it drew."""
    overrides = list(extra)
    if save_dir:
        overrides += [f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=0"]
    if exit_at:
        overrides.append(f"schedule.exit_at_iteration={exit_at}")
    trainer, seen = _recording_trainer(rl_config(prompts, layout=layout, steps=steps,
                                                 extra=tuple(overrides)))
    history = _history(trainer.run())
    return {"history": history, "rollouts": seen, "hint_table": trainer.loader.hint_table.tried,
            "metrics": trainer.loader.last_metrics, "iteration": trainer.iteration}


# The vowel task with hints: a rollout succeeds at reward >= 0.5, so some groups pass at once
# and the others escalate through their hints; advantages are non-zero.
VOWEL_TASK = ("rl.reward_terms=[vowels]", "rl.reward_weights=[1.0]", "rl.success_reward=0.5",
              "stage.head.gspo.clip_low=0.2", "stage.head.gspo.clip_high=0.28")


def single_rank_worker(*, root: str) -> dict:
    """TP=1: an uninterrupted run, the same run killed at step 3 and resumed, and the easy
    vowel task's rewards over a short run (text model)."""
    import time

    register_test_verifiers()
    prompts = write_prompts(root + "/prompts", colour=2, arithmetic=2)
    out = {"seconds": {}}
    start = time.perf_counter()
    out["full"] = run_loop(prompts=prompts, layout={}, steps=6, extra=VOWEL_TASK)
    out["seconds"]["full"] = time.perf_counter() - start
    save = root + "/resume"
    start = time.perf_counter()
    out["first"] = run_loop(prompts=prompts, layout={}, steps=6, save_dir=save, exit_at=3,
                            extra=VOWEL_TASK)
    out["resumed"] = run_loop(prompts=prompts, layout={}, steps=6, save_dir=save,
                              extra=VOWEL_TASK)
    out["seconds"]["resume"] = time.perf_counter() - start

    start = time.perf_counter()
    text = write_prompts(root + "/text", colour=0, arithmetic=4)
    out["vowels"] = run_loop(prompts=text, layout={}, steps=12, extra=(
        *VOWEL_TASK, "model.vision=null", "rl.prompts_per_rollout=4", "rl.group_size=8",
        "rl.max_new_tokens=8", "rl.hints=false", "optimizer.lr=0.03",
        "schedule.global_batch_size=8"))
    out["seconds"]["vowels"] = time.perf_counter() - start
    start = time.perf_counter()
    out["rft"] = rft_worker(root=root + "/rft")
    out["seconds"]["rft"] = time.perf_counter() - start
    return out


def layouts_worker(*, root: str) -> dict:
    """Four ranks: the single-rank world's uninterrupted run at TP=2×PP=2, and at TP=2×DP=2
    with ZeRO-1 (data ranks split the prompts and gather the rollouts)."""
    register_test_verifiers()
    prompts = write_prompts(root + "/prompts", colour=2, arithmetic=2)
    return {"tp2pp2": run_loop(prompts=prompts, layout={"tensor": 2, "pipeline": 2}, steps=6,
                               extra=VOWEL_TASK),
            "tp2dp2": run_loop(prompts=prompts, layout={"tensor": 2}, steps=6,
                               extra=(*VOWEL_TASK, "parallel.distributed_optimizer=true"))}


# ------------------------------------------------------------------------------------ RFT
def rft_worker(*, root: str) -> dict:
    """Save the tiny model, run `rft` on it (k samples per prompt) with a verifier that accepts
    a known subset; return what it kept, the generated rows and the written shards' index."""
    from megatron_keye.config import config_to_dict
    from megatron_keye.models.keye_vl.builder import build_model_chunks
    from megatron_keye.post_training.rewards import VERIFIERS
    from megatron_keye.post_training.rft import RFTOptions, run_rft
    from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState
    from megatron_keye.runtime.parallel import ParallelDims, init_distributed

    def starts_with_vowel(response: str, _sample) -> float:
        stripped = response.strip().lower()
        return float(bool(stripped) and stripped[0] in VOWELS)

    VERIFIERS["starts_vowel"] = starts_with_vowel
    config = tiny_config({}, extra=("model.attention_backend=sdpa",))
    init_distributed()
    ParallelDims.from_config(config.parallel, 1).initialize(seed=config.seed)
    chunks = build_model_chunks(config)
    config.checkpoint.save_dir = root + "/ckpt"
    layout = {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "context": 1, "data": 1}
    Checkpointer(config.checkpoint, run_config=config_to_dict(config), layout=layout).save(
        chunks=chunks, optimizer=None, state=TrainingState(iteration=1))
    prompts = write_prompts(root + "/prompts", colour=0, arithmetic=6)
    out = {}
    for mode in ("all", "best"):
        options = RFTOptions(checkpoint=root + "/ckpt", prompts=prompts, out=f"{root}/{mode}",
                             samples=6, mode=mode, reward_terms=["starts_vowel"],
                             reward_weights=[1.0], max_new_tokens=4, temperature=1.0, seed=3)
        report = run_rft(options)
        out[mode] = {"report": report.as_dict(), "candidates": report.candidates,
                     "accepted": [json.loads(line) for line in
                                  Path(report.accepted_path).read_text().splitlines()],
                     "index": json.loads(Path(report.index_path).read_text())}
        out[mode]["shard_records"] = shard_records(report.index_path)
    return out


def shard_records(index_file: str) -> list[dict]:
    """Every record of the shards an index lists, decoded as the loader decodes them:
    (source, assistant text)."""
    import tarfile

    from megatron_keye.data.shards.format import read_index, read_record

    index = read_index(index_file)
    records = []
    for shard in index.shards:
        samples: dict[str, dict] = {}
        with tarfile.open(Path(index_file).parent / shard.file) as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                samples.setdefault(key, {"__key__": key})[suffix] = tar.extractfile(member).read()
        for sample in samples.values():
            record = read_record(sample)
            records.append({"source": record.source, "messages": [
                (m.role, "".join(getattr(seg, "text", "") for seg in m.content))
                for m in record.messages]})
    return records


def tokens_of(history_rollouts: list) -> list:
    return [[(p, level, tokens) for p, level, tokens, _, _ in batch]
            for batch in history_rollouts]


__all__ = ["layouts_worker", "rft_worker", "single_rank_worker", "tokens_of", "torch"]
