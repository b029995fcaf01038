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
    out["rm_dir"] = save_reward_model(root + "/rm")
    rm_start = time.perf_counter()
    out["rft"] = rft_worker(root=root + "/rft", reward_model=out["rm_dir"])
    out["seconds"]["rft"] = time.perf_counter() - rm_start
    rm_run = reward_model_rollouts(prompts=prompts, reward_model=out["rm_dir"], layout={},
                                   keep_prompts=True)
    items = [(prompt, rollout[2]) for prompt, rollout in zip(rm_run.pop("prompts"),
                                                              rm_run["rollouts"], strict=True)]
    rm_run["plain"] = plain_reward_scores(out["rm_dir"], items)
    out["rm"] = rm_run
    out["seconds"]["reward_model"] = time.perf_counter() - start
    return out


def layouts_worker(*, root: str, reward_model: str) -> dict:
    """Four ranks: the single-rank world's uninterrupted run at TP=2×PP=2, and at TP=2×DP=2
    with ZeRO-1 (data ranks split the prompts and gather the rollouts); the reward-model run's
    first rollout batch at TP=2×PP=2 and at TP=2×DP=2 (data ranks split the scoring rows)."""
    register_test_verifiers()
    prompts = write_prompts(root + "/prompts", colour=2, arithmetic=2)
    return {"tp2pp2": run_loop(prompts=prompts, layout={"tensor": 2, "pipeline": 2}, steps=6,
                               extra=VOWEL_TASK),
            "tp2dp2": run_loop(prompts=prompts, layout={"tensor": 2}, steps=6,
                               extra=(*VOWEL_TASK, "parallel.distributed_optimizer=true")),
            "rm_tp2pp2": reward_model_rollouts(prompts=prompts, reward_model=reward_model,
                                               layout={"tensor": 2, "pipeline": 2}),
            "rm_tp2dp2": reward_model_rollouts(prompts=prompts, reward_model=reward_model,
                                               layout={"tensor": 2})}


# ------------------------------------------------------------------------- reward model
# The vowel task plus the reward model's score: hints still escalate (vowels decide success),
# and every rollout's reward carries the model term.
RM_WEIGHT = 0.5


def rm_task(reward_model: str) -> tuple:
    return ("rl.reward_terms=[vowels,model]", f"rl.reward_weights=[1.0,{RM_WEIGHT}]",
            f"rl.reward_model={reward_model}", "rl.success_reward=0.6",
            "stage.head.gspo.clip_low=0.2", "stage.head.gspo.clip_high=0.28")


def save_reward_model(root: str) -> str:
    """A value model (2 layers where the policy has 4, its own seed and init) saved natively."""
    from megatron_keye.config import config_to_dict
    from megatron_keye.models.keye_vl.builder import build_model_chunks
    from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState
    from megatron_keye.runtime.parallel import ParallelDims, init_distributed

    config = tiny_config({}, seq=192, extra=(
        "model.output_head=value", "stage.loss_head=reward", "model.vision.flavor=tiny",
        "model.attention_backend=sdpa", "model.num_layers=2", "model.init_std=0.3", "seed=7",
        f"checkpoint.save_dir={root}"))
    init_distributed()
    ParallelDims.from_config(config.parallel, 1).initialize(seed=config.seed)
    chunks = build_model_chunks(config)
    layout = {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "context": 1, "data": 1}
    Checkpointer(config.checkpoint, run_config=config_to_dict(config), layout=layout).save(
        chunks=chunks, optimizer=None, state=TrainingState(iteration=1))
    return root


