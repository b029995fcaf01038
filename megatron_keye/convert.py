"""Hugging Face Qwen3ForCausalLM / Keye-VL-1.5 safetensors ⇄ native dist_checkpointing checkpoints.

Import runs on TP×PP ranks (spawned here unless already launched with that many): each rank
builds its stage, reads only its own tensors from the safetensors files and the ranks write one
checkpoint together. The checkpoint is layout-free, so it also loads at any other TP/PP/DP.
Export loads a checkpoint into one unsharded process and writes safetensors + config.json
(+ the tokenizer files, when given) that `transformers` loads directly, in the precision the HF
source declared (recorded at import as `model.source_dtype`) or else the run's, unless `dtype`
says otherwise.

A Keye-VL-1.5 directory (a config.json with `vision_config`) converts whole: vision tower,
projector and language model. Stage 1 starts from two separate directories instead: a Qwen3
language model plus a SigLIP-style vision tower (`vision_dir`, e.g. transformers'
SiglipVisionModel); the projector then keeps its fresh initialization (drawn from the seed and
its names), and the vision token ids come from the LM directory's tokenizer when it has one.

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
from megatron_keye.config.schema import ModelConfig, TrainConfig
from megatron_keye.models.keye_vl import hf_adapter, hf_vision
from megatron_keye.runtime.spawn import spawn_ranks

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "chat_template.json", "chat_template.jinja", "generation_config.json",
)


def import_hf(hf_dir: str, out_dir: str, *, tensor: int = 1, pipeline: int = 1,
              precision: str = "fp32", vision_dir: str | None = None) -> None:
    """Write a native checkpoint (weights only) of a Qwen3ForCausalLM or Keye-VL-1.5 directory,
    or of a Qwen3 directory plus a SigLIP vision tower directory (`vision_dir`)."""
    world = tensor * pipeline
    # Everything that can be checked without the weights fails here, in one line.
    config = hf_model_config(hf_dir, tensor=tensor, pipeline=pipeline, precision=precision,
                             vision_dir=vision_dir)
    validate(config, world)
    _safetensors_index(Path(hf_dir))
    if vision_dir is not None:
        hf_vision.hf_prefix(_safetensors_index(Path(vision_dir)), where=vision_dir)
    kwargs = dict(hf_dir=hf_dir, out_dir=out_dir, tensor=tensor, pipeline=pipeline,
                  precision=precision, vision_dir=vision_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) == world and "RANK" in os.environ:
        _import_rank(**kwargs)
        return
    spawn_ranks(_import_rank, world, threads=max(1, (os.cpu_count() or 1) // world), **kwargs)


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


def _read_config_json(hf_dir: str, what: str) -> tuple[dict, Path]:
    directory = Path(hf_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such directory (expected a Hugging Face model)")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found (a {what} config.json is required)")
    try:
        return json.loads(config_file.read_text()), config_file
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None


def hf_model_config(hf_dir: str, *, tensor: int, pipeline: int, precision: str,
                    vision_dir: str | None = None) -> TrainConfig:
    """A run config whose model section matches a HF Qwen3 or Keye-VL config.json (plus the
    vision tower's config.json of `vision_dir`)."""
    hf, config_file = _read_config_json(hf_dir, "Qwen3")
    try:
        model = hf_adapter.model_fields_from_hf_config(hf)
    except KeyError as err:
        raise ValueError(f"{config_file}: missing field {err}") from None
    if vision_dir is not None:
        if "vision" in model:
            raise ValueError(f"{config_file}: already a vision-language model; vision_dir "
                             f"applies to a text-only Qwen3 directory")
        vision_hf, vision_file = _read_config_json(vision_dir, "SigLIP")
        model["vision"] = hf_vision.vision_fields_from_hf_config(vision_hf, where=str(vision_file))
        model.update(_vision_token_ids(Path(hf_dir)))
    if "vision" in model:
        for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id"):
            value = model.get(key, getattr(ModelConfig, key))
            if not 0 <= value < model["vocab_size"]:
                raise ValueError(f"{config_file}: {key}={value} is outside the vocabulary "
                                 f"(vocab_size={model['vocab_size']})")
    stage = {}
    if model.get("output_head") == "value":  # a sequence classifier: a reward model
        stage = {"loss_head": "reward", "head": {"reward": {"pad_token_id": hf.get("pad_token_id")}}}
    return config_from_dict({
        "model": {"flavor": "8b", **model},
        "parallel": {"tensor": tensor, "pipeline": pipeline},
        "precision": precision,
        "stage": stage,
        "data": media_budgets_from_hf(Path(hf_dir)),
    })


PREPROCESSOR_CONFIG = "preprocessor_config.json"


def preprocessor_config_dict(data) -> dict:
    """The image/video budgets a vision model was trained with, in the processor's terms
    (pixels; one LLM token per 28x28 pixels), so an exported model is fed as it was trained."""
    from megatron_keye.data.media.image import TOKEN_PIXELS, ImageConfig

    image = ImageConfig()
    return {
        "processor_class": "KeyeVL1_5Processor",
        "patch_size": image.patch_size,
        "merge_size": image.merge_size,
        "image_mean": list(image.image_mean),
        "image_std": list(image.image_std),
        "max_pixels": int(data.image_max_tokens) * TOKEN_PIXELS,
        "video_total_pixels": int(data.video_max_tokens) * TOKEN_PIXELS,
    }


def media_budgets_from_hf(hf_dir: Path) -> dict:
    """`data.image_max_tokens` / `data.video_max_tokens` from an HF directory's processor
    config (none when it has no such file or keys)."""
    from megatron_keye.data.media.image import TOKEN_PIXELS

    path = hf_dir / PREPROCESSOR_CONFIG
    if not path.is_file():
        return {}
    processor = json.loads(path.read_text())
    budgets = {}
    if "max_pixels" in processor:
        budgets["image_max_tokens"] = int(processor["max_pixels"]) // TOKEN_PIXELS
    if "video_total_pixels" in processor:
        budgets["video_max_tokens"] = int(processor["video_total_pixels"]) // TOKEN_PIXELS
    return budgets


def _vision_token_ids(hf_dir: Path) -> dict:
    """The vision marker ids of the tokenizer in `hf_dir` (none when it ships no tokenizer)."""
    if not (hf_dir / "tokenizer.json").is_file():
        return {}
    from megatron_keye.data.text.tokenizer import KeyeTokenizer

    ids = KeyeTokenizer.from_dir(hf_dir).vision
    return {"image_token_id": ids.image_pad, "video_token_id": ids.video_pad,
            "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end}


def _read_tensors(index: dict[str, str], names, *, source: str, dtype) -> dict:
    from safetensors import safe_open

    tensors = {}
    for name in names:
        if name not in index:
            raise KeyError(f"{source}: tensor {name!r} is missing from the safetensors files")
        with safe_open(index[name], framework="pt") as f:
            tensors[name] = f.get_tensor(name).to(dtype)
    return tensors


def _import_rank(*, hf_dir: str, out_dir: str, tensor: int, pipeline: int, precision: str,
                 vision_dir: str | None = None) -> None:
    from megatron_keye.models.keye_vl.builder import (
        build_model_chunks,
        load_full_state,
        stage_shard,
    )
    from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState
    from megatron_keye.runtime.parallel import ParallelDims

    config = hf_model_config(hf_dir, tensor=tensor, pipeline=pipeline, precision=precision,
                             vision_dir=vision_dir)
    dims = ParallelDims.from_config(config.parallel, tensor * pipeline)
    dims.initialize(seed=config.seed)
    chunks = build_model_chunks(config)
    index = _safetensors_index(Path(hf_dir))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for chunk in chunks:
        shard = stage_shard(chunk)
        wanted = hf_adapter.hf_names_for_stage(config.model, shard)
        if vision_dir is not None:
            wanted = [n for n in wanted if not n.startswith(("visual.", "mlp_AR."))]
        tensors = _read_tensors(index, wanted, source=hf_dir, dtype=dtype)
        layers = range(shard.layer_offset, shard.layer_offset + shard.num_layers)
        native = hf_adapter.hf_to_native(tensors, config.model, layers=layers)
        if vision_dir is not None and shard.pre_process:
            native.update(_siglip_tower(vision_dir, config, chunk, dtype=dtype))
        load_full_state([chunk], native)
    config.checkpoint.save_dir = out_dir
    layout = {"tensor": tensor, "pipeline": pipeline, "virtual_pipeline": 1, "context": 1, "data": 1}
    Checkpointer(config.checkpoint, run_config=config_to_dict(config), layout=layout).save(
        chunks=chunks, optimizer=None, state=TrainingState(iteration=0)
    )


def _siglip_tower(vision_dir: str, config: TrainConfig, chunk, *, dtype) -> dict:
    """Native `vision.*` tensors from a SigLIP directory plus the chunk's own (freshly
    initialized, full) `projector.*` tensors."""
    from megatron_keye.models.keye_vl.builder import named_parameters_global

    index = _safetensors_index(Path(vision_dir))
    prefix = hf_vision.hf_prefix(index, where=vision_dir)
    names = hf_vision.hf_vision_names(config.model.vision, prefix=prefix, projector=False)
    tensors = _read_tensors(index, names, source=vision_dir, dtype=dtype)
    native = hf_vision.vision_hf_to_native(tensors, config.model.vision, prefix=prefix,
                                           projector=False)
    # The projector is new in stage 1: keep the initialization (gathered to full tensors).
    native.update(_full_tensors({k: p for k, p in named_parameters_global(chunk).items()
                                 if k.startswith(hf_vision.NATIVE_PROJECTOR)}))
    return native


def _full_tensors(local: dict) -> dict:
    """Full tensors of this tensor-parallel rank's pieces (all-gathered over the TP group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for key, piece in local.items():
        piece = piece.detach()
        if size == 1 or hf_adapter.tensor_parallel_dim(key) is None:
            out[key] = piece.clone()
            continue
        pieces = [torch.empty_like(piece) for _ in range(size)]
        dist.all_gather(pieces, piece.contiguous(),
                        group=parallel_state.get_tensor_model_parallel_group())
        out[key] = hf_adapter.merge_tensor_shards(key, pieces)
    return out


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
    if config.model.vision is not None:
        (out / PREPROCESSOR_CONFIG).write_text(
            json.dumps(preprocessor_config_dict(config.data), indent=2))
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
