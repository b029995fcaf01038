"""Atomic, resharding checkpoints on megatron-core `dist_checkpointing`.

Layout of `save_dir`:

    iter_0000100/      one checkpoint: dist_checkpointing shards + common.pt + config.yaml
    latest             the name of the newest complete checkpoint (rewritten atomically)

A checkpoint is written into `.tmp_iter_…`, renamed when every rank has finished, and only then
does `latest` move, so a crash at any moment leaves the previous checkpoint loadable. It holds the
model, the optimizer (in megatron-core's `fully_reshardable` format by default), the LR scheduler, per-rank RNG
states, the data loader's position, the iteration and the resolved config. Model weights load into
any TP/PP/DP layout and any `parallel.zero_stage` (stages 2/3 write and read them as whole
tensor-parallel pieces, like stage 1); so does the optimizer state in the `fully_reshardable`
format within zero_stage 1 (at 2/3 it loads only at 2/3 in the same layout); RNG states are
restored only when the layout is unchanged (a new layout draws fresh streams, which is logged).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_keye.config.schema import CheckpointConfig
from megatron_keye.runtime.mcore_fallback import ensure_optimizer_state
from megatron_keye.runtime.optim import (
    optimizer_sharded_state_dict,
    restore_dtensor_optimizer_state,
    whole_parameters,
)

log = logging.getLogger(__name__)

LATEST = "latest"
# Common-dict marker of checkpoints whose model weights are whole TP pieces at every zero_stage
# (zero_stage 2/3 checkpoints written before it hold FSDP2 row shards: same layout only).
WHOLE_WEIGHTS = "whole_tp_pieces"
_TMP, _OLD = ".tmp_", ".old_"  # a checkpoint being written; one set aside while re-saved


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path | None:
    """A checkpoint directory from either itself or a save dir with a `latest` pointer.

    Returns None when `path` is a save dir that holds no complete checkpoint yet.
    """
    root = Path(path)
    if (root / "metadata.json").exists():
        return root
    pointer = root / LATEST
    if pointer.exists():
        target = root / pointer.read_text().strip()
        if (target / "metadata.json").exists():
            return target
        set_aside = root / f"{_OLD}{target.name}"
        if (set_aside / "metadata.json").exists():
            # A crash while re-saving that very iteration: its previous copy is still whole.
            return set_aside
        raise FileNotFoundError(f"{pointer} names {target.name}, which is not a checkpoint")
    if root.exists() and any(root.glob("iter_*/metadata.json")):
        raise FileNotFoundError(f"{root} has checkpoints but no '{LATEST}' pointer")
    return None


@dataclass
class TrainingState:
    """Everything besides tensors that a resumed run needs."""

    iteration: int = 0
    scheduler: dict | None = None
    data: dict | None = None
    counters: dict | None = None
    head: dict | None = None  # the loss head's running state (heads/base.py::HeadBase.state_dict)


class Checkpointer:
    """Saves and loads the training state of one run."""

    def __init__(self, config: CheckpointConfig, *, run_config: dict, layout: dict):
        self.config = config
        self.run_config = run_config
        self.layout = layout

    # ----------------------------------------------------------------------------- saving
    def save(self, *, chunks, optimizer, state: TrainingState) -> Path:
        """Write a checkpoint of this iteration and move `latest` to it (collective).

        `optimizer=None` writes weights only (what the HF importer produces).
        """
        root = Path(self.config.save_dir)
        name = checkpoint_name(state.iteration)
        tmp, final = root / f"{_TMP}{name}", root / name
        rank = dist.get_rank()
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            _clean_debris(root)
            tmp.mkdir()
        dist.barrier()
        fmt = self.config.optimizer_format
        sharded = {"model": _model_sharded_state(chunks)}
        if optimizer is not None:
            # The nested per-chunk dict, never a merged one: see _model_sharded_state.
            sharded["optimizer"] = optimizer_sharded_state_dict(
                optimizer,
                _optimizer_model_state(chunks, sharded["model"]),
                is_loading=False,
                metadata={"distrib_optim_sharding_type": fmt},
            )
        sharded["rng"] = _rng_sharded_object()
        sharded.update(
            iteration=state.iteration,
            scheduler=state.scheduler,
            data=state.data,
            counters=state.counters or {},
            head=state.head or {},
            config=self.run_config,
            layout=self.layout,
            has_optimizer=optimizer is not None,
            weights_format=WHOLE_WEIGHTS,
        )
        dist_checkpointing.save(
            sharded, str(tmp), content_metadata={"distrib_optim_sharding_type": fmt}
        )
        dist.barrier()
        if rank == 0:
            with open(tmp / "config.yaml", "w") as f:
                yaml.safe_dump(self.run_config, f, sort_keys=False)
            _commit(tmp, final, root)
            self._prune(root, keep=name)
        dist.barrier()
        return final

    def _prune(self, root: Path, keep: str) -> None:
        if self.config.keep_last <= 0:
            return
        done = sorted(p for p in root.glob("iter_*") if (p / "metadata.json").exists())
        for old in done[: -self.config.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------------------- loading
    def load(self, path, *, chunks, optimizer, weights_only: bool = False) -> TrainingState:
        """Load a checkpoint into live model chunks (and optimizer); returns the training state."""
        directory = resolve_checkpoint_dir(path)
        if directory is None:
            raise FileNotFoundError(f"checkpoint.load: no checkpoint found at {path}")
        common = dist_checkpointing.load_common_state_dict(str(directory))
        _check_same_vocabulary(common.get("config") or {}, self.run_config, directory)
        if not common.get("has_optimizer", True):
            # A converted (e.g. imported from HF) checkpoint: weights only, training starts fresh.
            weights_only = True
        if _starts_value_head(common.get("config") or {}, self.run_config, directory):
            weights_only = True  # a reward model starting from a language model: a new run
        same_layout = common.get("layout") == self.layout
        meta = dist_checkpointing.load_content_metadata(str(directory)) or {}
        fmt = meta.get("distrib_optim_sharding_type", self.config.optimizer_format)
        load_optimizer = optimizer is not None and not weights_only
        if load_optimizer and fmt == "dp_reshardable" and not _model_parallel_unchanged(
            common.get("layout"), self.layout
        ):
            raise ValueError(
                f"checkpoint {directory} stores its optimizer as dp_reshardable, which cannot "
                f"load into a different tensor/pipeline layout ({common.get('layout')} -> "
                f"{self.layout}); set checkpoint.load_weights_only=true or resave with "
                f"checkpoint.optimizer_format=fully_reshardable"
            )
        legacy = _check_zero_stage_fits(
            common, chunks, self.layout, directory, with_optimizer=load_optimizer
        )
        if legacy:  # an older zero_stage 2/3 checkpoint: FSDP2 row shards, same layout
            sharded = {"model": _optimizer_model_state(chunks, None)}
        else:
            sharded = {"model": _model_sharded_state(chunks)}
        fresh = _keep_fresh_value_heads(sharded["model"], common.get("config") or {})
        if load_optimizer:
            ensure_optimizer_state(optimizer)
            sharded["optimizer"] = optimizer_sharded_state_dict(
                optimizer,
                sharded["model"] if legacy else _optimizer_model_state(chunks, sharded["model"]),
                is_loading=True,
                metadata={"distrib_optim_sharding_type": fmt},
            )
        if same_layout and not weights_only:
            sharded["rng"] = _rng_sharded_object()
        loaded = dist_checkpointing.load(sharded, str(directory))
        for index, chunk in enumerate(chunks):
            state = loaded["model"][f"chunk{index}"]
            state.update(fresh.get(f"chunk{index}", {}))
            if hasattr(chunk, "load_local_state_dict"):  # zero_stage 2/3: into the DTensors
                chunk.load_local_state_dict(state)
            else:
                _unwrap(chunk).load_state_dict(state, strict=True)
        if load_optimizer:
            # no_grad: megatron-core's load_parameter_state_from_dp_reshardable
            # (optimizer/distrib_optimizer.py:1772, unlike its fully_reshardable sibling at :2069)
            # copies into fp32 main params, which are views of the model's leaf parameters.
            with torch.no_grad():
                optimizer.load_state_dict(loaded["optimizer"])
            restore_dtensor_optimizer_state(optimizer)  # zero_stage 2/3 (else a no-op)
        elif optimizer is not None:
            optimizer.reload_model_params()
        if "rng" in loaded:
            _restore_rng(loaded["rng"])
        elif not weights_only:
            log.info("checkpoint layout %s differs from %s: RNG streams start fresh",
                     common.get("layout"), self.layout)
        if weights_only:
            return TrainingState()
        return TrainingState(
            iteration=int(common["iteration"]),
            scheduler=common.get("scheduler"),
            data=common.get("data"),
            counters=common.get("counters"),
            head=common.get("head"),
        )


def _clean_debris(root: Path) -> None:
    """Remove what an interrupted save left behind (rank 0, before writing a new checkpoint).

    A half-written `.tmp_iter_*` is deleted. A `.old_iter_*` is the previous copy of an
    iteration whose re-save was interrupted: it goes back in place if the new copy never
    arrived (`latest` may name it), and is deleted otherwise.
    """
    for stale in root.glob(f"{_TMP}iter_*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in root.glob(f"{_OLD}iter_*"):
        final = root / old.name[len(_OLD):]
        if (final / "metadata.json").exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
    (root / f".{LATEST}.tmp").unlink(missing_ok=True)


def _check_same_vocabulary(saved: dict, current: dict, directory: Path) -> None:
    """Refuse a checkpoint of another vocabulary: its embedding rows would load silently.

    (megatron-core loads a [V', h] embedding into a [V, h] one without complaint.)
    """
    saved_model, model = saved.get("model") or {}, current.get("model") or {}

    def padded(m: dict) -> int | None:
        if "vocab_size" not in m or "make_vocab_size_divisible_by" not in m:
            return None
        multiple = max(1, int(m["make_vocab_size_divisible_by"]))
        return -(-int(m["vocab_size"]) // multiple) * multiple

    for key, theirs, ours in (
        ("vocab_size", saved_model.get("vocab_size"), model.get("vocab_size")),
        ("make_vocab_size_divisible_by", padded(saved_model), padded(model)),
    ):
        if theirs is not None and ours is not None and theirs != ours:
            raise ValueError(
                f"model.{key}: checkpoint {directory} was saved with a vocabulary of {theirs} "
                f"rows, this run has {ours}; use the checkpoint's model settings"
            )


def _check_zero_stage_fits(common: dict, chunks, layout: dict, directory: Path, *,
                           with_optimizer: bool) -> bool:
    """Refuse the `parallel.zero_stage` combinations a checkpoint cannot load into, naming it.

    Model weights are stored as whole tensor-parallel pieces at every zero_stage (see
    `_model_sharded_state`), so they load across zero_stage 1/2/3 and layouts. The optimizer
    state is not: zero_stage 1 stores the distributed optimizer's, 2/3 the plain optimizer's
    FSDP2 row shards (laid out by the model's DTensor shards, which megatron-core's gated-MLP
    `linear_fc1` gate/up split only reproduces in the same layout). So Adam state loads only
    between zero_stage 1 runs, or between zero_stage 2/3 runs of the same layout; a zero_stage
    2/3 checkpoint written before weights were stored whole (no `weights_format`) loads only at
    zero_stage 2/3 in the same layout. Returns whether the checkpoint is such an older one.
    """
    saved_stage = int(((common.get("config") or {}).get("parallel") or {}).get("zero_stage", 1))
    saved_sharded = saved_stage > 1
    model_sharded = any(hasattr(chunk, "load_local_state_dict") for chunk in chunks)
    legacy = saved_sharded and common.get("weights_format") != WHOLE_WEIGHTS
    here = "zero_stage 2/3" if model_sharded else "zero_stage 1 (or an unwrapped model)"
    same = saved_sharded == model_sharded and common.get("layout") == layout
    if legacy and not (model_sharded and common.get("layout") == layout):
        raise ValueError(
            f"parallel.zero_stage: checkpoint {directory} was saved at zero_stage {saved_stage} "
            f"in layout {common.get('layout')} in the older FSDP2-row-shard format, which loads "
            f"only at zero_stage 2/3 in the same layout; this model is {here} in layout "
            f"{layout}. Load it there and save it again to make it reshardable"
        )
    if with_optimizer and (saved_sharded or model_sharded) and not same:
        raise ValueError(
            f"parallel.zero_stage: checkpoint {directory} was saved at zero_stage {saved_stage} "
            f"in layout {common.get('layout')}; this model is {here} in layout {layout}. Its "
            f"weights load here, its optimizer state does not (Adam state moves only between "
            f"zero_stage 1 runs or zero_stage 2/3 runs of the same layout): set "
            f"checkpoint.load_state=weights"
        )
    return legacy


def _saved_output_head(config: dict) -> str:
    return (config.get("model") or {}).get("output_head", "lm")


def _starts_value_head(saved: dict, current: dict, directory: Path) -> bool:
    """Whether a value model (reward model) loads a language model's checkpoint.

    That is allowed (its value head keeps the fresh draw); the opposite, a language model from a
    value model's checkpoint, has no output layer to load and is refused naming the field.
    """
    theirs, ours = _saved_output_head(saved), _saved_output_head(current)
    if theirs == "value" and ours != "value":
        raise ValueError(f"model.output_head: checkpoint {directory} is a value (reward) model, "
                         f"this run is {ours!r}; set model.output_head=value")
    return theirs != "value" and ours == "value"


def _keep_fresh_value_heads(model_sharded: dict, saved: dict) -> dict[str, dict]:
    """Take a value model's `value_head.*` out of the load when the checkpoint has none.

    Returns, per chunk, the model's own (freshly drawn) tensors under those keys, to be loaded
    back unchanged.
    """
    if _saved_output_head(saved) == "value":
        return {}
    kept = {}
    for chunk, state in model_sharded.items():
        keys = [k for k in state if k.startswith("value_head.")]
        if keys:
            kept[chunk] = {k: state.pop(k).data for k in keys}
    return kept


def _commit(tmp: Path, final: Path, root: Path) -> None:
    """Rename the finished checkpoint into place, then move `latest` atomically."""
    _fsync_dir(tmp)
    if final.exists():  # re-saving an iteration (e.g. after a resume): replace it
        old = root / f"{_OLD}{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # `latest` may name `final`: resolve_checkpoint_dir finds `old`
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp"
    with open(pointer_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _model_sharded_state(chunks) -> dict:
    """The model's sharded state, one entry per model chunk (virtual pipeline stage).

    The optimizer's `sharded_state_dict` must receive a nested dict like this one as is
    (megatron-core walks it with `nested_values`, like Megatron-LM's `model0`, `model1`, ...
    entries). Chunks reuse local module names (every chunk has a `decoder.layers.0`), so merging
    them into one dict would keep only the last chunk's parameters and megatron-core would find
    no sharded tensor for the others.

    At zero_stage 2/3 it is built from whole (TP-local) copies of the FSDP2 DTensor parameters
    (`optim.whole_parameters`: an all-gather over data-parallel ranks, one whole copy of the
    weights held while the checkpoint is written or read), so the weights are stored exactly as
    at zero_stage 1 and load into any zero_stage and layout.
    """
    state = {}
    for index, chunk in enumerate(chunks):
        with whole_parameters(_unwrap(chunk)):
            state[f"chunk{index}"] = _unwrap(chunk).sharded_state_dict()
    return state


def _optimizer_model_state(chunks, model_state: dict | None) -> dict:
    """The model sharded state the optimizer's state dict is laid out by.

    megatron-core finds each optimizer parameter's sharded tensor by identity, so it must be
    built over the live parameters: `model_state` itself at zero_stage 1, a second sharded
    state over the DTensor shards at zero_stage 2/3 (their Adam state is stored as those).
    """
    if model_state is not None and not any(hasattr(c, "load_local_state_dict") for c in chunks):
        return model_state
    return {f"chunk{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _model_parallel_unchanged(saved: dict | None, current: dict) -> bool:
    if not saved:
        return False
    return all(saved.get(k) == current.get(k) for k in ("tensor", "pipeline", "virtual_pipeline"))


def _rng_sharded_object() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    return ShardedObject(
        "rng_state",
        state,
        (pp, tp),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
        ),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _restore_rng(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


__all__ = ["Checkpointer", "TrainingState", "checkpoint_name", "resolve_checkpoint_dir"]
