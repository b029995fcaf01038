"""Measure the activation memory of one forward pass of this project's model, in-process.

Method: every tensor autograd saves for the backward pass goes through
`torch.autograd.graph.saved_tensors_hooks`; its storage is recorded once (keyed by the storage's
data pointer, so views and tensors saved by several ops count once), and storages that belong
to parameters are left out. The sum is the activation memory the backward pass needs (the
quantity the planner's activation model predicts; Korthikanti et al. count the same), measured
on any device, independent of the allocator's caching and of other processes sharing the
machine. Tensors that live only briefly inside the forward (e.g. bf16 logits before their fp32
copy) are not in it: the planner's `transient` term models those separately.

The caller provides the process group: `measure_activation_bytes` needs megatron-core's parallel
state initialized (a world of one is enough: `ParallelDims().initialize(seed=0)`), so a test runs
it in a spawned process (`megatron_keye.testing.distributed.run_workers`).
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
                             with_loss: bool = True, seed: int = 0) -> dict:
    """Bytes saved for backward by one forward (+ LM loss) of `flavor` on this process's device.

    Needs megatron-core's parallel state (a world of one). Also runs the backward pass so the
    measurement is of a real training step. Returns total bytes and the largest saved shapes.
    """
    import torch
    from megatron.core import tensor_parallel

    from megatron_keye.config import load_config
    from megatron_keye.models.keye_vl.builder import build_model_chunks

    config = load_config(None, [
        f"model.flavor={flavor}", f"precision={precision}", f"data.seq_length={seq}",
        f"schedule.micro_batch_size={micro_batch}", "logging.wandb_mode=disabled",
    ])
    (model,) = build_model_chunks(config)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.model.vocab_size, (micro_batch, seq), generator=generator)
    labels = torch.randint(0, config.model.vocab_size, (seq, micro_batch), generator=generator)
    positions = torch.arange(seq).expand(3, micro_batch, seq).contiguous()
    params = list(model.parameters())
    with SavedTensorCounter(exclude=params) as counter:
        logits = model(ids, positions)
        if with_loss:
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).sum()
        else:
            loss = logits.float().sum()
    del logits
    loss.backward()
    largest = sorted(counter.by_shape.items(), key=lambda kv: -kv[1])[:12]
    return {
        "bytes": counter.total_bytes,
        "tensors": len(counter.storages),
        "largest": [{"shape": list(s), "dtype": d, "bytes": b} for (s, d), b in largest],
    }


def measure_worker(**kwargs) -> dict:
    """`measure_activation_bytes` in a fresh world of one (for `run_workers(..., 1)`)."""
    from megatron_keye.runtime.parallel import ParallelDims

    ParallelDims().initialize(seed=0)
    return measure_activation_bytes(**kwargs)
