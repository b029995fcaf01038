"""Build the model chunks this rank owns (one per virtual pipeline stage)."""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core import parallel_state

from megatron_keye.config.schema import TrainConfig
from megatron_keye.models.keye_vl.hf_adapter import (
    StageShard,
    globalize_layer_key,
    shard_for_stage,
    split_tensor,
    tensor_parallel_dim,
)
from megatron_keye.models.keye_vl.language import Qwen3LanguageModel, transformer_config
from megatron_keye.models.keye_vl.projector import Projector
from megatron_keye.models.keye_vl.specs import layer_offset
from megatron_keye.models.keye_vl.vision import VisionTower


def build_model_chunks(config: TrainConfig, device: torch.device | None = None) -> list:
    """One model per virtual stage of this pipeline rank, on `device`: `Qwen3LanguageModel`,
    or `KeyeVLModel` (vision tower + projector on the first stage) when `model.vision` is set."""
    tconfig = transformer_config(config.model, config.parallel, precision=config.precision)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    vision = {}
    model_class = Qwen3LanguageModel
    if config.model.vision is not None:
        from megatron_keye.models.keye_vl.model import KeyeVLModel

        model_class = KeyeVLModel
        vision = {"parallel": config.parallel, "precision": config.precision}
    chunks = []
    for v in range(vpp or 1):
        vp_stage = v if vpp else None
        chunk = model_class(
            tconfig,
            model=config.model,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
            cp_comm=config.parallel.cp_comm,
            cp_a2a_size=config.parallel.cp_a2a_size,
            **vision,
        )
        if device is not None and device.type != "cpu":
            chunk = chunk.to(device)
        chunks.append(chunk)
    initialize_by_name(chunks, seed=config.seed)
    return chunks


# Weights whose init std megatron scales by 1/sqrt(2 * num_layers) (output_layer_init_method).
_SCALED_INIT_SUFFIXES = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


@torch.no_grad()
def initialize_by_name(chunks: list, *, seed: int) -> None:
    """Re-draw every weight matrix from (seed, global parameter name) alone.

    megatron-core draws initial weights from per-pipeline-stage RNG streams, so the same seed
    gives different models at PP=1 and PP=2. Here each matrix is drawn whole (full, unsharded
    shape) from a generator seeded by its global name, then cut to this rank's tensor-parallel
    piece, so every TP/PP/VPP/DP layout starts from bit-identical weights (on one device type).
    Vectors (norm scales) keep their deterministic constructor values.
    """
    for chunk in chunks:
        module = chunk.module if hasattr(chunk, "module") else chunk
        # The vision tower and projector split their tensors their own way (plain fc1).
        vision_params = set()
        for prefix, sub in module.named_modules():
            if isinstance(sub, VisionTower | Projector):
                initialize_vision_by_name(sub, prefix=f"{prefix}.", seed=seed)
                vision_params.update(id(p) for p in sub.parameters())
        shard = stage_shard(module)
        config = module.config
        tied = getattr(module.model_config, "tie_word_embeddings", False)
        for local_name, param in module.named_parameters():
            if param.dim() < 2 or id(param) in vision_params:
                continue
            name = globalize_layer_key(local_name, shard.layer_offset)
            std = config.init_method_std
            if name.endswith(_SCALED_INIT_SUFFIXES):
                std = std / math.sqrt(2.0 * config.num_layers)
            # A tied output layer starts as (and stays) the embedding matrix.
            key = "embedding.word_embeddings.weight" if tied and name == "output_layer.weight" else name
            full = _draw_normal(key, _full_shape(name, param.shape, shard.tp_size), std=std,
                                seed=seed, device=param.device)
            param.copy_(split_tensor(name, full, shard.tp_rank, shard.tp_size))


@torch.no_grad()
def initialize_vision_by_name(module: VisionTower | Projector, *, prefix: str, seed: int) -> None:
    """The `initialize_by_name` scheme for a vision tower or projector: every weight matrix
    drawn whole from (seed, prefix + name), then cut to this rank's tensor-parallel piece, so
    every TP layout starts from the same weights. Biases and norms keep constructor values."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in module.named_parameters():
        if param.dim() < 2:
            continue
        dim = module.tensor_parallel_dim(name)
        shape = list(param.shape)
        if dim is not None:
            shape[dim] *= tp_size
        full = _draw_normal(prefix + name, shape, std=module.init_std(name), seed=seed,
                            device=param.device)
        if dim is not None:
            full = full.chunk(tp_size, dim=dim)[tp_rank]
        param.copy_(full)


def _full_shape(name: str, local_shape: torch.Size, tp_size: int) -> list[int]:
    shape = list(local_shape)
    dim = tensor_parallel_dim(name)
    if dim is not None:
        shape[dim] *= tp_size
    return shape


def _draw_normal(name: str, shape: list[int], *, std: float, seed: int,
                 device: torch.device) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std


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
