"""Keye-VL workers and shared data: a front-end-built batch, random HF-named weights, and the
layout cases each spawned world runs (several per world)."""

from __future__ import annotations

import torch

from tests.distributed.workers import local_grads, local_params, rank_info, tiny_config

SEQ = 64
# A vocabulary that is not a multiple of 128: padded rows and masked logit columns everywhere.
VISION = ("model.vision.flavor=tiny", "model.vocab_size=2000")


def vl_config(layout: dict, *, micro_batch: int = 2, global_batch: int = 2, extra=()):
    return tiny_config(layout, global_batch=global_batch, micro_batch=micro_batch, seq=SEQ,
                       extra=(*VISION, *extra))


# --------------------------------------------------------------------------- data (front end)
def _image(height: int, width: int, seed: int, *, min_tokens: int = 1):
    from megatron_keye.data.media.image import ImageConfig, preprocess_image
    from megatron_keye.data.media.synthetic_media import synthetic_image

    config = ImageConfig(min_pixels=min_tokens * 784, max_pixels=64 * 784)
    return preprocess_image(synthetic_image(height, width, seed=seed), config=config)


def demo_batch(*, drop_pad_in_row: int | None = None) -> dict:
    """Two rows: [text, image 56x84, text] and [text, image 28x56, text, video of 4 frames
    (slow 56x56, fast 28x28, slow 56x56, fast 28x28) with timestamps, text]."""
    from megatron_keye.data.text.tokenizer import KeyeTokenizer
    from megatron_keye.data.text.vision_tokens import image_token_ids, video_token_ids
    from megatron_keye.data.vision_batch import (
        VisionMedia,
        VisionSample,
        build_vision_batch,
        one_per_row,
    )

    tok = KeyeTokenizer.default()
    ids = tok.vision
    first, second = _image(56, 84, 1), _image(28, 56, 2)
    frames = [_image(56, 56, 3), _image(28, 28, 4), _image(56, 56, 5), _image(28, 28, 6)]
    video = VisionMedia.video(torch.cat([f.pixel_values for f in frames]),
                              torch.tensor([list(f.grid_thw) for f in frames]))
    fast = [False, True, False, True]
    # Row 0's image pads (tokens 14-19) straddle the first CP=2 chunk boundary (16).
    row0 = [*tok.encode("Here it is. Look at this:"), *image_token_ids(first.grid_thw, ids=ids),
            *tok.encode(" what is it?")]
    row1 = [*tok.encode("A"), *image_token_ids(second.grid_thw, ids=ids), *tok.encode(" and"),
            *video_token_ids(video.grids, fast=fast, timestamps=[0.0, 0.5, 1.0, 1.5],
                             tokenizer=tok),
            *tok.encode(" differ.")]
    samples = [
        VisionSample(tokens=row0, key="first",
                     media=[VisionMedia.image(first.pixel_values, first.grid_thw)]),
        VisionSample(tokens=row1, key="second",
                     media=[VisionMedia.image(second.pixel_values, second.grid_thw), video]),
    ]
    batch = build_vision_batch(one_per_row(samples), seq_length=SEQ, ids=ids, pad_id=tok.pad_id)
    if drop_pad_in_row is not None:
        tokens = batch["tokens"][drop_pad_in_row]
        where = ((tokens == ids.image_pad) | (tokens == ids.video_pad)).nonzero()[0]
        tokens[where] = tok.encode("x")[0]
    return batch


def text_batch(rows: int = 2, seed: int = 3) -> dict:
    """Random text tokens (no image pads: ids below the special tokens)."""
    from megatron_keye.models.keye_vl.rope import text_position_ids

    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, 1200, (rows, SEQ), generator=g),
        "labels": torch.randint(0, 1200, (rows, SEQ), generator=g),
        "loss_weights": (torch.rand(rows, SEQ, generator=g) < 0.8).float(),
        "position_ids": text_position_ids(rows, SEQ),
    }


# --------------------------------------------------------------------------- weights
def hf_shapes(model) -> dict[str, tuple]:
    """Every tensor of the Keye-VL-1.5 HF layout (tiny shapes) and its shape."""
    from megatron_keye.models.keye_vl.hf_vision import hf_vision_names

    h, v, f = model.hidden_size, model.vocab_size, model.ffn_hidden_size
    q, kv = model.num_attention_heads * model.head_dim, model.num_query_groups * model.head_dim
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h),
              "model.norm.weight": (h,)}
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (model.head_dim,),
            p + "self_attn.k_norm.weight": (model.head_dim,),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    vc = model.vision
    hv, fv, merged = vc.hidden_size, vc.ffn_hidden_size, vc.merged_size
    for name in hf_vision_names(vc):
        if "patch_embedding.weight" in name:
            shape = (hv, vc.num_channels, vc.patch_size, vc.patch_size)
        elif "position_embedding" in name:
            shape = (vc.position_grid**2, hv)
        elif name.startswith("mlp_AR."):
            shape = {"pre_norm.weight": (merged,), "pre_norm.bias": (merged,),
                     "linear_1.weight": (merged, merged), "linear_1.bias": (merged,),
                     "linear_2.weight": (h, merged), "linear_2.bias": (h,)}[name[7:]]
        elif "fc1.weight" in name:
            shape = (fv, hv)
        elif "fc1.bias" in name:
            shape = (fv,)
        elif "fc2.weight" in name:
            shape = (hv, fv)
        elif name.endswith("_proj.weight"):
            shape = (hv, hv)
        else:
            shape = (hv,)
        shapes[name] = shape
    return shapes


