"""Batched generation with a KV cache over the training model chunks, at any TP/PP layout.

This is what `megatron-keye generate` runs to look at a checkpoint, and the rollout engine GSPO
reuses: the same model chunks the trainer builds (`models/keye_vl/builder.py`), loaded weights
only, in eval mode.

    result = generate(chunks, prompts, GenerationOptions(max_new_tokens=32, temperature=0.7,
                      top_p=0.9, seed=1, stop_token_ids=(eos,), samples_per_prompt=4),
                      pad_id=tokenizer.pad_id)

How it runs (every rank calls `generate` with the same prompts):
- Rows. Each prompt is repeated `samples_per_prompt` (G) times; row r of the batch is sample
  r % G of prompt r // G. Rows are left-padded to the longest prompt, so every row's next token
  goes into the same cache slot; padding slots are masked out of attention
  (`ops/attention/kv_cache.py`).
- KV cache. Our core attention keeps the *rotated* keys of every decoder layer (megatron-core's
  own inference context caches keys before rotation, which does not fit a model whose RoPE is
  applied inside core attention; the cache module says more). Prefill runs the whole prompt
  once; each decode step runs one token per row, with the rotary tables of its new position.
- Positions. Prompt tokens carry the M-RoPE ids [3, L] of the front end (`prompts.py`: text
  advances t/h/w together, images and video frames are (t, h, w) blocks); generated tokens
  continue after the prompt's largest id, equal on all three axes (spec §1.5).
- Vision. When the model has a vision tower (`KeyeVLModel`) and a prompt has images or videos,
  prefill passes their patch rows and grids to the first stage, which encodes them and puts the
  embeddings at the pad tokens. Decode steps feed plain token embeddings.
- Decode steps run the decoder layers as plain tensor code over the same weights
  (`lean_decode.py`, bit-identical to the modules; the per-op Python of megatron-core's module
  wrappers otherwise dominates a one-token step), in inference mode, with the CPU shim's
  CUDA-argument rewriting paused (`runtime/cpu_compat.py`).
- Pipeline. Stages run in order for prefill and for every decode step: a stage receives the
  previous stage's hidden states [n, b, h] (torch.distributed send/recv on the pipeline ranks),
  runs its layers and sends on; with virtual pipelining a rank runs its chunks in turn (chunk v
  of rank r is stage v * PP + r). The last stage chooses the tokens (`sampling.py`: all of its TP
  ranks gather the vocabulary and choose alike) and broadcasts tokens and log-probs to every
  stage over the pipeline group, so all ranks hold the result and agree on when to stop.
- Stopping. A row ends at its first stop token (kept in the output) or after
  `max_new_tokens`; later positions hold `pad_id` with log-prob 0. The loop ends when all rows
  have ended.

Context and sequence parallelism are not used for generation (`generate_cli.py` builds the
model without them; the weights are the same): decoding is one token per step, which neither
can split. A GPU inference engine (vLLM, SGLang)
would replace `generate` behind the same inputs and `GenerationResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_keye.ops.attention.kv_cache import KVCache, attached
from megatron_keye.post_training import lean_decode
from megatron_keye.post_training.sampling import SamplingParams, choose_tokens, row_generator
from megatron_keye.runtime.cpu_compat import device_arguments_as_given


@dataclass(kw_only=True)
class Prompt:
    """One tokenized prompt: tokens [L], M-RoPE ids [3, L], and its media (if any).

    `pixel_values` [patches, C, p, p] and `vision_grids` [items, 3] list the prompt's images and
    video frames in the order of their pad tokens (the front end's `build_prompt` fills them).
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor | None = None  # None: text positions 0..L-1
    pixel_values: torch.Tensor | None = None
    vision_grids: torch.Tensor | None = None

    def positions(self) -> torch.Tensor:
        length = self.tokens.numel()
        if self.position_ids is None:
            return torch.arange(length).view(1, length).expand(3, length)
        if tuple(self.position_ids.shape) != (3, length):
            raise ValueError(f"prompt: position_ids must be [3, {length}], got "
                             f"{tuple(self.position_ids.shape)}")
        return self.position_ids


@dataclass(kw_only=True, frozen=True)
class GenerationOptions:
    """What to generate: length, sampling, stop tokens and samples per prompt."""

    max_new_tokens: int = 32  # tokens generated per row at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass (with temperature > 0)
    seed: int = 0  # sampling seed; each row draws from its own stream (seed, global row)
    stop_token_ids: tuple[int, ...] = ()  # a row ends after generating one of these
    samples_per_prompt: int = 1  # G rows per prompt (GSPO groups)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt: must be >= 1, got {self.samples_per_prompt}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


@dataclass(kw_only=True)
class GenerationResult:
    """Per row (prompt-major, G rows per prompt): generated tokens and their log-probs.

    `tokens` [rows, max_new_tokens] (pad_id after a row ended), `logprobs` the same shape (fp32,
    0 after the end), `lengths` [rows] generated tokens per row (the stop token included),
    `stopped` [rows] whether the row ended on a stop token, `prompt_index` [rows].
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    prompt_index: torch.Tensor
    extra: dict = field(default_factory=dict)

    def row_tokens(self, row: int) -> list[int]:
        """The generated token ids of one row, without the padding after its end."""
        return self.tokens[row, : int(self.lengths[row])].tolist()


@dataclass(kw_only=True)
class _Batch:
    tokens: torch.Tensor  # [b, L] left-padded
    position_ids: torch.Tensor  # [3, b, L]
    valid: torch.Tensor  # [b, L] bool, real prompt tokens
    next_position: torch.Tensor  # [b] first decode position per row
    pixel_values: torch.Tensor | None
    vision_grids: torch.Tensor | None


def _build_batch(prompts: list[Prompt], samples: int, *, pad_id: int) -> _Batch:
    if not prompts:
        raise ValueError("generate: no prompts")
    rows = [p for p in prompts for _ in range(samples)]
    for index, prompt in enumerate(prompts):
        if prompt.tokens.dim() != 1 or prompt.tokens.numel() == 0:
            raise ValueError(f"prompt {index}: tokens must be a non-empty 1-D tensor")
        if (prompt.pixel_values is None) != (prompt.vision_grids is None):
            raise ValueError(f"prompt {index}: pixel_values and vision_grids come together")
    length = max(p.tokens.numel() for p in rows)
    b = len(rows)
    tokens = torch.full((b, length), pad_id, dtype=torch.int64)
    positions = torch.ones((3, b, length), dtype=torch.int64)  # padding at 1, as the spec's
    valid = torch.zeros((b, length), dtype=torch.bool)
    next_position = torch.zeros(b, dtype=torch.int64)
    pixels, grids = [], []
    for r, prompt in enumerate(rows):
        n = prompt.tokens.numel()
        pos = prompt.positions().long()
        tokens[r, length - n:] = prompt.tokens.long()
        positions[:, r, length - n:] = pos
        valid[r, length - n:] = True
        next_position[r] = int(pos.max()) + 1
        if prompt.vision_grids is not None and prompt.vision_grids.numel():
            pixels.append(prompt.pixel_values.float())
            grids.append(prompt.vision_grids.long().reshape(-1, 3))
    return _Batch(tokens=tokens, position_ids=positions, valid=valid, next_position=next_position,
                  pixel_values=torch.cat(pixels) if pixels else None,
                  vision_grids=torch.cat(grids) if grids else None)


@torch.no_grad()
def generate(
    chunks: list,
    prompts: list[Prompt],
    options: GenerationOptions,
    *,
    pad_id: int,
    first_row: int = 0,
    lean: bool = True,
) -> GenerationResult:
    """Generate for `prompts` on this rank's model chunks; every rank returns the result.

    Collective over the model-parallel (TP×PP) group: its ranks must pass the same prompts
    and options. `first_row` is the global index of this batch's first row (data-parallel
    shares), which seeds each row's sampling stream. Uses our core attention's KV cache.
    Decode steps take `lean_decode`'s path where the layers allow it (bit-identical to the
    modules; `lean=False` runs the modules for every step, the reference it is tested against).
    """
    modules = [chunk.module if hasattr(chunk, "module") else chunk for chunk in chunks]
    module = modules[0]
    model_config = module.model_config
    if model_config.output_head != "lm":
        raise ValueError("model.output_head: generation needs a language-model head ('lm')")
    if parallel_state.get_context_parallel_world_size() != 1:
        raise ValueError("parallel.context: generation runs with context=1")
    if module.config.sequence_parallel:
        raise ValueError("parallel.sequence_parallel: decoding one token per step cannot be "
                         "split over the sequence; build the generation model without it")
    device = next(module.parameters()).device
    batch = _build_batch(prompts, options.samples_per_prompt, pad_id=pad_id)
    rows, prompt_length = batch.tokens.shape
    steps = options.max_new_tokens
    limit = model_config.max_position_embeddings
    if int(batch.next_position.max()) + steps > limit:
        raise ValueError(f"max_new_tokens: prompt positions up to {int(batch.next_position.max())}"
                         f" + {steps} new tokens exceed model.max_position_embeddings={limit}")
    params = options.sampling
    generators = [row_generator(options.seed, first_row + r) for r in range(rows)]
    stop_ids = torch.tensor(sorted(set(options.stop_token_ids)), dtype=torch.int64)
    key_valid = torch.ones((rows, prompt_length + steps), dtype=torch.bool)
    key_valid[:, :prompt_length] = batch.valid
    cache = KVCache(key_valid=key_valid.to(device))
    stage = _Stage(modules, device=device, batch_size=rows, lean=lean)

    out_tokens = torch.full((rows, steps), pad_id, dtype=torch.int64)
    out_logprobs = torch.zeros((rows, steps), dtype=torch.float32)
    lengths = torch.zeros(rows, dtype=torch.int64)
    stopped = torch.zeros(rows, dtype=torch.bool)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        # inference mode: no version counters or autograd bookkeeping in the per-token loop;
        # the results are written into the normal tensors allocated above
        with torch.inference_mode(), device_arguments_as_given(), attached(modules, cache):
            input_ids, position_ids = batch.tokens, batch.position_ids
            vision = (batch.pixel_values, batch.vision_grids)
            for step in range(steps):
                logits = stage.forward(input_ids, position_ids, cache, vision=vision)
                chosen = None
                if logits is not None:
                    chosen = choose_tokens(
                        logits, params=params, generators=generators,
                        vocab_size=model_config.vocab_size,
                        group=_tp_group(), tp_rank=parallel_state.get_tensor_model_parallel_rank())
                tokens, logprobs = stage.broadcast_choice(chosen)
                active = ~stopped
                out_tokens[active, step] = tokens[active]
                out_logprobs[active, step] = logprobs[active]
                lengths += active.long()
                stopped |= active & torch.isin(tokens, stop_ids)
                if bool(stopped.all()) or step + 1 == steps:
                    break
                input_ids = torch.where(stopped, torch.full_like(tokens, pad_id),
                                        tokens).view(rows, 1)
                decode_position = (batch.next_position + step).view(1, rows, 1)
                position_ids = decode_position.expand(3, rows, 1)
                vision = (None, None)
    finally:
        for m, mode in zip(modules, was_training, strict=True):
            m.train(mode)
    prompt_index = torch.arange(len(prompts)).repeat_interleave(options.samples_per_prompt)
    return GenerationResult(tokens=out_tokens, logprobs=out_logprobs, lengths=lengths,
                            stopped=stopped, prompt_index=prompt_index)


def _tp_group():
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


class _Stage:
    """This rank's model chunks in pipeline order: for each, receive (or embed), run its layers,
    send on (or keep the logits). With virtual pipelining, chunk v of pipeline rank r is global
    stage v * PP + r, so the chain of sends wraps from the last pipeline rank to the first."""

    def __init__(self, modules: list, *, device: torch.device, batch_size: int, lean: bool):
        self.modules = modules
        # one-token steps skip the module wrappers where every chunk's layers allow it
        lean = lean and all(lean_decode.unsupported(m) is None for m in modules)
        self.lean = [lean_decode.LeanDecoder(m) for m in modules] if lean else None
        self.device = device
        self.batch_size = batch_size
        self.hidden_size = modules[0].config.hidden_size
        self.dtype = modules[0].config.pipeline_dtype or modules[0].config.params_dtype
        self.pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache, *,
                vision: tuple) -> torch.Tensor | None:
        """Last-position vocab-parallel logits [b, V/tp] on the last stage, else None."""
        n = input_ids.size(1)
        input_ids = input_ids.to(self.device)
        position_ids = position_ids.to(self.device)
        logits = None
        lean = self.lean is not None and n == 1 and vision[0] is None
        for index, module in enumerate(self.modules):
            if lean:
                hidden = (module.embedding(input_ids=input_ids, position_ids=None)
                          if module.pre_process else self._receive(n))
                out = self.lean[index](hidden, position_ids)
            elif module.pre_process:
                out = self._first(module, input_ids, position_ids, vision)
            else:
                module.set_input_tensor(self._receive(n))
                out = module(None, position_ids)
            if module.post_process:
                logits = out if lean else out[-1]
            else:
                dist.send(out.to(self.dtype).contiguous(),
                          dst=parallel_state.get_pipeline_model_parallel_next_rank())
        cache.advance(n)  # every layer of this rank has written its n slots
        return logits

    def _receive(self, n: int) -> torch.Tensor:
        """The previous pipeline stage's hidden states [n, b, h]."""
        hidden = torch.empty((n, self.batch_size, self.hidden_size), dtype=self.dtype,
                             device=self.device)
        dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        return hidden

    def _first(self, module, input_ids, position_ids, vision) -> torch.Tensor:
        """The first stage: token embeddings, with the prompt's images/videos in prefill."""
        pixel_values, grids = vision
        if pixel_values is None:
            embedded = module.embedding(input_ids=input_ids, position_ids=None)
            return module(None, position_ids, decoder_input=embedded)
        if not getattr(module, "consumes_vision", False):
            raise ValueError("--image/--video: this model has no vision tower "
                             "(model.vision is not set)")
        return module(input_ids, position_ids, pixel_values=pixel_values.to(self.device),
                      vision_grids=grids.to(self.device))

    def broadcast_choice(self, chosen: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The last stage's (tokens, log-probs) on every stage of this pipeline (CPU tensors)."""
        packed = torch.empty((2, self.batch_size), dtype=torch.float64, device=self.device)
        if chosen is not None:
            tokens, logprobs = chosen
            packed[0] = tokens.to(torch.float64)
            packed[1] = logprobs.to(torch.float64)
        if self.pipelined:
            dist.broadcast(packed, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        packed = packed.cpu()
        return packed[0].round().long(), packed[1].float()
