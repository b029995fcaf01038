"""Measure the activation memory of one forward pass of this project's model, in-process.

Method: every tensor autograd saves for the backward pass goes through
`torch.autograd.graph.saved_tensors_hooks`; its storage is recorded once (keyed by the storage's
data pointer, so views and tensors saved by several ops count once), and storages that belong
to parameters are left out. The sum is the activation memory the backward pass needs (the
quantity the planner's activation model predicts; Korthikanti et al. count the same), measured
on any device, independent of the allocator's caching and of other processes sharing the
machine. Tensors that live only briefly inside the forward (e.g. bf16 logits before their fp32
copy) are not in it: the planner's `transient` term models those separately.

The caller provides the process groups: `measure_activation_bytes` needs megatron-core's parallel
state initialized for its layout (`measure_worker` does it: a world of TP x PP ranks), so a test
runs it in spawned processes (`megatron_keye.testing.distributed.run_workers`). Each rank counts
its own saved tensors, which is what the planner predicts per rank.
"""

from __future__ import annotations

from collections import defaultdict


class SavedTensorCounter:
    """Context manager counting the unique storages autograd saves for backward (bytes)."""

    def __init__(self, exclude: list | None = None):
        self._exclude = {p.untyped_storage().data_ptr() for p in (exclude or [])}
        self.storages: dict[int, int] = {}
        self.by_shape: dict[tuple, int] = defaultdict(int)
        self._hooks = None

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr not in self.storages:
            self.storages[ptr] = storage.nbytes()
            self.by_shape[(tuple(tensor.shape), str(tensor.dtype))] += storage.nbytes()
        return tensor

    def __enter__(self):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def total_bytes(self) -> int:
        return sum(self.storages.values())


def measure_activation_bytes(*, flavor: str = "tiny", seq: int = 256, micro_batch: int = 2,
                             precision: str = "fp32", recompute: str = "none",
                             with_loss: bool = True, seed: int = 0, tensor: int = 1,
                             sequence_parallel: bool = False, pipeline: int = 1) -> dict:
    """Bytes saved for backward by one forward (+ LM loss) of `flavor` on this rank.

    Needs megatron-core's parallel state for the layout (`tensor` x `pipeline` ranks; see
    `measure_worker`). A pipeline stage other than the first is fed a random hidden-state input
    as its previous stage would send it; one that is not last sums its output instead of a loss.
    Also runs the backward pass so the measurement is of a real training step. Returns total
    bytes, the pipeline stage and the largest saved shapes.
    """
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from megatron_keye.config import load_config
    from megatron_keye.models.keye_vl.builder import build_model_chunks

    config = load_config(None, [
        f"model.flavor={flavor}", f"precision={precision}", f"data.seq_length={seq}",
        f"schedule.micro_batch_size={micro_batch}", "logging.wandb_mode=disabled",
        f"model.recompute={recompute}", f"parallel.tensor={tensor}",
        f"parallel.pipeline={pipeline}",
        f"parallel.sequence_parallel={str(sequence_parallel).lower()}",
    ])
    (model,) = build_model_chunks(config)
    model.train()
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.model.vocab_size, (micro_batch, seq), generator=generator)
    labels = torch.randint(0, config.model.vocab_size, (seq, micro_batch), generator=generator)
    positions = torch.arange(seq).expand(3, micro_batch, seq).contiguous()
    params = list(model.parameters())
    if not first:
        rows = seq // tensor if sequence_parallel else seq
        hidden = torch.randn(rows, micro_batch, config.model.hidden_size, generator=generator,
                             dtype=params[0].dtype, requires_grad=True)
        model.set_input_tensor(hidden)
    with SavedTensorCounter(exclude=params) as counter:
        output = model(ids, positions)
        if last and with_loss:
            loss = tensor_parallel.vocab_parallel_cross_entropy(output.float(), labels).sum()
        else:
            loss = output.float().sum()
    del output
    loss.backward()
    largest = sorted(counter.by_shape.items(), key=lambda kv: -kv[1])[:12]
    stage = "only" if first and last else "first" if first else "last" if last else "middle"
    return {
        "bytes": counter.total_bytes,
        "stage": stage,
        "tensors": len(counter.storages),
        "largest": [{"shape": list(s), "dtype": d, "bytes": b} for (s, d), b in largest],
    }