def reward_model_rollouts(*, prompts: str, reward_model: str, layout: dict,
                          keep_prompts: bool = False) -> dict:
    """One rollout batch (two steps) of the RL loop with the reward-model term: per rollout
    (prompt index, hint level, response tokens, model term, reward, vowel term), the logged
    mean of the model term (and the rollouts' prompts with `keep_prompts`)."""
    from megatron_keye.runtime.trainer import Trainer

    trainer = Trainer(rl_config(prompts, layout=layout, steps=2,
                                extra=rm_task(reward_model))).setup()
    seen: list = []
    original = trainer.loader.rollout_batch

    def recording():
        rollouts = original()
        seen.extend(rollouts)
        return rollouts

    trainer.loader.rollout_batch = recording
    trainer.run()
    metrics = trainer.loader.last_metrics
    out = {"rollouts": [(r.prompt_index, r.level, r.response, r.terms["model"], r.reward,
                         r.terms["vowels"]) for r in seen], "metric": metrics["rl/term/model"]}
    if keep_prompts:
        out["prompts"] = [r.prompt for r in seen]
    return out


def plain_reward_scores(reward_model: str, items: list) -> list[float]:
    """The reward model's score of each (prompt, response tokens) alone, written from the
    rule: one forward of the whole model on prompt + response (cut before an image/video pad,
    trailing stop token dropped) + <|im_end|>, the score at the last position (TP=1, a world
    of one rank)."""
    from megatron_keye.config import config_from_dict
    from megatron_keye.data.text.tokenizer import KeyeTokenizer
    from megatron_keye.models.keye_vl.builder import build_model_chunks
    from megatron_keye.post_training.generate_cli import saved_config
    from megatron_keye.runtime.checkpoint import Checkpointer

    saved = saved_config(reward_model)
    config = config_from_dict(saved)
    (model,) = build_model_chunks(config)
    Checkpointer(config.checkpoint, run_config=saved, layout={}).load(
        reward_model, chunks=[model], optimizer=None, weights_only=True)
    model.eval()
    tok = KeyeTokenizer.default()
    pads = (config.model.image_token_id, config.model.video_token_id)
    scores = []
    for prompt, response in items:
        response = list(response)
        cut = next((i for i, t in enumerate(response) if t in pads), len(response))
        response = response[:cut]
        while response and response[-1] in (tok.eos_id, tok.pad_id):
            response.pop()
        response.append(tok.eos_id)
        n = len(response)
        tokens = torch.cat([prompt.tokens, torch.tensor(response)]).view(1, -1)
        start = int(prompt.positions().max()) + 1
        positions = torch.cat([prompt.positions(),
                               torch.arange(start, start + n).view(1, n).expand(3, n)], dim=1)
        vision = {}
        if prompt.pixel_values is not None:
            vision = {"pixel_values": prompt.pixel_values, "vision_grids": prompt.vision_grids}
        with torch.no_grad():
            out = model(tokens, positions.view(3, 1, -1), **vision)
        scores.append(float(out[-1, 0]))
    return scores


# ------------------------------------------------------------------------------------ RFT
# The reward model of `save_reward_model` scores these samples around -2.5: the `model` term
# accepts part of them at this threshold.
RFT_MODEL_SUCCESS = -2.4

