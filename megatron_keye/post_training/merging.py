"""Model merging on native checkpoints: linear, task arithmetic, TIES and DARE.

Every input checkpoint (any TP/PP/VPP layout it was saved in) is loaded whole into one
unsharded model, so each parameter is merged as the full tensor: TIES's magnitude top-k and
DARE's random drops see the same numbers whatever layout the inputs were written in, and the
result is bit-identical for a TP=2 checkpoint and its TP=1 copy. The merged weights are saved as
a weights-only native checkpoint (like `convert import` writes), which loads into any layout and
exports to Hugging Face.

With task vectors τ_i = θ_i − θ_0 (θ_0 the base) and per-model weights w_i:

- linear:          θ = Σ w_i θ_i / Σ w_i                (no base)
- task_arithmetic: θ = θ_0 + λ Σ w_i τ_i                (divided by Σ w_i with normalize)
- ties:            τ̂_i = τ_i trimmed to its top `density` fraction by |value| over the full
                   tensor (exactly ⌊density·numel⌋ entries; ties broken by flat index), sign
                   γ = sign(Σ w_i τ̂_i) ("sum") or sign(Σ sign τ̂_i) ("count"), disjoint mean
                   τ = Σ_{i agrees} w_i τ̂_i / Σ_{i agrees} w_i (normalize) and θ = θ_0 + λτ
- dare_linear:     τ̃_i = m_i ⊙ τ_i / density, m_i ~ Bernoulli(density), then task arithmetic
- dare_ties:       τ̃_i as for dare_linear, then TIES's sign election and disjoint mean

A model "agrees" at an entry when its (trimmed) value there is non-zero with sign γ. DARE masks
are drawn from a generator seeded by (seed, parameter name, model index), so they do not
depend on the order tensors are visited or on any layout. The embedding and output layer are
merged over their first `vocab_size` rows only (the padding rows past it are zero in the
result): padding neither takes part in the top-k nor needs to match between models.

Memory: every input stays whole in host memory (in its saved dtype) until the merge is done, plus
the output model: about (models + base + 1) × the model's size (8B in bf16: 16 GB each).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
_NEEDS_BASE = {"task_arithmetic", "ties", "dare_linear", "dare_ties"}
_DEFAULT_NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True,
                      "dare_linear": False, "dare_ties": True}
# Native parameters with one row per vocabulary entry (padded to `padded_vocab_size`).
VOCAB_ROW_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True, kw_only=True)
class MergeSpec:
    """How to merge: the method and its knobs (see the module docstring for the formulas)."""

    method: str  # linear | task_arithmetic | ties | dare_linear | dare_ties
    weights: tuple[float, ...] | None = None  # one per model; None = all 1
    scale: float = 1.0  # λ, applied to the merged task vector (not used by linear)
    density: float = 1.0  # fraction kept by TIES's trim / DARE's drop, in (0, 1]
    normalize: bool | None = None  # divide by the (agreeing) weights' sum; None = method default
    sign_election: str = "sum"  # ties / dare_ties: "sum" (weighted values) or "count" (signs)
    seed: int = 0  # DARE masks: seeded per (seed, parameter name, model index)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"merge method: {self.method!r} is not one of {list(METHODS)}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"merge density: {self.density} is not in (0, 1]")
        if self.sign_election not in ("sum", "count"):
            raise ValueError(f"merge sign_election: {self.sign_election!r} is not sum or count")

    @property
    def needs_base(self) -> bool:
        return self.method in _NEEDS_BASE

    @property
    def normalized(self) -> bool:
        return _DEFAULT_NORMALIZE[self.method] if self.normalize is None else self.normalize

    def model_weights(self, count: int) -> list[float]:
        """The per-model weights for `count` models (checked against their number)."""
        if self.weights is None:
            return [1.0] * count
        if len(self.weights) != count:
            raise ValueError(f"merge weights: {len(self.weights)} given for {count} models")
        return [float(w) for w in self.weights]


# ---------------------------------------------------------------------------- tensor math
def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ⌊density·numel⌋ entries of largest |value| in the whole tensor.

    Exactly that many entries are kept; among equal magnitudes at the threshold the lowest
    flat indices win, so the mask is a function of the tensor's values alone.
    """
    flat = tensor.detach().abs().flatten()
    n = flat.numel()
    k = int(density * n)
    if k >= n:
        return torch.ones_like(tensor, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest magnitude
    keep = flat > threshold
    need = k - int(keep.sum())
    at_threshold = flat == threshold
    keep |= at_threshold & (torch.cumsum(at_threshold, 0) <= need)
    return keep.view_as(tensor)


def dare_keep_mask(name: str, index: int, shape: Sequence[int], *, density: float,
                   seed: int) -> torch.Tensor:
    """DARE's Bernoulli(density) keep mask for model `index`'s parameter `name`.

    Drawn on the CPU from a generator seeded by sha256("{seed}/{name}/{index}"), so a given
    parameter of a given model gets the same mask whatever else is merged and in which order.
    """
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32) < density