def measure_worker(*, tensor: int = 1, pipeline: int = 1, **kwargs) -> dict:
    """`measure_activation_bytes` on every rank of a fresh `tensor` x `pipeline` world (for
    `run_workers(..., tensor * pipeline)`)."""
    from megatron_keye.runtime.parallel import ParallelDims

    ParallelDims(tensor=tensor, pipeline=pipeline).initialize(seed=0)
    return measure_activation_bytes(tensor=tensor, pipeline=pipeline, **kwargs)


def measure_vision_activation_bytes(*, vision_flavor: str = "tiny", lm_hidden: int = 64,
                                    grids: tuple[tuple[int, int, int], ...] = ((1, 16, 16),),
                                    precision: str = "fp32", tensor: int = 1,
                                    sequence_parallel: bool = False, recompute: str = "none",
                                    seed: int = 0) -> dict:
    """Bytes saved for backward by the vision tower + projector encoding `grids` on this rank.

    What the first pipeline stage keeps for its visual patches on top of the decoder's
    activations (`measure_activation_bytes`). Needs megatron-core's parallel state with TP =
    `tensor` (`measure_vision_worker`). The projected embeddings are summed as the loss (their
    merge into the token embeddings saves only index tensors). Returns total bytes, the patch
    count, this rank's tower + projector parameter count and the largest saved shapes. With
    `recompute="full"` (`vision.recompute`) the forward keeps only the layer inputs; the bytes
    one re-run layer saves in the backward pass (the largest over layers, freed before the next
    one) are `recompute_bytes`, 0 without recompute.
    """
    import torch

    from megatron_keye.config.schema import ParallelConfig, VisionConfig
    from megatron_keye.models.keye_vl.projector import Projector
    from megatron_keye.models.keye_vl.vision import VisionTower

    vision = VisionConfig.from_flavor(vision_flavor, recompute=recompute)
    parallel = ParallelConfig(tensor=tensor, sequence_parallel=sequence_parallel)
    tower = VisionTower(vision, parallel=parallel, precision=precision)
    projector = Projector(vision, lm_hidden_size=lm_hidden, parallel=parallel,
                          precision=precision)
    grid = torch.tensor(grids, dtype=torch.long)
    patches = int(grid.prod(dim=1).sum())
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(patches, vision.num_channels, vision.patch_size, vision.patch_size,
                         generator=generator)
    params = [*tower.parameters(), *projector.parameters()]
    with SavedTensorCounter(exclude=params) as counter:
        loss = projector(tower(pixels, grid), grid).float().sum()
    # Under full recompute each layer's forward runs again (with grad) in the backward pass:
    # one counter over the backward, split at every layer's start.
    starts: list[int] = []
    with SavedTensorCounter(exclude=params) as rerun:
        hooks = [layer.register_forward_pre_hook(
            lambda module, args: starts.append(rerun.total_bytes) if torch.is_grad_enabled()
            else None) for layer in tower.encoder.layers]
        loss.backward()
    for hook in hooks:
        hook.remove()
    bounds = [*starts, rerun.total_bytes]
    per_layer = [b - a for a, b in zip(bounds, bounds[1:])] if starts else []
    largest = sorted(counter.by_shape.items(), key=lambda kv: -kv[1])[:16]
    return {
        "bytes": counter.total_bytes,
        "recompute_bytes": max(per_layer, default=0),
        "patches": patches,
        "params": sum(p.numel() for p in params),
        "tensors": len(counter.storages),
        "largest": [{"shape": list(s), "dtype": d, "bytes": b} for (s, d), b in largest],
    }


def measure_vision_worker(*, cases: list[dict], **kwargs) -> list[dict]:
    """`measure_vision_activation_bytes` for each case (`tensor`, `sequence_parallel`,
    `recompute`) on every
    rank of one spawned world, re-initializing the parallel state between cases (the world
    size must be a multiple of every case's `tensor`; the rest is data parallel)."""
    import os

    from megatron_keye.runtime.parallel import ParallelDims

    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = []
    for case in cases:
        tensor = case.get("tensor", 1)
        ParallelDims(tensor=tensor, data=world // tensor).initialize(seed=0)
        out.append({**case, **measure_vision_activation_bytes(**kwargs, **case)})
    return out