def rft_worker(*, root: str, reward_model: str) -> dict:
    """Save the tiny model, run `rft` on it (k samples per prompt) with a verifier that accepts
    a known subset; return what it kept, the generated rows and the written shards' index.
    Then with the reward model: as the only reward term (`model_term`, accepted when the score
    is >= RFT_MODEL_SUCCESS), and replacing references (`replace`) on a copy of the prompts
    whose reference answers are planted (`planted_references`); with the plain forward's
    scores of every reference and sample (`plain`: references first, then the samples in row
    order) and the planted answers."""
    from megatron_keye.config import config_to_dict
    from megatron_keye.models.keye_vl.builder import build_model_chunks
    from megatron_keye.post_training.rewards import VERIFIERS
    from megatron_keye.post_training.rft import RFTOptions, run_rft
    from megatron_keye.post_training.rl import read_prompt_file
    from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState
    from megatron_keye.runtime.parallel import ParallelDims, init_distributed

    def starts_with_vowel(response: str, _sample) -> float:
        stripped = response.strip().lower()
        return float(bool(stripped) and stripped[0] in VOWELS)

    VERIFIERS["starts_vowel"] = starts_with_vowel
    VERIFIERS["even_length"] = even_length
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
    planted = None
    for name, extra in (("model_term", dict(reward_terms=["model"], reward_weights=[1.0],
                                            success=RFT_MODEL_SUCCESS)),
                        ("replace", dict(reward_terms=["even_length"], reward_weights=[1.0],
                                         replace_reference=True))):
        if name == "replace":  # the same samples (same prompts, seed and options)
            planted = planted_references(prompts, out["model_term"]["candidates"],
                                         reward_model=reward_model)
        options = RFTOptions(checkpoint=root + "/ckpt", prompts=planted or prompts,
                             out=f"{root}/{name}", samples=6, max_new_tokens=4,
                             temperature=1.0, seed=3, reward_model=reward_model, **extra)
        report = run_rft(options)
        out[name] = {"report": report.as_dict(), "candidates": report.candidates,
                     "references": report.reference_scores,
                     "written": [json.loads(line) for line in
                                 Path(report.accepted_path).read_text().splitlines()]}
    out["plain"] = plain_rft_scores(reward_model, planted, out["replace"]["candidates"])
    out["answers"] = [r.sample["answer"] for r in read_prompt_file(planted)]
    return out


def even_length(response: str, _sample) -> float:
    """Accepts about half of the random samples: a non-empty stripped text of even length."""
    stripped = response.strip()
    return float(bool(stripped) and len(stripped) % 2 == 0)


def planted_references(prompts: str, candidates: list[dict], *, reward_model: str) -> str:
    """A copy of `prompts` whose reference answers are planted so that both decisions occur:
    per prompt with an accepted (`even_length`) sample, a number 0..39 whose plain reward-model
    score is below the best accepted sample's (even prompts: the reference gets replaced) or
    above it (odd prompts: it stays), by a clear margin; returns the new file."""
    from megatron_keye.data.text.tokenizer import KeyeTokenizer
    from megatron_keye.post_training.prompts import build_prompt

    tok = KeyeTokenizer.default()
    lines = Path(prompts).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    rendered = [build_prompt(r["prompt"], tokenizer=tok) for r in records]
    pool = [str(n) for n in range(40)]
    scores = plain_reward_scores(reward_model, [(prompt, tok.encode(text)) for prompt in rendered
                                                for text in pool])
    for p, record in enumerate(records):
        accepted = [c["reward"] for c in candidates
                    if c["prompt"] == p and even_length(c["text"], None)]
        if not accepted:  # `model_term` rewards are the samples' scores
            continue
        best = max(accepted)
        mine = sorted(zip(scores[p * len(pool) : (p + 1) * len(pool)], pool))
        pick = [t for v, t in mine if v < best - 0.05] if p % 2 == 0 else [
            t for v, t in mine if v > best + 0.05]
        if pick:
            record["answer"] = pick[0] if p % 2 == 0 else pick[-1]
    path = Path(prompts).with_name("planted.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def plain_rft_scores(reward_model: str, prompts: str, candidates: list[dict]) -> list[float]:
    """The plain forward's scores of each prompt's reference answer, then of every sample."""
    from megatron_keye.data.text.tokenizer import KeyeTokenizer
    from megatron_keye.post_training.prompts import build_prompt
    from megatron_keye.post_training.rl import read_prompt_file

    tok = KeyeTokenizer.default()
    records = read_prompt_file(prompts)
    rendered = [build_prompt(r.text, tokenizer=tok) for r in records]
    items = [(p, tok.encode(r.sample["answer"])) for p, r in zip(rendered, records, strict=True)]
    items += [(rendered[c["prompt"]], c["tokens"]) for c in candidates]
    return plain_reward_scores(reward_model, items)


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
