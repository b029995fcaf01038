"""Shared reference data for the distributed parity tests (built once per session)."""

from __future__ import annotations

import pytest
import torch

from megatron_keye.models.keye_vl import hf_adapter
from tests.distributed.workers import tiny_config


def random_hf_model(config, seed: int = 0):
    """A transformers Qwen3ForCausalLM with random, non-trivial weights (norms far from 1)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    fields = {k: v for k, v in hf_adapter.hf_config_dict(config.model).items()
              if k != "architectures"}
    model = Qwen3ForCausalLM(Qwen3Config(**fields, attn_implementation="eager")).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.2 + 1.0 if p.ndim == 1 else noise * 0.08)
    return model


def random_global_batch(config, *, rows: int, seed: int = 1) -> dict:
    """Random tokens/labels and a random loss mask (about 80% ones) for `rows` sequences."""
    from megatron_keye.models.keye_vl.rope import text_position_ids

    g = torch.Generator().manual_seed(seed)
    s, v = config.data.seq_length, config.model.vocab_size
    return {
        "tokens": torch.randint(0, v, (rows, s), generator=g),
        "labels": torch.randint(0, v, (rows, s), generator=g),
        "loss_weights": (torch.rand(rows, s, generator=g) < 0.8).float(),
        "position_ids": text_position_ids(rows, s),
    }


@pytest.fixture(scope="session")
def reference_setup():
    """Tiny config, a random HF model, its native weights and a random global batch."""
    config = tiny_config({})
    hf = random_hf_model(config)
    weights = hf_adapter.hf_to_native(hf.state_dict(), config.model)
    weights = {k: v.clone() for k, v in weights.items()}
    batch = random_global_batch(config, rows=config.schedule.global_batch_size)
    return {"config": config, "hf": hf, "weights": weights, "batch": batch}


@pytest.fixture(scope="session")
def single_process_reference(reference_setup):
    """Loss and gradients of the single-process (TP=PP=DP=1) run."""
    from megatron_keye.testing.distributed import run_workers
    from tests.distributed.workers import grad_parity_worker

    (result,) = run_workers(
        grad_parity_worker, 1, layout={}, weights=reference_setup["weights"],
        batch=reference_setup["batch"], zero1_step=True,
    )
    return result
