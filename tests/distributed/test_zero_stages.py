"""ZeRO-2/3 (`parallel.zero_stage`, torch FSDP2 through megatron-core) against ZeRO-1.

One spawned world per layout trains the same tiny model (identical weights: drawn by name) at
zero_stage 1, 2 and 3 on random batches and returns, per stage, the loss and every parameter's
whole gradient of one global batch, the bytes of gradient and parameter storage each rank holds,
the Adam state each rank holds and the losses of a few optimizer steps. The DP=2 world also
stops a zero_stage 2 run with a checkpoint, resumes it, and loads its weights at zero_stage 1
with TP=2 and at zero_stage 3 (and that zero_stage 1 run's checkpoint at zero_stage 2), and
trains at precision=bf16 at zero_stage 1, 2 and 3 (3 with a checkpoint round trip).
"""

from __future__ import annotations

import pytest
import torch

from megatron_keye.config import ConfigError, load_config, validate
from megatron_keye.testing.distributed import run_workers
from tests.distributed.conftest import random_global_batch
from tests.distributed.workers import tiny_config
from tests.distributed.workers_zero import zero_stages_worker

TOLERANCE = 1e-5
STEPS = 3
STOP_AT = 2


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _batches():
    config = tiny_config({})
    return [random_global_batch(config, rows=config.schedule.global_batch_size, seed=10 + i)
            for i in range(STEPS)]


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
    """The zero_stage 2 run's save dir and the zero_stage 1 (TP=2) re-save of its weights."""
    return tmp_path_factory.mktemp("zero2_ckpt"), tmp_path_factory.mktemp("zero1_tp2_ckpt")


@pytest.fixture(scope="module")
def dp2(checkpoint_dirs, tmp_path_factory):
    save_dir, resave_dir = checkpoint_dirs
    return run_workers(
        zero_stages_worker, 2, layout={}, batches=_batches(), stages=(1, 2, 3), steps=STEPS,
        save_dir=str(save_dir), save_stage=2, save_at=STOP_AT, resave_dir=str(resave_dir),
        bf16_stages=(1, 2, 3), bf16_save_dir=str(tmp_path_factory.mktemp("zero3_bf16_ckpt")),
    )


@pytest.fixture(scope="module")
def dp2_tp2():
    return run_workers(zero_stages_worker, 4, layout={"tensor": 2}, batches=_batches(),
                       stages=(1, 2, 3), steps=STEPS, bf16_stages=(1, 2, 3))


def _check_against_zero1(results: list[dict]) -> None:
    for rank, per_rank in enumerate(results):
        reference = per_rank[1]
        for stage in (2, 3):
            ours = per_rank[stage]
            assert abs(ours["loss"] - reference["loss"]) <= TOLERANCE * abs(reference["loss"])
            assert set(ours["grads"]) == set(reference["grads"])
            for name, grad in reference["grads"].items():
                assert grad.abs().sum() > 0, name
                error = relative_error(ours["grads"][name], grad)
                assert error <= TOLERANCE, (rank, stage, name, error)
            for a, b in zip(ours["losses"], reference["losses"], strict=True):
                assert abs(a - b) <= TOLERANCE * abs(b), (rank, stage, ours["losses"])
            for a, b in zip(ours["grad_norms"], reference["grad_norms"], strict=True):
                assert abs(a - b) <= TOLERANCE * abs(b), (rank, stage, ours["grad_norms"])
        # The steps changed the model: later losses differ from the first.
        assert len(set(reference["losses"])) == STEPS


def _check_memory(results: list[dict], dp: int) -> None:
    for per_rank in results:
        zero1 = per_rank[1]
        for stage in (2, 3):
            held = per_rank[stage]["held"]
            # Gradients: ZeRO-1's whole (padded) buffer vs a 1/DP shard of every gradient.
            assert held["grads"] == pytest.approx(zero1["held"]["grads"] / dp, rel=0.01)
            # Parameters at rest: FSDP2 keeps 1/DP shards at both stages.
            assert held["params"] == pytest.approx(zero1["held"]["params"] / dp, rel=0.01)
            # Adam moments: sharded 1/DP at every stage.
            assert per_rank[stage]["optimizer_state_bytes"] == pytest.approx(
                zero1["optimizer_state_bytes"], rel=0.01)
        # Stage 2 keeps a layer's gathered parameters from forward to backward; 3 frees them.
        assert per_rank[2]["reshard_after_forward"] and not any(
            per_rank[2]["reshard_after_forward"])
        assert per_rank[3]["reshard_after_forward"] and all(per_rank[3]["reshard_after_forward"])
        assert zero1["reshard_after_forward"] == []


def test_zero2_zero3_match_zero1_at_dp2(dp2):
    _check_against_zero1(dp2)


def test_zero2_zero3_shard_gradients_and_parameters_at_dp2(dp2):
    _check_memory(dp2, dp=2)