def merge_tensor(name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None,
                 spec: MergeSpec) -> torch.Tensor:
    """One merged parameter (fp32) from the models' full tensors and the base's."""
    weights = spec.model_weights(len(tensors))
    models = [t.detach().float() for t in tensors]
    if spec.method == "linear":
        total = sum(w * t for w, t in zip(weights, models))
        return total / sum(weights) if spec.normalized else total
    if base is None:
        raise ValueError(f"merge method {spec.method} needs a base model")
    theta0 = base.detach().float()
    deltas = [t - theta0 for t in models]
    if spec.method in ("ties",):
        deltas = [d * magnitude_mask(d, spec.density) for d in deltas]
    elif spec.method.startswith("dare") and spec.density < 1.0:
        deltas = [
            d * dare_keep_mask(name, i, d.shape, density=spec.density, seed=spec.seed) / spec.density
            for i, d in enumerate(deltas)
        ]
    if spec.method in ("task_arithmetic", "dare_linear"):
        merged = sum(w * d for w, d in zip(weights, deltas))
        if spec.normalized:
            merged = merged / sum(weights)
        return theta0 + spec.scale * merged
    # ties / dare_ties: elect a sign per entry, then average the agreeing models.
    if spec.sign_election == "sum":
        elected = torch.sign(sum(w * d for w, d in zip(weights, deltas)))
    else:
        elected = torch.sign(sum(torch.sign(d) for d in deltas))
    merged = torch.zeros_like(theta0)
    divisor = torch.zeros_like(theta0)
    for w, d in zip(weights, deltas):
        agrees = (torch.sign(d) == elected) & (d != 0)
        merged += torch.where(agrees, w * d, 0.0)
        divisor += torch.where(agrees, w, 0.0)
    if spec.normalized:
        merged = torch.where(divisor != 0, merged / torch.where(divisor != 0, divisor, 1.0), 0.0)
    return theta0 + spec.scale * merged


