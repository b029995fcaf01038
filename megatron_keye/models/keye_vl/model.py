"""KeyeVLModel: the vision tower and projector in front of the Qwen3 decoder, one pipeline stage.

It is a `Qwen3LanguageModel` (same decoder, same parameter names, same loss-head output) whose
first stage (the first virtual chunk of the first pipeline rank) also holds `vision`
(`VisionTower`) and `projector` (`Projector`). There, every image and video frame of the
micro-batch is encoded and the projected embeddings replace the token embeddings at the
`<|image_pad|>`/`<|video_pad|>` positions, in order (`vision_placement.py`: a count mismatch is
an error naming the batch row and sample). Other stages are the plain decoder: they never see
vision inputs and their schedule is the text model's. Position ids are the batch's M-RoPE ids
(built by the front end, `data/text/vision_tokens.py`).

Under context parallelism the CP ranks of a data-parallel rank split the encoding by whole
images/frames and route each embedding to the rank holding its pad (all-to-all); under
sequence parallelism the merged embeddings are scattered like the text embeddings.

A rank whose vision tower has nothing to encode in a micro-batch (no images in the batch, or
none assigned to it under CP) still touches its trainable vision parameters with a zero-valued
term, so every parameter gets a (zero) gradient: megatron-core's overlapped gradient reduction
expects every bucket to be complete, and the CP all-to-all's backward must run on every rank.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig

from megatron_keye.config.schema import ModelConfig, ParallelConfig
from megatron_keye.models.keye_vl.language import Qwen3LanguageModel
from megatron_keye.models.keye_vl.projector import Projector
from megatron_keye.models.keye_vl.vision import VisionTower
from megatron_keye.models.keye_vl.vision_placement import (
    all_to_all_rows,
    check_counts,
    gather_layout,
    item_costs,
    plan_placement,
    tokens_per_item,
)


class KeyeVLModel(Qwen3LanguageModel):
    """One pipeline (virtual) stage of Keye-VL: [vision tower + projector +] Qwen3 decoder."""

    # The model step passes `pixel_values`/`vision_grids` only to models that take them.
    consumes_vision = True

    def __init__(
        self,
        config: TransformerConfig,
        *,
        model: ModelConfig,
        parallel: ParallelConfig,
        precision: str = "fp32",
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        parallel_output: bool = True,
        cp_comm: str = "p2p",
        cp_a2a_size: int = 1,
    ):
        if model.vision is None:
            raise ValueError("KeyeVLModel needs model.vision (a vision tower config)")
        super().__init__(config, model=model, pre_process=pre_process,
                         post_process=post_process, vp_stage=vp_stage,
                         parallel_output=parallel_output, cp_comm=cp_comm,
                         cp_a2a_size=cp_a2a_size)
        self.vision_config = model.vision
        self.pad_token_ids = (model.image_token_id, model.video_token_id)
        if pre_process:
            self.vision = VisionTower(model.vision, parallel=parallel, precision=precision,
                                      attention_backend=model.attention_backend)
            self.projector = Projector(model.vision, lm_hidden_size=model.hidden_size,
                                       parallel=parallel, precision=precision)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        decoder_input: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_grids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`Qwen3LanguageModel.forward` plus the batch's vision fields (used on the first stage).

        pixel_values [patches, C, p, p] and vision_grids [items, 3] cover the whole micro-batch
        (every CP rank gets all of them); input_ids, segments and positions are this rank's
        tokens as the CP split leaves them.
        """
        if self.pre_process and decoder_input is None:
            decoder_input = self.embed_with_vision(
                input_ids, pixel_values=pixel_values, vision_grids=vision_grids,
                segments=segments, positions=positions,
            )
        return super().forward(input_ids, position_ids, attention_mask,
                               decoder_input=decoder_input, segments=segments,
                               positions=positions)

    # ------------------------------------------------------------------------------------
    def embed_with_vision(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None,
        vision_grids: torch.Tensor | None,
        segments: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [s(/tp), b, h] with the vision embeddings at the pad positions."""
        text = self.embedding(input_ids=input_ids, position_ids=None)
        image_id, video_id = self.pad_token_ids
        pads = (input_ids == image_id) | (input_ids == video_id)  # [b, n]
        if (pixel_values is None) != (vision_grids is None):
            raise ValueError("batch: pixel_values and vision_grids come together")
        if vision_grids is None or vision_grids.numel() == 0:
            if bool(pads.any()):
                row = int(pads.any(dim=1).nonzero()[0])
                raise ValueError(f"batch row {row}: holds {int(pads[row].sum())} image/video pad "
                                 f"tokens but the batch has no pixel_values/vision_grids")
            return text + self._unused_vision_term(text)
        cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
        grids = vision_grids.long()
        counts = tokens_per_item(grids.cpu(), self.vision_config.spatial_merge_size)
        layout = gather_layout(pads, positions=positions, sample_ids=segments,
                               group=cp_group if cp_size > 1 else None)
        check_counts(layout, counts)
        costs = item_costs(grids.cpu(), hidden=self.vision_config.hidden_size,
                           ffn_hidden=self.vision_config.ffn_hidden_size)
        plan = plan_placement(layout, counts, costs, cp_size=cp_size, cp_rank=cp_rank)
        encoded = self._encode(pixel_values, grids, plan.items, every=cp_size == 1)
        if encoded is None:
            encoded = text.new_zeros(0, text.size(-1)) + self._unused_vision_term(text)
        if cp_size > 1:
            encoded = all_to_all_rows(encoded[plan.send_order], send_counts=plan.send_counts,
                                      recv_counts=plan.recv_counts, group=cp_group)
        rows, n = input_ids.shape
        dense = encoded.new_zeros(rows, n, encoded.size(-1))
        dense = dense.index_put((plan.rows, plan.cols), encoded.to(dense.dtype))
        dense = dense.transpose(0, 1).contiguous()  # [n, b, h]
        mask = pads.transpose(0, 1).unsqueeze(-1).contiguous()  # [n, b, 1]
        if self.config.sequence_parallel:
            dense = tensor_parallel.scatter_to_sequence_parallel_region(dense)
            tp = parallel_state.get_tensor_model_parallel_world_size()
            part = n // tp
            start = parallel_state.get_tensor_model_parallel_rank() * part
            mask = mask[start : start + part]
        # Contiguous in [s, b, h] order (pipeline sends need it), like the text embeddings.
        return torch.where(mask, dense.to(text.dtype), text).contiguous()

    def _encode(self, pixel_values: torch.Tensor, grids: torch.Tensor, items: list[int], *,
                every: bool) -> torch.Tensor | None:
        """Projected embeddings [tokens, h] of `items` (in order), or None for no items."""
        if not items:
            return None
        if not every:
            patches = (grids[:, 0] * grids[:, 1] * grids[:, 2]).tolist()
            starts = [0]
            for p in patches:
                starts.append(starts[-1] + p)
            index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in items])
            pixel_values = pixel_values.index_select(0, index.to(pixel_values.device))
            grids = grids[torch.tensor(items, device=grids.device)]
        features = self.vision(pixel_values, grids)
        return self.projector(features, grids)

    def _unused_vision_term(self, like: torch.Tensor) -> torch.Tensor:
        """0 · Σ trainable vision/projector parameters (a zero that gives each a zero grad)."""
        params = [p for m in (self.vision, self.projector) for p in m.parameters()
                  if p.requires_grad]
        if not params or not torch.is_grad_enabled():
            return like.new_zeros(())
        return torch.stack([p.sum() for p in params]).sum().to(like.dtype) * 0.0
