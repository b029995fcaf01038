"""Workers of the reward-model tests (run on every rank of a gloo world)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.distributed.workers import build_trainer, local_grads, rank_info, tiny_config

PAD = 3  # the padding token id of these batches (real tokens are drawn from 10 and up)
SEQ = 32
MARGIN, CENTER = 0.1, 0.01  # stage.head.reward.margin and center_coefficient in the parity runs


def reward_config(layout: dict, *, global_batch: int, micro_batch: int, extra: tuple = ()):
    return tiny_config(layout, global_batch=global_batch, micro_batch=micro_batch, seq=SEQ,
                       extra=("model.output_head=value", "stage.loss_head=reward",
                              f"stage.head.reward.pad_token_id={PAD}", *extra))


def build_rows(rows: list[list[tuple[list[int], int, int]]], margins: dict | None = None) -> dict:
    """A micro-batch from rows of samples (token ids, span, role); each sample is padded with
    PAD to its span; `margins[(row, sample)]` goes on the tokens of that (chosen) sample."""
    from megatron_keye.models.keye_vl.rope import packed_text_position_ids

    count = len(rows)
    tokens = torch.full((count, SEQ), PAD, dtype=torch.int64)
    sample_ids = torch.zeros(count, SEQ, dtype=torch.int64)
    roles = torch.zeros(count, SEQ, dtype=torch.int64)
    margin = torch.zeros(count, SEQ)
    for r, samples in enumerate(rows):
        cursor = 0
        for s, (ids, span, role) in enumerate(samples):
            assert len(ids) <= span and cursor + span <= SEQ
            tokens[r, cursor : cursor + len(ids)] = torch.tensor(ids, dtype=torch.int64)
            sample_ids[r, cursor : cursor + span] = s
            roles[r, cursor : cursor + span] = role
            margin[r, cursor : cursor + span] = (margins or {}).get((r, s), 0.0)
            cursor += span
        if cursor < SEQ:  # tail padding: its own sample, no role
            sample_ids[r, cursor:] = len(samples)
    batch = {"tokens": tokens, "labels": torch.zeros_like(tokens),
             "loss_weights": torch.zeros(count, SEQ), "sample_ids": sample_ids,
             "pair_role": roles, "position_ids": packed_text_position_ids(sample_ids)}
    if margins:
        batch["pair_margin"] = margin
    return batch


def parity_batch(seed: int = 0) -> tuple[dict, list[tuple[int, int, int, float]]]:
    """Two packed rows with three pairs, padding inside samples and at a row's tail; returns the
    batch and (row, chosen last position, rejected last position, margin) per pair."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(10, 2000, (n,), generator=gen).tolist()

    # Spans are multiples of 2 x CP = 4; (real tokens, span, role).
    layout = [[(6, 8, 1), (12, 12, 2), (3, 4, 1), (5, 8, 2)],
              [(10, 12, 1), (12, 12, 2)]]
    rows = [[(ids(n), span, role) for n, span, role in row] for row in layout]
    margins = {(0, 0): 0.5, (0, 2): 0.0, (1, 0): 1.0}
    batch = build_rows(rows, margins)
    pairs = []
    for r, row in enumerate(layout):
        starts = [sum(span for _, span, _ in row[:i]) for i in range(len(row))]
        for s in range(0, len(row), 2):
            chosen_last = starts[s] + row[s][0] - 1
            rejected_last = starts[s + 1] + row[s + 1][0] - 1
            pairs.append((r, chosen_last, rejected_last, margins[(r, s)]))
    return batch, pairs


def plain_bradley_terry(scores: torch.Tensor, pairs, *, margin: float, center: float):
    """Mean over pairs of -log σ(r_c - r_r - m) + η (r_c + r_r)², from scores [s, b]."""
    chosen = torch.stack([scores[c, r] for r, c, _, _ in pairs])
    rejected = torch.stack([scores[j, r] for r, _, j, _ in pairs])
    m = torch.tensor([extra for *_, extra in pairs]) + margin
    losses = -F.logsigmoid(chosen - rejected - m) + center * (chosen + rejected) ** 2
    return losses.mean(), chosen, rejected