def merge_state_dicts(models: Sequence[Mapping[str, torch.Tensor]],
                      base: Mapping[str, torch.Tensor] | None, spec: MergeSpec, *,
                      vocab_size: int, padded_vocab_size: int,
                      sources: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Merge full native state dicts parameter by parameter (fp32 results).

    Vocabulary-row parameters are cut to `vocab_size` rows before merging and padded with
    zero rows to `padded_vocab_size` after. Every model (and the base) must hold the same
    parameter names and shapes; `sources` names them in errors.
    """
    if not models:
        raise ValueError("merge: no models given")
    if spec.needs_base and base is None:
        raise ValueError(f"merge method {spec.method} needs a base model (--base)")
    if not spec.needs_base and base is not None:
        raise ValueError(f"merge method {spec.method} takes no base model")
    spec.model_weights(len(models))
    named = list(sources or [f"model {i}" for i in range(len(models))])
    everything = list(models) + ([base] if base is not None else [])
    labels = named + (["base"] if base is not None else [])
    reference = set(models[0])
    for label, state in zip(labels, everything):
        if set(state) != reference:
            missing, extra = sorted(reference - set(state)), sorted(set(state) - reference)
            raise ValueError(f"merge: {label} has different parameters than {labels[0]} "
                             f"(missing {missing[:3]}, extra {extra[:3]})")

    def unpad(name: str, tensor: torch.Tensor, label: str) -> torch.Tensor:
        if name in VOCAB_ROW_PARAMS:
            if tensor.size(0) < vocab_size:
                raise ValueError(f"merge: {label} {name} has {tensor.size(0)} rows, fewer than "
                                 f"vocab_size {vocab_size}")
            return tensor[:vocab_size]
        return tensor

    merged = {}
    for name in sorted(reference):
        tensors = [unpad(name, m[name], label) for m, label in zip(models, named)]
        base_tensor = unpad(name, base[name], "base") if base is not None else None
        for label, t in zip(labels, tensors + ([base_tensor] if base_tensor is not None else [])):
            if t.shape != tensors[0].shape:
                raise ValueError(f"merge: {label} {name} has shape {tuple(t.shape)}, "
                                 f"{labels[0]} has {tuple(tensors[0].shape)}")
        out = merge_tensor(name, tensors, base_tensor, spec)
        if name in VOCAB_ROW_PARAMS and padded_vocab_size > vocab_size:
            out = torch.cat([out, out.new_zeros(padded_vocab_size - vocab_size, *out.shape[1:])])
        merged[name] = out
    return merged


# ----------------------------------------------------------------------- checkpoint level
def merge_checkpoints(models: Sequence[str], out: str, spec: MergeSpec, *,
                      base: str | None = None) -> Path:
    """Merge native checkpoints (each a checkpoint dir or a save dir with `latest`) into `out`.

    Runs in this process when it already is a launched world of one, else in one spawned
    process. The output's model config is the first model's. Returns the checkpoint directory.
    """
    from megatron_keye.runtime.checkpoint import resolve_checkpoint_dir
    from megatron_keye.runtime.spawn import spawn_ranks

    for path in [*models, *([base] if base else [])]:
        if resolve_checkpoint_dir(path) is None:
            raise FileNotFoundError(f"{path}: no checkpoint there (nor a `latest` naming one)")
    if spec.needs_base and base is None:
        raise ValueError(f"merge method {spec.method} needs a base model (--base)")
    spec.model_weights(len(models))
    kwargs = dict(models=list(models), out=out, spec=asdict(spec), base=base)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return merge_on_ranks(**kwargs)
    (path,) = spawn_ranks(merge_on_ranks, 1, threads=os.cpu_count() or 1, **kwargs)
    return path


def merge_on_ranks(*, models: list[str], out: str, spec: dict | MergeSpec,
                   base: str | None = None) -> Path:
    """The merge inside a running world (every rank does the same work, data-parallel).

    Each rank loads every input whole (TP=PP=1), merges and takes part in the collective save.
    """
    import torch.distributed as dist

    from megatron_keye.config import config_to_dict
    from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState, checkpoint_name

    spec = spec if isinstance(spec, MergeSpec) else MergeSpec(**spec)
    config, states = None, []
    for path in models:
        model_config, state = load_full_weights(path)
        config = config or model_config
        if model_config.model.vocab_size != config.model.vocab_size:
            raise ValueError(f"merge: {path} has vocab_size {model_config.model.vocab_size}, "
                             f"{models[0]} has {config.model.vocab_size}")
        states.append(state)
    base_state = None
    if base is not None:
        base_config, base_state = load_full_weights(base)
        if base_config.model.vocab_size != config.model.vocab_size:
            raise ValueError(f"merge: base {base} has vocab_size {base_config.model.vocab_size}, "
                             f"{models[0]} has {config.model.vocab_size}")
    merged = merge_state_dicts(states, base_state, spec, vocab_size=config.model.vocab_size,
                               padded_vocab_size=config.model.padded_vocab_size,
                               sources=list(models))
    del states, base_state
    chunks = _build_unsharded(config)
    from megatron_keye.models.keye_vl.builder import load_full_state

    if config.model.tie_word_embeddings and "embedding.word_embeddings.weight" in merged:
        merged.setdefault("output_layer.weight", merged["embedding.word_embeddings.weight"])
    load_full_state(chunks, merged)
    config.checkpoint.save_dir = out
    config.checkpoint.load = None
    world = dist.get_world_size()
    layout = {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "context": 1, "data": world}
    Checkpointer(config.checkpoint, run_config=config_to_dict(config), layout=layout).save(
        chunks=chunks, optimizer=None, state=TrainingState(iteration=0)
    )
    final = Path(out) / checkpoint_name(0)
    if dist.get_rank() == 0:
        import yaml

        record = {"method": spec.method, **asdict(spec), "models": list(models), "base": base}
        record["weights"] = spec.model_weights(len(models))
        with open(final / "merge.yaml", "w") as f:
            yaml.safe_dump(record, f, sort_keys=False)
    dist.barrier()
    log.info("merged %d models (%s) into %s", len(models), spec.method, final)
    return final


def load_full_weights(checkpoint: str):
    """(TrainConfig, full native state dict) of a checkpoint, loaded into an unsharded model.

    Must run inside an initialized world; the model is built at TP=PP=1 with the world as
    data-parallel ranks, so any saved layout reshards into whole tensors here.
    """
    from megatron.core import dist_checkpointing

    from megatron_keye.config import config_from_dict
    from megatron_keye.models.keye_vl.builder import named_parameters_global
    from megatron_keye.runtime.checkpoint import Checkpointer, resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(checkpoint)
    if directory is None:
        raise FileNotFoundError(f"{checkpoint}: no checkpoint there (nor a `latest` naming one)")
    saved = dist_checkpointing.load_common_state_dict(str(directory))["config"]
    saved["parallel"] = {}
    config = config_from_dict(saved)
    chunks = _build_unsharded(config)
    import torch.distributed as dist

    layout = {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "context": 1,
              "data": dist.get_world_size()}
    Checkpointer(config.checkpoint, run_config=saved, layout=layout).load(
        directory, chunks=chunks, optimizer=None, weights_only=True
    )
    state = {k: v.detach().clone() for k, v in named_parameters_global(chunks[0]).items()}
    return config, state


def _build_unsharded(config):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_keye.models.keye_vl.builder import build_model_chunks
    from megatron_keye.runtime.parallel import ParallelDims

    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims.from_config(config.parallel, world)
    if not (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1
            and parallel_state.get_context_parallel_world_size() == 1
            and parallel_state.get_virtual_pipeline_model_parallel_world_size() in (None, 1)):
        dims.initialize(seed=config.seed)
    return build_model_chunks(config)


# ----------------------------------------------------------------------------- command line
def cli_main(argv: list[str], *, prog: str = "megatron-keye merge") -> int:
    """`megatron-keye merge` / `tools/merge_models.py`: parse arguments and merge."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description="Merge native checkpoints (any layout) into one checkpoint.")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--model", action="append", required=True, dest="models",
                        help="a checkpoint or save dir; repeat for each model")
    parser.add_argument("--base", help="base model θ_0 (task_arithmetic, ties, dare_*)")
    parser.add_argument("--out", required=True, help="save dir of the merged checkpoint")
    parser.add_argument("--weights", type=float, nargs="+", help="one per --model (default 1)")
    parser.add_argument("--scale", type=float, default=1.0, help="λ on the merged task vector")
    parser.add_argument("--density", type=float, default=1.0,
                        help="TIES/DARE: fraction of each task vector kept (TIES paper: 0.2)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="divide by the (agreeing) weights' sum; default per method")
    parser.add_argument("--sign-election", choices=["sum", "count"], default="sum")
    parser.add_argument("--seed", type=int, default=0, help="DARE mask seed")
    args = parser.parse_args(argv)
    spec = MergeSpec(method=args.method, weights=tuple(args.weights) if args.weights else None,
                     scale=args.scale, density=args.density, normalize=args.normalize,
                     sign_election=args.sign_election, seed=args.seed)
    path = merge_checkpoints(args.models, args.out, spec, base=args.base)
    print(f"wrote merged checkpoint to {path}")
    return 0


__all__ = ["METHODS", "MergeSpec", "cli_main", "dare_keep_mask", "load_full_weights", "magnitude_mask",
           "merge_checkpoints", "merge_on_ranks", "merge_state_dicts", "merge_tensor"]
