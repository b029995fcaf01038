"""Hugging Face Qwen3ForCausalLM safetensors ⇄ native dist_checkpointing checkpoints.

Import runs on TP×PP ranks (spawned here unless already launched with that many): each rank
builds its stage, reads only its own tensors from the safetensors files and the ranks write one
checkpoint together. The checkpoint is layout-free, so it also loads at any other TP/PP/DP.
Export loads a checkpoint into one unsharded process and writes safetensors + config.json
(+ the tokenizer files, when given) that `transformers` loads directly, in the precision the HF
source declared (recorded at import as `model.source_dtype`) or else the run's, unless `dtype`
says otherwise.

Inputs are checked in the calling process before any rank starts (a missing directory,
config.json or safetensors file, or a layout the model cannot take, is one error naming it); an
error inside a rank comes back as one `RankError` naming the rank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from megatron_keye.config import config_from_dict, config_to_dict, validate
from megatron_keye.config.schema import TrainConfig
from megatron_keye.models.keye_vl import hf_adapter
from megatron_keye.runtime.spawn import spawn_ranks

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "chat_template.json", "chat_template.jinja", "generation_config.json",
)


def import_hf(hf_dir: str, out_dir: str, *, tensor: int = 1, pipeline: int = 1,
              precision: str = "fp32") -> None:
    """Write a native checkpoint (weights only) of a Qwen3ForCausalLM directory."""
    world = tensor * pipeline
    # Everything that can be checked without the weights fails here, in one line.
    config = hf_model_config(hf_dir, tensor=tensor, pipeline=pipeline, precision=precision)
    validate(config, world)
    _safetensors_index(Path(hf_dir))
    if int(os.environ.get("WORLD_SIZE", "1")) == world and "RANK" in os.environ:
        _import_rank(hf_dir=hf_dir, out_dir=out_dir, tensor=tensor, pipeline=pipeline,
                     precision=precision)
        return
    spawn_ranks(_import_rank, world, threads=max(1, (os.cpu_count() or 1) // world),
                hf_dir=hf_dir, out_dir=out_dir, tensor=tensor, pipeline=pipeline,
                precision=precision)


def export_hf(checkpoint: str, out_dir: str, *, tokenizer_dir: str | None = None,
              dtype: str | None = None) -> Path:
    """Write `model.safetensors` + `config.json` (+ tokenizer files) for transformers.

    `dtype` ("fp32", "bf16", "fp16") defaults to the HF source's (`model.source_dtype`) for an
    imported model, else the precision of the run that wrote the checkpoint.
    """
    from megatron_keye.runtime.checkpoint import resolve_checkpoint_dir

    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
    if resolve_checkpoint_dir(checkpoint) is None:
        raise FileNotFoundError(f"{checkpoint}: no checkpoint there (nor a `latest` naming one)")
    if tokenizer_dir and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json to export with the model")
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _export_rank(checkpoint=checkpoint, out_dir=out_dir, tokenizer_dir=tokenizer_dir,
                            dtype=dtype)
    (path,) = spawn_ranks(_export_rank, 1, threads=os.cpu_count() or 1, checkpoint=checkpoint,
                          out_dir=out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
    return path


def export_dtype(config: TrainConfig, requested: str | None = None) -> str:
    """The dtype an export writes: `requested`, else the HF source's, else the run's precision."""
    return requested or config.model.source_dtype or config.precision


def hf_model_config(hf_dir: str, *, tensor: int, pipeline: int, precision: str) -> TrainConfig:
    """A run config whose model section matches a HF Qwen3 config.json."""
    directory = Path(hf_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such directory (expected a Hugging Face model)")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found (a Qwen3 config.json is required)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    try:
        model = hf_adapter.model_fields_from_hf_config(hf)
    except KeyError as err:
        raise ValueError(f"{config_file}: missing field {err}") from None
    return config_from_dict({
        "model": {"flavor": "8b", **model},
        "parallel": {"tensor": tensor, "pipeline": pipeline},
        "precision": precision,
    })


def _import_rank(*, hf_dir: str, out_dir: str, tensor: int, pipeline: int, precision: str) -> None:
    from safetensors import safe_open

    from megatron_keye.models.keye_vl.builder import (
        build_model_chunks,
        load_full_state,
        stage_shard,
    )
    from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState
    from megatron_keye.runtime.parallel import ParallelDims

    config = hf_model_config(hf_dir, tensor=tensor, pipeline=pipeline, precision=precision)
    dims = ParallelDims.from_config(config.parallel, tensor * pipeline)
    dims.initialize(seed=config.seed)
    chunks = build_model_chunks(config)
    index = _safetensors_index(Path(hf_dir))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for chunk in chunks:
        shard = stage_shard(chunk)
        wanted = hf_adapter.hf_names_for_stage(config.model, shard)
        tensors = {}
        for name in wanted:
            if name not in index:
                raise KeyError(f"{hf_dir}: tensor {name!r} is missing from the safetensors files")
            with safe_open(index[name], framework="pt") as f:
                tensors[name] = f.get_tensor(name).to(dtype)
        layers = range(shard.layer_offset, shard.layer_offset + shard.num_layers)
        load_full_state([chunk], hf_adapter.hf_to_native(tensors, config.model, layers=layers))
    config.checkpoint.save_dir = out_dir
    layout = {"tensor": tensor, "pipeline": pipeline, "virtual_pipeline": 1, "context": 1, "data": 1}
    Checkpointer(config.checkpoint, run_config=config_to_dict(config), layout=layout).save(
        chunks=chunks, optimizer=None, state=TrainingState(iteration=0)
    )


def _export_rank(*, checkpoint: str, out_dir: str, tokenizer_dir: str | None,
                 dtype: str | None) -> Path:
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from megatron_keye.models.keye_vl.builder import build_model_chunks, named_parameters_global
    from megatron_keye.runtime.checkpoint import Checkpointer, resolve_checkpoint_dir
    from megatron_keye.runtime.parallel import ParallelDims

    directory = resolve_checkpoint_dir(checkpoint)
    if directory is None:
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    saved = dist_checkpointing.load_common_state_dict(str(directory))["config"]
    saved["parallel"] = {}  # one unsharded process
    config = config_from_dict(saved)
    ParallelDims.from_config(config.parallel, 1).initialize(seed=config.seed)
    chunks = build_model_chunks(config)
    layout = {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "context": 1, "data": 1}
    Checkpointer(config.checkpoint, run_config=saved, layout=layout).load(
        directory, chunks=chunks, optimizer=None, weights_only=True
    )
    native = {k: v.detach() for k, v in named_parameters_global(chunks[0]).items()}
    hf = hf_adapter.native_to_hf(native, config.model)
    dtype = export_dtype(config, dtype)
    torch_dtype = TORCH_DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch_dtype).contiguous() for k, v in hf.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config = hf_adapter.hf_config_dict(config.model)
    hf_config["torch_dtype"] = HF_DTYPE_NAMES[dtype]
    if tokenizer_dir:
        _copy_tokenizer(Path(tokenizer_dir), out, hf_config)
    if config.model.output_head == "value" and config.stage.head.reward.pad_token_id is not None:
        # Sequence classification reads the last non-pad token: the padding the RM trained with.
        hf_config["pad_token_id"] = config.stage.head.reward.pad_token_id
    with open(out / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    return out


def _copy_tokenizer(source: Path, out: Path, hf_config: dict) -> None:
    copied = [n for n in TOKENIZER_FILES if (source / n).exists()]
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"{source}: no tokenizer.json to export with the model")
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(source / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if size > hf_config["vocab_size"]:
        raise ValueError(f"{source}: the tokenizer has {size} tokens but the model's vocab_size "
                         f"is {hf_config['vocab_size']}")
    for name in copied:
        shutil.copy(source / name, out / name)
    cfg_path = source / "tokenizer_config.json"
    if cfg_path.exists():
        tok_cfg = json.loads(cfg_path.read_text())
        vocab = json.loads((source / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
        eos = tok_cfg.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos in ids:
            hf_config["eos_token_id"] = ids[eos]
        pad = tok_cfg.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if pad in ids:
            hf_config["pad_token_id"] = ids[pad]


def _safetensors_index(hf_dir: Path) -> dict[str, str]:
    """Tensor name → file, from `model.safetensors.index.json` or the single safetensors file."""
    index_file = hf_dir / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: str(hf_dir / file) for name, file in weight_map.items()}
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (PyTorch .bin is not supported)")
    from safetensors import safe_open

    index = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                index[name] = str(file)
    return index