def _reference(batch: dict, pairs) -> dict:
    """The unsharded model (TP=PP=CP=1, plain autograd) and the plain Bradley-Terry loss."""
    import os

    from megatron_keye.models.keye_vl.builder import build_model_chunks, named_parameters_global
    from megatron_keye.runtime.parallel import ParallelDims

    config = reward_config({}, global_batch=2, micro_batch=2)
    world = int(os.environ["WORLD_SIZE"])
    ParallelDims.from_config(config.parallel, world).initialize(seed=config.seed)
    (model,) = build_model_chunks(config)
    scores = model(batch["tokens"], batch["position_ids"], segments=batch["sample_ids"])
    loss, chosen, rejected = plain_bradley_terry(scores, pairs, margin=MARGIN, center=CENTER)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in named_parameters_global(model).items()}
    return {"scores": scores.detach(), "loss": loss.item(), "chosen": chosen.detach(),
            "rejected": rejected.detach(), "grads": grads}


def _sharded(layout: dict, batch: dict) -> dict:
    """Loss, reports, finalized gradients and (unsplit-batch) scores of one layout."""
    config = reward_config(layout, global_batch=2, micro_batch=1,
                           extra=(f"stage.head.reward.margin={MARGIN}",
                                  f"stage.head.reward.center_coefficient={CENTER}"))
    trainer = build_trainer(config, [batch], weights=None)
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    reports = trainer.forward_backward(trainer.loader.next_step(), force_all_reduce=True)
    totals = trainer.step_runner.global_reports(reports)
    result = {**rank_info(), "totals": totals, "grads": local_grads(trainer)}
    if layout.get("context", 1) == 1 and layout.get("pipeline", 1) == 1:
        with torch.no_grad():
            result["scores"] = trainer.model[0](batch["tokens"], batch["position_ids"],
                                                segments=batch["sample_ids"])
    return result


def _value_model_from_lm_checkpoint(root: str) -> dict:
    """Save a language model at TP=2, load it into a value model: which tensors came from where."""
    import os

    from megatron_keye.config import config_to_dict
    from megatron_keye.models.keye_vl.builder import build_model_chunks, named_parameters_global
    from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState
    from megatron_keye.runtime.parallel import ParallelDims

    layout = {"tensor": 2, "pipeline": 1, "virtual_pipeline": 1, "context": 1, "data": 1}
    lm_config = tiny_config({"tensor": 2}, extra=("seed=5", f"checkpoint.save_dir={root}/lm"))
    ParallelDims.from_config(lm_config.parallel, int(os.environ["WORLD_SIZE"])).initialize(seed=5)
    lm = build_model_chunks(lm_config)
    Checkpointer(lm_config.checkpoint, run_config=config_to_dict(lm_config), layout=layout).save(
        chunks=lm, optimizer=None, state=TrainingState(iteration=1))
    config = reward_config({"tensor": 2}, global_batch=2, micro_batch=1)
    chunks = build_model_chunks(config)
    fresh = {k: v.detach().clone() for k, v in named_parameters_global(chunks[0]).items()}
    Checkpointer(config.checkpoint, run_config=config_to_dict(config), layout=layout).load(
        f"{root}/lm", chunks=chunks, optimizer=None)
    # Matrices only: norm scales start at 1 in every model.
    loaded = {k: v for k, v in named_parameters_global(chunks[0]).items() if v.dim() == 2}
    lm_params = named_parameters_global(lm[0])
    return {
        "from_lm": sorted(k for k, v in loaded.items() if k in lm_params
                          and torch.equal(v, lm_params[k]) and not torch.equal(v, fresh[k])),
        "kept_fresh": sorted(k for k, v in loaded.items() if torch.equal(v, fresh[k])),
        "names": sorted(loaded),
    }


