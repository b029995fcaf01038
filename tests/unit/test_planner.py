"""The parallelism planner: parameter/FLOP accounting, memory per rank, layout rules, output."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_keye.planning import (
    Cluster,
    Layout,
    ModelShape,
    PlanInputs,
    layout_problems,
    model_config,
    plan,
    predict_memory,
    predicted_activation_bytes,
)
from megatron_keye.planning.memory import GIB
from megatron_keye.planning.report import to_json, to_json_dict
from megatron_keye.runtime.metrics import flops_per_token, matmul_params

H100 = 989.4e12


def inputs_8b(seq: int, gpus: int, **kw) -> PlanInputs:
    return PlanInputs(model=model_config("8b"), seq=seq,
                      cluster=Cluster(gpus=gpus, memory_gib=80.0, peak_flops=H100), **kw)


def test_8b_parameters_and_flops_match_runtime_metrics():
    model = model_config("8b")
    shape = ModelShape.of(model)
    assert shape.matmul_params == matmul_params(model)
    assert 6 * shape.matmul_params / 1e9 == pytest.approx(45.4, abs=0.05)  # anchors §5
    assert shape.total_params / 1e9 == pytest.approx(8.19, abs=0.01)  # Qwen3-8B
    for seq, total in ((8192, 52.7), (131072, 161.4)):
        result = plan(inputs_8b(seq, 8, recompute="full"))
        assert result.flops_per_token["total"] == flops_per_token(model, seq)
        assert result.flops_per_token["total"] / 1e9 == pytest.approx(total, abs=0.1)


def test_zero1_state_shrinks_by_dp_times_cp_and_the_rest_does_not():
    shape = ModelShape.of(model_config("8b"))
    base = predict_memory(shape, Layout(tp=2, cp=1, pp=1, dp=1), seq=8192)
    for dp, cp in ((4, 1), (1, 4), (2, 2), (2, 4)):
        m = predict_memory(shape, Layout(tp=2, cp=cp, pp=1, dp=dp), seq=8192)
        assert m.optimizer == pytest.approx(base.optimizer / (dp * cp))
        assert m.main_params == pytest.approx(base.main_params / (dp * cp))
        assert m.params == base.params and m.grads == base.grads
    # bf16: 2 B weights + 4 B fp32 grads per parameter; Adam m, v and the fp32 master copy 12 B.
    assert base.optimizer + base.main_params == pytest.approx(2 * (base.params + base.grads))


def test_activations_divide_by_tp_under_sp_and_by_cp():
    shape = ModelShape.of(model_config("8b"))
    one = predict_memory(shape, Layout(tp=1, cp=1, pp=1, dp=1, sequence_parallel=False),
                         seq=8192).activations
    sp = predict_memory(shape, Layout(tp=4, cp=1, pp=1, dp=1, sequence_parallel=True),
                        seq=8192).activations
    no_sp = predict_memory(shape, Layout(tp=4, cp=1, pp=1, dp=1, sequence_parallel=False),
                           seq=8192).activations
    cp = predict_memory(shape, Layout(tp=1, cp=4, pp=1, dp=1, sequence_parallel=False),
                        seq=8192).activations
    assert sp == pytest.approx(one / 4, rel=1e-3)
    assert one / 4 < no_sp < one
    assert cp == pytest.approx(one / 4, rel=1e-3)
    recomputed = {rc: predict_memory(shape, Layout(tp=1, cp=1, pp=1, dp=1, recompute=rc),
                                     seq=8192).activations for rc in ("none", "selective", "full")}
    assert recomputed["none"] > recomputed["selective"] > recomputed["full"]


def test_first_pipeline_stage_holds_pp_microbatches():
    shape = ModelShape.of(model_config("8b"))
    layout = Layout(tp=1, cp=1, pp=4, dp=1, sequence_parallel=False)
    first = predict_memory(shape, layout, seq=4096, num_microbatches=16, stage="first")
    last = predict_memory(shape, layout, seq=4096, num_microbatches=16, stage="last")
    assert first.activations == pytest.approx(4 * (last.activations - _head(shape, 4096)), rel=0.01)
    assert last.logits > 0 and first.logits == 0
    interleaved = predict_memory(shape, dataclasses.replace(layout, vpp=2), seq=4096,
                                 num_microbatches=16, stage="first")
    assert interleaved.activations == pytest.approx(first.activations * (1 + 3 / 8))


def _head(shape: ModelShape, seq: int) -> float:
    """Final-norm bytes (bf16 run) of one micro-batch: fp32 in, rstd, normalized, out."""
    return seq * (shape.hidden * (4 + 2 + 2) + 4)


def test_infeasible_layouts_are_rejected_with_reasons():
    shape = ModelShape.of(model_config("8b"))
    cluster = Cluster(gpus=24)
    why = layout_problems(Layout(tp=3, cp=1, pp=1, dp=8), shape, seq=8192, global_batch=24,
                          cluster=cluster)
    assert any("does not divide 32 attention heads" in w for w in why)
    assert any("does not divide 8 KV heads" in w for w in why)
    why = layout_problems(Layout(tp=4, cp=3, pp=1, dp=2), shape, seq=8200, global_batch=24,
                          cluster=cluster)
    assert any("not divisible by 2·CP·TP = 24" in w for w in why)
    why = layout_problems(Layout(tp=2, cp=8, pp=1, dp=1, cp_comm="a2a"), shape, seq=8192,
                          global_batch=8, cluster=Cluster(gpus=16))
    assert any("a2a needs CP 8" in w for w in why)
    why = layout_problems(Layout(tp=1, cp=1, pp=5, dp=1), shape, seq=8192, global_batch=8,
                          cluster=Cluster(gpus=5))
    assert any("does not divide 36 layers" in w for w in why)
    # ... and the planner lists them with their reasons, memory included.
    result = plan(inputs_8b(131072, 8))
    reasons = [p for e in result.rejected for p in e.problems]
    assert any("GiB per rank" in r for r in reasons)
    assert any("does not divide 36 layers" in r for r in reasons)  # PP = 8


def test_128k_on_8x80gb_needs_context_parallelism():
    result = plan(inputs_8b(131072, 8))
    best = result.best
    assert best is not None and best.layout.cp > 1
    assert best.memory.total <= (80 - 4) * GIB
    # Without recompute nothing fits; CP alone (TP=1) does not fit either.
    assert all(e.layout.recompute != "none" for e in result.ranked)
    assert all(e.layout.cp > 1 or e.layout.recompute == "full" for e in result.ranked)
    assert best.comm.ring is None or best.comm.ring.ok


def test_ring_overlap_is_flagged_where_transfer_exceeds_compute():
    inputs = inputs_8b(131072, 32, recompute="full", cp_comm="p2p")
    result = plan(inputs)
    by_name = {e.layout.name: e for e in result.ranked + result.rejected if e.comm is not None}
    across_ib = by_name["TP1 CP32-p2p PP1 DP1 rc=full"]  # CP spans 4 nodes: 50 GB/s
    assert across_ib.overlap_ok is False and across_ib.comm.cp_s > 0
    in_node = by_name["TP1 CP8-p2p PP4 DP1 rc=full"]  # CP inside a node: NVLink
    assert in_node.overlap_ok is True and in_node.comm.cp_s == 0


def test_json_round_trips():
    result = plan(inputs_8b(8192, 32))
    text = to_json(result, top=5)
    data = json.loads(text)
    assert data == json.loads(json.dumps(to_json_dict(result, top=5)))
    assert len(data["ranked"]) == 5 and data["rejected"]
    top = data["ranked"][0]
    assert {"layout", "memory_gib", "comm", "step_s", "tokens_per_s", "mfu",
            "overlap_ok"} <= set(top)
    assert top["step_s"] <= data["ranked"][1]["step_s"]
    assert data["flops_per_token"]["total"] == pytest.approx(52.7e9, rel=1e-3)


def test_cli_help_and_json(capsys):
    from megatron_keye.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    assert "--gpu-memory-gb" in capsys.readouterr().out
    assert main(["plan", "--flavor", "tiny", "--seq", "1024", "--gpus", "4", "--json",
                 "--top", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"]["model"]["flavor"] == "tiny" and len(data["ranked"]) == 2
    assert main(["plan", "--flavor", "8b", "--seq", "131072", "--gpus", "8", "--gpu", "A100"]) == 0
    assert "312.0 TFLOP/s" in capsys.readouterr().out


def test_tool_script_answers_help():
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "tools/plan_parallel.py"), "--help"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "tools/plan_parallel.py" in done.stdout


def test_activation_model_matches_this_machine_tiny_fp32():
    """Prediction vs the bytes autograd saves in one forward+backward of the tiny flavor (fp32,
    one process), counted by `measure.SavedTensorCounter` in a spawned world of one."""
    from megatron_keye.planning.measure import measure_worker
    from megatron_keye.testing.distributed import run_workers

    shape = ModelShape.of(model_config("tiny"))
    measured = run_workers(measure_worker, 1, timeout=240, flavor="tiny", seq=256,
                           micro_batch=2, precision="fp32")[0]["bytes"]
    predicted = predicted_activation_bytes(shape, seq=256, micro_batch=2, precision="fp32")
    assert predicted == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("tensor,sequence_parallel,pipeline",
                         [(2, False, 1), (2, True, 1), (1, False, 2)],
                         ids=["tp2", "tp2_sp", "pp2"])
def test_activation_model_divides_like_this_machine(tensor, sequence_parallel, pipeline):
    """Per-rank prediction vs the bytes each rank saves at TP=2 (with and without sequence
    parallel) and on each stage of PP=2 (one micro-batch), tiny fp32."""
    from megatron_keye.planning.measure import measure_worker
    from megatron_keye.testing.distributed import run_workers

    shape = ModelShape.of(model_config("tiny"))
    ranks = run_workers(measure_worker, tensor * pipeline, timeout=240, flavor="tiny", seq=256,
                        micro_batch=2, precision="fp32", tensor=tensor, pipeline=pipeline,
                        sequence_parallel=sequence_parallel)
    single = predicted_activation_bytes(shape, seq=256, micro_batch=2, precision="fp32")
    for rank in ranks:
        predicted = predicted_activation_bytes(
            shape, seq=256, micro_batch=2, precision="fp32", tp=tensor,
            sequence_parallel=sequence_parallel, pp=pipeline, stage=rank["stage"])
        assert predicted == pytest.approx(rank["bytes"], rel=0.15), rank["stage"]
        assert rank["bytes"] < 0.8 * single  # the layout really divided the activations