def test_zero2_checkpoint_resume_continues_the_same_run(dp2):
    """A zero_stage 2 checkpoint (sharded weights and Adam moments, scheduler, data position)
    written after step 2 resumes into a fresh trainer whose step 3 equals the original's."""
    for per_rank in dp2:
        run = per_rank[2]
        assert run["resumed_from"] == STOP_AT
        # The resumed step uses the restored weights and Adam moments, bit for bit.
        assert run["resumed"] == pytest.approx(run["losses"][STOP_AT:], rel=1e-12)
        assert len(run["resumed"]) == STEPS - STOP_AT


def test_zero2_checkpoint_weights_load_at_every_stage_and_layout(dp2):
    """The zero_stage 2 checkpoint written after step 2 (DP=2) seeds zero_stage 1 at TP=2 and
    zero_stage 3; that zero_stage 1 run's own checkpoint seeds zero_stage 2. Each evaluates
    batch 3 to the loss the saving run's step 3 computed from the same weights."""
    for per_rank in dp2:
        expected = per_rank[2]["losses"][STOP_AT]
        loads = per_rank["cross_stage"]
        for how in ("zero2_to_zero1_tp2", "zero2_to_zero3", "zero1_tp2_to_zero2"):
            assert abs(loads[how] - expected) <= 1e-6 * abs(expected), (how, loads[how], expected)


def test_zero2_optimizer_state_does_not_cross_zero_stages(dp2):
    """Adam state moves only within zero_stage 1 or within 2/3 in one layout: refused by name."""
    for per_rank in dp2:
        error = per_rank["cross_stage"]["optimizer_cross_stage_error"]
        assert error is not None and error.startswith("parallel.zero_stage:"), error
        assert "checkpoint.load_state=weights" in error


def test_export_of_a_zero2_checkpoint_equals_the_zero1_export(dp2, checkpoint_dirs, tmp_path):
    """`convert export` reads a zero_stage 2 checkpoint: the same tensors as exporting those
    weights saved at zero_stage 1 (TP=2)."""
    from safetensors.torch import load_file

    from megatron_keye.convert import export_hf

    save_dir, resave_dir = checkpoint_dirs
    zero2 = load_file(export_hf(str(save_dir), str(tmp_path / "zero2")) / "model.safetensors")
    zero1 = load_file(export_hf(str(resave_dir), str(tmp_path / "zero1")) / "model.safetensors")
    assert set(zero2) == set(zero1) and len(zero2) > 10
    for name, tensor in zero1.items():
        assert torch.equal(zero2[name], tensor), name


# bf16's unit roundoff (8 significant bits). Step 1 computes the same bf16 forward from the same
# bf16 weights at every stage, so its loss is bit-equal and its gradients differ only by fp32
# summation order (the gradient norm within TOLERANCE; bf16 reduction or accumulation would
# be ~BF16_U off). After an update any weight one fp32 ulp apart (an Adam step summed in another
# order) flips the bf16 rounding of activations, so later gradients differ by bf16 rounding
# noise: gradient norms within BF16_U; the loss, a mean over 256 tokens of per-token losses
# each off by ~BF16_U, within BF16_U / 16 (one standard deviation of that mean: sqrt(256));
# the bf16 weights after the last of three steps per tensor within 4 * BF16_U: Adam scales
# every element's update to ~lr whatever its gradient's size, so where a gradient is no larger
# than that noise (embedding rows of tokens seen once or twice) the update itself is noisy
# (measured: decoder tensors <= 3.8e-3, the embedding 5.8e-3 at DP=2 and 9.4e-3 at DP=2xTP=2).
# After step 1 they agree to TOLERANCE (measured 4.4e-6): they differ only where an update
# cancels the weight to ~1e-7, one fp32 ulp of the update apart.
BF16_U = 2.0**-8


def _check_bf16_against_zero1(results: list[dict]) -> None:
    for rank, per_rank in enumerate(results):
        reference = per_rank[("bf16", 1)]
        assert all(reference["applied"]) and len(set(reference["losses"])) == STEPS
        for stage in (2, 3):
            ours = per_rank[("bf16", stage)]
            assert all(ours["applied"])
            assert ours["losses"][0] == reference["losses"][0], (rank, stage)
            assert ours["grad_norms"][0] == pytest.approx(reference["grad_norms"][0],
                                                          rel=TOLERANCE)
            assert ours["losses"][1:] == pytest.approx(reference["losses"][1:], rel=BF16_U / 16)
            assert ours["grad_norms"][1:] == pytest.approx(reference["grad_norms"][1:],
                                                           rel=BF16_U)
            for key, rtol in (("first_weights", TOLERANCE), ("weights", 4 * BF16_U)):
                for name, expected in reference[key].items():
                    assert expected.dtype == torch.bfloat16, name
                    master = ours[key][name]
                    assert master.dtype == torch.float32, name
                    error = relative_error(master.to(torch.bfloat16), expected)
                    assert error <= rtol, (rank, stage, key, name, error)