def parity_worker(*, layouts: dict, root: str) -> dict:
    """The reference, then every layout, in one world; rank order results per layout. Also a
    value model loading a language model's checkpoint."""
    batch, pairs = parity_batch()
    out = {"pairs": pairs, "reference": _reference(batch, pairs)}
    for name, layout in layouts.items():
        out[name] = _sharded(layout, batch)
    out["from_lm"] = _value_model_from_lm_checkpoint(root)
    return out


# ----------------------------------------------------------------------------- training
GOOD, BAD = range(1000, 1100), range(1100, 1200)


def planted_pairs(count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(chosen, rejected) token lists sharing a prompt; the responses come from one pool except
    that the chosen one holds two planted GOOD tokens and the rejected one two BAD tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        prompt = torch.randint(10, 1000, (6,), generator=gen).tolist()
        sides = []
        for planted in (GOOD, BAD):
            response = torch.randint(10, 1000, (6,), generator=gen)
            where = torch.randperm(6, generator=gen)[:2]
            response[where] = torch.randint(planted.start, planted.stop, (2,), generator=gen)
            sides.append(prompt + response.tolist())
        out.append((sides[0], sides[1]))
    return out


def pair_rows(pairs) -> dict:
    """One row per pair: chosen (12 tokens, span 16) then rejected (12, span 16)."""
    return build_rows([[(c, 16, 1), (r, 16, 2)] for c, r in pairs])


def _accuracy(trainer, batch: dict) -> float:
    trainer.loader.global_batches = [batch]
    trainer.loader.step = 0
    with torch.no_grad():
        reports = trainer.step_runner.run(trainer.loader.next_step(), forward_only=True)
    total, count = trainer.step_runner.global_reports(reports)["rm accuracy"]
    return total / count


def train_worker(*, layout: dict, save_dir: str, steps: int, lr: float) -> dict:
    """Train a tiny RM on planted pairs; held-out accuracy before and after, a checkpoint, and
    the trained model's scores of a few held-out sequences (for the HF comparison)."""
    train = [pair_rows(planted_pairs(16, seed=100 + i)) for i in range(steps)]
    held_out = pair_rows(planted_pairs(64, seed=7))
    config = reward_config(layout, global_batch=16, micro_batch=8, extra=(
        f"checkpoint.save_dir={save_dir}", f"optimizer.lr={lr}", "optimizer.weight_decay=0.0"))
    trainer = build_trainer(config, train, weights=None)
    before = _accuracy(trainer, held_out)
    trainer.loader.global_batches, trainer.loader.step = train, 0
    losses = [trainer.train_step(trainer.loader.next_step()).loss for _ in range(steps)]
    after = _accuracy(trainer, held_out)
    trainer.save()
    sequences = [side for pair in planted_pairs(3, seed=9) for side in pair]
    probe = build_rows([[(seq, 16, 1 + i % 2) for i, seq in enumerate(sequences[:2])],
                        [(seq, 16, 1 + i % 2) for i, seq in enumerate(sequences[2:4])]])
    with torch.no_grad():
        trainer.model[0].eval()
        scores = trainer.model[0](probe["tokens"], probe["position_ids"],
                                  segments=probe["sample_ids"])
    # Each probe sequence has 12 real tokens: its reward is the score at 11 of its sample.
    rewards = [scores[16 * s + 11, r].item() for r in range(2) for s in range(2)]
    return {"before": before, "after": after, "losses": losses, "sequences": sequences[:4],
            "rewards": rewards}


def reward_world_worker(*, layouts: dict, root: str, train_layout: dict, steps: int,
                        lr: float) -> dict:
    """Every 2-rank reward case of the tests in one world: parity, then training (the trained
    checkpoint goes to ROOT/ckpt)."""
    parity = parity_worker(layouts=layouts, root=f"{root}/parity")
    train = train_worker(layout=train_layout, save_dir=f"{root}/ckpt", steps=steps, lr=lr)
    return {"parity": parity, "train": train}
