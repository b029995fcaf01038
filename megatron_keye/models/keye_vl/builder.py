"""Build the model chunks this rank owns (one per virtual pipeline stage)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_keye.config.schema import TrainConfig
from megatron_keye.models.keye_vl.hf_adapter import StageShard, globalize_layer_key, shard_for_stage
from megatron_keye.models.keye_vl.language import Qwen3LanguageModel, transformer_config
from megatron_keye.models.keye_vl.specs import layer_offset


def build_model_chunks(config: TrainConfig, device: torch.device | None = None) -> list:
    """One `Qwen3LanguageModel` per virtual stage of this pipeline rank, on `device`."""
    tconfig = transformer_config(config.model, config.parallel, precision=config.precision)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for v in range(vpp or 1):
        vp_stage = v if vpp else None
        chunk = Qwen3LanguageModel(
            tconfig,
            model=config.model,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        )
        if device is not None and device.type != "cpu":
            chunk = chunk.to(device)
        chunks.append(chunk)
    return chunks


def stage_shard(chunk: Qwen3LanguageModel) -> StageShard:
    """Which layers and tensor-parallel piece this chunk holds (for loading full weights)."""
    return StageShard(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        layer_offset=layer_offset(chunk.config, chunk.vp_stage),
        num_layers=len(chunk.decoder.layers),
        pre_process=chunk.pre_process,
        post_process=chunk.post_process,
    )


@torch.no_grad()
def load_full_state(chunks: list, full: dict) -> None:
    """Copy a full (unsharded, global-layer-index) native state dict into live model chunks.

    Each chunk takes its own layers and tensor-parallel piece; every parameter must be covered.
    """
    for chunk in chunks:
        module = chunk.module if hasattr(chunk, "module") else chunk
        local = shard_for_stage(full, stage_shard(module))
        params = dict(module.named_parameters())
        missing = sorted(set(params) - set(local))
        if missing:
            raise KeyError(f"full state dict lacks {missing[:5]}")
        for name, param in params.items():
            if param.shape != local[name].shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(local[name].shape)} != model "
                    f"{tuple(param.shape)}"
                )
            param.copy_(local[name])


def named_parameters_global(chunk) -> dict:
    """Parameters of a chunk keyed by full-model names (global layer indices)."""
    module = chunk.module if hasattr(chunk, "module") else chunk
    offset = stage_shard(module).layer_offset
    return {globalize_layer_key(n, offset): p for n, p in module.named_parameters()}