def random_hf_state(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random, non-trivial weights in HF names: norm scales near 1, biases and matrices small."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(hf_shapes(model).items()):
        noise = torch.randn(shape, generator=g)
        if len(shape) > 1:
            out[name] = noise * (0.05 if "position_embedding" in name else 0.08)
        elif "norm" in name and name.endswith("weight"):
            out[name] = 1.0 + 0.2 * noise
        else:
            out[name] = 0.1 * noise
    return out


# --------------------------------------------------------------------------- trainers
class VisionLoader:
    """Hands out a prepared global batch; each data-parallel rank takes its rows (with their
    images and frames) and cuts them into micro-batches."""

    def __init__(self, batch: dict, micro_batch: int, model):
        self.batch, self.micro_batch, self.model = batch, micro_batch, model
        self.dp_rank, self.dp_size, self.step = 0, 1, 0

    def bind(self, dp_rank: int, dp_size: int) -> None:
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def next_step(self) -> list[dict]:
        from megatron_keye.data.vision_batch import select_rows

        self.step += 1
        rows = self.batch["tokens"].size(0) // self.dp_size
        first = self.dp_rank * rows
        return [select_rows(self.batch, s, s + self.micro_batch,
                            image_token_id=self.model.image_token_id,
                            video_token_id=self.model.video_token_id)
                for s in range(first, first + rows, self.micro_batch)]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def build_vl_trainer(config, batch: dict, weights: dict | None):
    from megatron.core import parallel_state

    from megatron_keye.models.keye_vl.builder import load_full_state
    from megatron_keye.runtime.trainer import Trainer

    loader = VisionLoader(batch, config.schedule.micro_batch_size, config.model)
    trainer = Trainer(config, loader=loader)
    trainer.setup()
    loader.bind(parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size())
    if weights is not None:
        load_full_state(trainer.model, weights)
        trainer.optimizer.reload_model_params()
    return trainer


def loss_and_grads(trainer) -> dict:
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    reports = trainer.forward_backward(trainer.loader.next_step(), force_all_reduce=True)
    total, count = trainer.step_runner.global_reports(reports)["__loss__"]
    return {**rank_info(), "loss": total / count, "count": count, "grads": local_grads(trainer)}


def layouts_worker(*, cases: dict, weights: dict, batches: dict) -> dict:
    """Loss and finalized gradients of each case's batch under its layout, in one world."""
    out = {}
    for name, layout in cases.items():
        batch = batches[name]
        rows = batch["tokens"].size(0)
        config = vl_config(layout, micro_batch=layout.get("micro_batch", 2), global_batch=rows)
        out[name] = loss_and_grads(build_vl_trainer(config, batch, weights))
    return out


def four_rank_worker(*, cases: dict, weights: dict, batches: dict, imports: list) -> dict:
    """The layout cases, then HF imports (`import_hf` runs in this world's ranks)."""
    from megatron_keye.convert import import_hf

    out = layouts_worker(cases=cases, weights=weights, batches=batches)
    for source, target, kwargs in imports:
        import_hf(source, target, **kwargs)
    return out


def single_process_worker(*, weights: dict, batch: dict, mismatch: dict, text: dict,
                          exports: list = ()) -> dict:
    """The one-process reference and the one-process checks, then HF exports, in one world."""
    import pytest

    result = {}
    trainer = build_vl_trainer(vl_config({}), batch, weights)
    result["reference"] = loss_and_grads(trainer)
    # A batch without any image or video trains on a VL model; vision grads are exactly zero.
    trainer.loader = VisionLoader(text, 2, trainer.config.model)
    result["text_only"] = loss_and_grads(trainer)
    # A pad too few: an error naming the row.
    with pytest.raises(ValueError) as err:
        trainer.forward_backward([mismatch])
    result["mismatch_error"] = str(err.value)
    # Stage 1: only the projector trains.
    freeze = '["vision.*","embedding.*","decoder.*","output_layer.*"]'
    frozen = build_vl_trainer(vl_config({}, extra=(f"stage.freeze={freeze}",)), batch, weights)
    before = local_params(frozen)
    for _ in range(2):
        step = frozen.train_step(frozen.loader.next_step())
        assert step.applied
    result["freeze"] = {"before": before, "after": local_params(frozen)}
    # Native text-only logits (for transformers' Qwen3ForCausalLM on the exported LM part).
    model = trainer.model[0].module
    model.eval()
    with torch.no_grad():
        logits = model(text["tokens"], text["position_ids"])
    result["text_logits"] = logits.transpose(0, 1).contiguous()
    from megatron_keye.convert import export_hf

    for checkpoint, target, tokenizer in exports:
        export_hf(checkpoint, target, tokenizer_dir=tokenizer)
    return result