def test_bf16_zero2_zero3_match_zero1_at_dp2(dp2):
    """precision=bf16 at zero_stage 2/3 (FSDP2 mixed precision) trains as at zero_stage 1
    (megatron's distributed optimizer with fp32 main params), within bf16 rounding."""
    _check_bf16_against_zero1(dp2)


def test_bf16_zero2_zero3_match_zero1_at_dp2_tp2(dp2_tp2):
    _check_bf16_against_zero1(dp2_tp2)


def test_bf16_dtypes_at_every_zero_stage(dp2):
    """What goes wrong silently: bf16 compute, fp32 master weights and Adam moments, gradients
    summed over data ranks in fp32 (`grad_reduce_in_fp32`) at every stage; at 2/3 the stored
    FSDP2 shards are the fp32 masters the optimizer updates in place."""
    for per_rank in dp2:
        zero1 = per_rank[("bf16", 1)]["dtypes"]
        assert zero1["compute"] == zero1["stored"] == {"torch.bfloat16"}
        assert not zero1["updates_module_params"]  # fp32 copies
        for stage in (1, 2, 3):
            dtypes = per_rank[("bf16", stage)]["dtypes"]
            assert dtypes["compute"] == {"torch.bfloat16"}, (stage, dtypes)
            for key in ("masters", "adam", "reduce", "grads"):
                assert dtypes[key] == {"torch.float32"}, (stage, key, dtypes)
        # Layers get the inputs stage 1 gives them (FSDP2 casting them would round fp32
        # rotary tables to bf16).
        assert "torch.float32" in zero1["layer_inputs"], zero1
        for stage in (2, 3):
            dtypes = per_rank[("bf16", stage)]["dtypes"]
            assert dtypes["stored"] == {"torch.float32"} and dtypes["updates_module_params"]
            assert dtypes["layer_inputs"] == zero1["layer_inputs"], (stage, dtypes)


def test_bf16_zero3_checkpoint_resume_continues_the_same_run(dp2):
    """A bf16 zero_stage 3 checkpoint after step 2 resumes with step 3's loss and the final
    fp32 master weights bit for bit (the masters are the checkpoint's weights); its weights
    seed a bf16 zero_stage 1 run that computes step 3's loss from them."""
    for per_rank in dp2:
        run = per_rank[("bf16", 3)]
        assert run["resumed_from"] == STOP_AT
        assert run["resumed"] == run["losses"][STOP_AT:]
        for name, weight in run["weights"].items():
            assert torch.equal(run["resumed_weights"][name], weight), name
        # Its weights load into zero_stage 1's bf16 parameters: the same bf16 forward.
        assert run["zero1_eval"] == run["losses"][STOP_AT]


def test_zero2_zero3_match_zero1_at_dp2_tp2(dp2_tp2):
    _check_against_zero1(dp2_tp2)
    _check_memory(dp2_tp2, dp=2)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["parallel.zero_stage=2", "parallel.distributed_optimizer=false"],
         "parallel.distributed_optimizer"),
        (["parallel.zero_stage=3", "parallel.overlap_param_gather=true"],
         "parallel.overlap_param_gather"),
        (["parallel.zero_stage=2", "parallel.overlap_grad_reduce=true"],
         "parallel.overlap_grad_reduce"),
        (["parallel.zero_stage=2", "parallel.pipeline=2"], "parallel.pipeline"),
    ],
)
def test_invalid_zero_stage_combinations_name_the_field(overrides, field):
    config = load_config(None, overrides)
    with pytest.raises(ConfigError, match=field):
        validate(config, 4)


def test_zero_stage_must_be_1_2_or_3():
    with pytest.raises(ConfigError, match="parallel.zero_stage"):
        load_config(None, ["parallel.zero_stage=4"])


def test_planner_shards_gradients_at_zero2_and_parameters_at_zero3():
    from megatron_keye.planning.layout import Layout
    from megatron_keye.planning.memory import predict_memory
    from megatron_keye.planning.shapes import ModelShape, model_config

    shape = ModelShape.of(model_config("8b"))
    layout = Layout(tp=1, cp=1, pp=1, dp=8)
    by_stage = {z: predict_memory(shape, layout, seq=8192, precision="bf16", zero_stage=z)
                for z in (1, 2, 3)}
    one, two, three = by_stage[1], by_stage[2], by_stage[3]
    # ZeRO-1: whole fp32 gradients; ZeRO-2/3: 1/DP fp32 shards (FSDP2 reduces in fp32).
    assert two.grads == pytest.approx(one.grads / 8) == three.grads
    # ZeRO-3 under bf16: only gathered bf16 layers; its fp32 shards are the master weights.
    assert two.params == one.params > three.params > 0
    assert one.main_params == two.main_params == three.main_params
    assert three.total == pytest.approx(one.total - one.params - one.grads + three.params
                                        + one.grads / 8)
    assert one.optimizer == two.optimizer == three.optimizer
    assert one.activations == two.activations == three.activations
    assert one.total > two.total > three.total
