"""Merging native checkpoints: layout-independent, exact round trips, output loads resharded.

One spawned 2-rank world writes three tiny models (different seeds, vocab 2000 padded two
ways) at TP=2 and at TP=1 (DP=2), merges each set with several methods, reloads every result
whole and once more at TP=2 with sequence parallelism, and hands the tensors back here.
"""

from __future__ import annotations

import torch

from megatron_keye.post_training.merging import MergeSpec, merge_state_dicts
from megatron_keye.testing.distributed import run_workers

VOCAB = 2000
SPECS = {
    "ties": MergeSpec(method="ties", weights=(1.0, 0.5), density=0.3, scale=0.9),
    "dare_ties": MergeSpec(method="dare_ties", weights=(0.7, 1.0), density=0.5, seed=7),
    "task_arithmetic": MergeSpec(method="task_arithmetic", weights=(0.5, 0.5), scale=0.6),
}
# Methods whose result depends on whole-tensor statistics are also merged from TP=2 inputs.
FROM_BOTH_LAYOUTS = ("ties", "dare_ties")


def _config(seed: int, *, tensor: int, divisible_by: int):
    from tests.distributed.workers import tiny_config

    return tiny_config({"tensor": tensor, "sp": tensor > 1}, extra=(
        f"seed={seed}", f"model.vocab_size={VOCAB}",
        f"model.make_vocab_size_divisible_by={divisible_by}"))


def _save_model(config, save_dir: str) -> None:
    import torch.distributed as dist

    from megatron_keye.config import config_to_dict
    from megatron_keye.models.keye_vl.builder import build_model_chunks
    from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState
    from megatron_keye.runtime.parallel import ParallelDims, init_distributed

    init_distributed()
    ParallelDims.from_config(config.parallel, dist.get_world_size()).initialize(seed=config.seed)
    chunks = build_model_chunks(config)
    config.checkpoint.save_dir = save_dir
    layout = {"tensor": config.parallel.tensor, "pipeline": 1, "virtual_pipeline": 1,
              "context": 1, "data": dist.get_world_size() // config.parallel.tensor}
    Checkpointer(config.checkpoint, run_config=config_to_dict(config), layout=layout).save(
        chunks=chunks, optimizer=None, state=TrainingState(iteration=1))


def merge_worker(root: str):
    """Write inputs at TP=2 and TP=1, merge both sets, reload; rank 0 returns the tensors."""
    import torch.distributed as dist

    from megatron_keye.models.keye_vl.builder import build_model_chunks, named_parameters_global
    from megatron_keye.models.keye_vl.hf_adapter import split_tensor
    from megatron_keye.post_training.merging import load_full_weights, merge_on_ranks
    from megatron_keye.runtime.checkpoint import Checkpointer
    from megatron_keye.runtime.parallel import ParallelDims

    # Model 2 pads its vocabulary to 2000 rows, the others to 2048.
    seeds = {"base": (11, 128), "a": (12, 500), "b": (13, 128)}
    for tensor in (2, 1):
        for name, (seed, divisible) in seeds.items():
            _save_model(_config(seed, tensor=tensor, divisible_by=divisible),
                        f"{root}/tp{tensor}/{name}")
    out = {"inputs": {}, "merged": {}}
    for name in seeds:
        out["inputs"][name] = load_full_weights(f"{root}/tp1/{name}")[1]
    for method, spec in SPECS.items():
        for tensor in (2, 1) if method in FROM_BOTH_LAYOUTS else (1,):
            merge_on_ranks(models=[f"{root}/tp{tensor}/a", f"{root}/tp{tensor}/b"],
                           base=f"{root}/tp{tensor}/base", spec=spec,
                           out=f"{root}/merged-{method}-tp{tensor}")
            out["merged"][(method, tensor)] = load_full_weights(
                f"{root}/merged-{method}-tp{tensor}")[1]
    merge_on_ranks(models=[f"{root}/tp2/a", f"{root}/tp2/a"], spec=MergeSpec(method="linear"),
                   out=f"{root}/identity")
    out["identity"] = load_full_weights(f"{root}/identity")[1]

    # The merged checkpoint loads at TP=2 with SP, each rank holding its piece of the result.
    config = _config(12, tensor=2, divisible_by=500)
    ParallelDims.from_config(config.parallel, dist.get_world_size()).initialize(seed=0)
    chunks = build_model_chunks(config)
    layout = {"tensor": 2, "pipeline": 1, "virtual_pipeline": 1, "context": 1, "data": 1}
    Checkpointer(config.checkpoint, run_config={}, layout=layout).load(
        f"{root}/merged-ties-tp2", chunks=chunks, optimizer=None, weights_only=True)
    full = out["merged"][("ties", 2)]
    tp_rank = dist.get_rank()
    mismatched = [
        name for name, param in named_parameters_global(chunks[0]).items()
        if not torch.equal(param.detach(), split_tensor(name, full[name], tp_rank, 2))
    ]
    return out, mismatched


def test_merge_checkpoints_layout_independent_and_reloadable(tmp_path):
    results = run_workers(merge_worker, 2, root=str(tmp_path))
    (out, mismatched_0), (_, mismatched_1) = results
    assert mismatched_0 == [] and mismatched_1 == [], "TP=2 reload differs from the merge"
    inputs = out["inputs"]
    for method, spec in SPECS.items():
        from_tp1 = out["merged"][(method, 1)]
        if method in FROM_BOTH_LAYOUTS:
            from_tp2 = out["merged"][(method, 2)]
            assert from_tp2.keys() == from_tp1.keys()
            for name in from_tp1:  # bit for bit
                assert torch.equal(from_tp2[name], from_tp1[name]), (method, name)
        # And the saved result is what merging the whole tensors gives (fp32 model: exact).
        expected = merge_state_dicts([inputs["a"], inputs["b"]], inputs["base"], spec,
                                     vocab_size=VOCAB, padded_vocab_size=VOCAB)
        for name in expected:
            assert torch.equal(from_tp1[name], expected[name]), (method, name)
        # The merge moved something (not the base, not a model).
        emb = "embedding.word_embeddings.weight"
        assert not torch.equal(from_tp1[emb][:VOCAB], inputs["base"][emb][:VOCAB])
        assert from_tp1[emb].shape == (VOCAB, 64)  # model "a"'s padding (none)
    # The output takes the first model's config ("a": 2000 rows, no padding).
    identity = out["identity"]
    for name, tensor in inputs["a"].items():
        assert torch.equal(identity[name], tensor), name
