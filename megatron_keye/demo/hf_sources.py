"""Where a Keye-VL run starts: a Qwen3 language model and a SigLIP vision tower in HF format.

A real run imports pretrained ones (Qwen3-8B, SigLIP-so400m); the demo has no hub access, so it
writes randomly initialized transformers models of the tiny flavor's shapes, with the shipped
tokenizer, and then goes through exactly the import a real stage 1 uses
(`megatron-keye convert import --hf-dir QWEN3 --vision-dir SIGLIP`).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path


def write_random_hf_sources(root: str | Path, *, flavor: str = "tiny",
                            seed: int = 0) -> tuple[Path, Path]:
    """(Qwen3 directory, SigLIP directory) of random models shaped like `flavor`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from megatron_keye.config import load_config
    from megatron_keye.data.text.tokenizer import DEFAULT_TOKENIZER_DIR
    from megatron_keye.models.keye_vl.hf_adapter import hf_config_dict

    root = Path(root)
    config = load_config(None, [f"model.flavor={flavor}", f"model.vision.flavor={flavor}"])
    model, vision = config.model, config.model.vision
    torch.manual_seed(seed)
    text = hf_config_dict(dataclasses.replace(model, vision=None))
    text = {k: v for k, v in text.items() if k not in ("architectures", "model_type")}
    lm = Qwen3ForCausalLM(Qwen3Config(**text))
    lm_dir = root / "qwen3"
    lm.save_pretrained(str(lm_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(DEFAULT_TOKENIZER_DIR) / name, lm_dir / name)
    tower = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_attention_heads,
        image_size=vision.position_grid * vision.patch_size, patch_size=vision.patch_size))
    vision_dir = root / "siglip"
    tower.save_pretrained(str(vision_dir))
    return lm_dir, vision_dir
