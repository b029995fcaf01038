"""The planner's vision tower + projector: parameters and saved activations on the first stage,
calibrated against what the tiny tower and projector really save (one spawned world)."""

from __future__ import annotations

import json

import pytest

from megatron_keye.config.schema import VisionConfig
from megatron_keye.planning import Cluster, Layout, ModelShape, PlanInputs, model_config, plan
from megatron_keye.planning.memory import predict_memory
from megatron_keye.planning.vision import (
    VISUAL_ITEMS_PER_ROW,
    VisionShape,
    busiest_rank_patches,
    default_visual_tokens_per_row,
    vision_activation_bytes,
    vision_recompute_bytes,
)

# One 16x16 image and a two-frame 8x12 video: 448 patches, frames of different sizes.
GRIDS = ((1, 16, 16), (2, 8, 12))
CASES = [{"tensor": 1}, {"tensor": 2, "sequence_parallel": False},
         {"tensor": 2, "sequence_parallel": True},
         {"tensor": 1, "recompute": "full"},
         {"tensor": 2, "sequence_parallel": True, "recompute": "full"}]


def test_vision_activations_and_parameters_match_the_tiny_tower_tp1_tp2():
    """Prediction vs the bytes autograd saves in the tiny tower + projector's forward (fp32),
    per rank at TP1, TP2 and TP2 with SP, all in one world of two; the rank's parameter count
    equals `VisionShape.rank_params`. With vision.recompute=full (TP1, TP2+SP) the forward's
    saved bytes and the largest re-run layer's both match, and the saving is real."""
    from megatron_keye.planning.measure import measure_vision_worker
    from megatron_keye.testing.distributed import run_workers

    ranks = run_workers(measure_vision_worker, 2, timeout=240, cases=CASES, grids=GRIDS,
                        lm_hidden=64, precision="fp32")
    single, plain = None, {}
    for results in ranks:
        for r in results:
            recompute = r.get("recompute", "none")
            v = VisionShape.of(VisionConfig.from_flavor("tiny", recompute=recompute), 64)
            layout = Layout(tp=r["tensor"], cp=1, pp=1, dp=1,
                            sequence_parallel=r.get("sequence_parallel", False))
            predicted = vision_activation_bytes(v, layout, patches=r["patches"],
                                                precision="fp32")
            assert r["patches"] == 448
            assert predicted == pytest.approx(r["bytes"], rel=0.15), r
            assert r["params"] == v.rank_params(r["tensor"]), r
            rerun = vision_recompute_bytes(v, layout, patches=448, precision="fp32")
            key = (r["tensor"], r.get("sequence_parallel", False))
            if recompute == "full":
                assert rerun == pytest.approx(r["recompute_bytes"], rel=0.15), r
                assert r["bytes"] < 0.6 * plain[key]  # only the layer inputs stay
                continue
            assert rerun == 0 and r["recompute_bytes"] == 0
            plain[key] = r["bytes"]
            if r["tensor"] == 1:
                single = r["bytes"]
            else:
                assert r["bytes"] < 0.8 * single  # TP really divided the activations


def test_visual_tokens_default_is_two_maximal_items_capped_by_the_row():
    assert VISUAL_ITEMS_PER_ROW == 2
    kw = dict(image_max_tokens=20480, video_max_tokens=65536)
    assert default_visual_tokens_per_row(seq=8192, **kw) == 8192
    assert default_visual_tokens_per_row(seq=262144, **kw) == 131072
    assert default_visual_tokens_per_row(seq=262144, image_max_tokens=64,
                                         video_max_tokens=32) == 128


def test_vision_sits_on_the_first_stage_and_cp_splits_whole_items():
    model = model_config("8b")
    shape = ModelShape.of(model)
    v = VisionShape.of(VisionConfig.from_flavor("8b"), model.hidden_size)
    assert 0.39e9 < v.tower_params < 0.43e9 and 35e6 < v.projector_params < 45e6
    layout = Layout(tp=2, cp=1, pp=2, dp=1)
    kw = dict(seq=8192, num_microbatches=8)
    for stage in ("first", "last"):
        text = predict_memory(shape, layout, stage=stage, **kw)
        vl = predict_memory(shape, layout, stage=stage, vision=v, visual_tokens_per_row=4096, **kw)
        if stage == "last":
            assert vl == text
            continue
        assert vl.params - text.params == pytest.approx(v.rank_params(2) * 2)
        assert vl.optimizer - text.optimizer == pytest.approx(v.rank_params(2) * 8)
        one = vision_activation_bytes(v, layout, patches=4096 * 4, precision="bf16")
        assert vl.activations - text.activations == pytest.approx(2 * one)  # 2 in flight
    # CP splits by whole items: 2 items per row at most, so CP 8 acts like CP 2.
    for cp, div in ((1, 1), (2, 2), (8, 2)):
        lay = Layout(tp=1, cp=cp, pp=1, dp=1, micro_batch=1)
        assert busiest_rank_patches(v, lay, visual_tokens_per_row=1000) == 4000 / div
    # More visual tokens, more memory; linear in the patch count.
    lay = Layout(tp=1, cp=1, pp=1, dp=1)
    a, b = (vision_activation_bytes(v, lay, patches=n, precision="bf16") for n in (1000, 2000))
    assert b == pytest.approx(2 * a) and a > 0


def test_plan_cli_counts_the_vision_tower(capsys):
    from megatron_keye.planning import cli_main

    base = ["--flavor", "8b", "--seq", "8192", "--gpus", "8", "--recompute", "full", "--json",
            "--top", "0"]
    assert cli_main(base) == 0
    text = json.loads(capsys.readouterr().out)
    assert cli_main([*base, "--vision-flavor", "8b", "--visual-tokens-per-row", "2048"]) == 0
    vl = json.loads(capsys.readouterr().out)
    assert vl["inputs"]["visual_tokens_per_row"] == 2048
    by_name = {e["layout"]["name"]: e["memory_gib"] for e in text["ranked"]}
    layout = vl["ranked"][0]["layout"]["name"]
    assert vl["ranked"][0]["memory_gib"]["activations"] > by_name[layout]["activations"]
    assert vl["ranked"][0]["memory_gib"]["params"] > by_name[layout]["params"]
    assert cli_main([*base, "--vision-flavor", "8b", "--visual-tokens-per-row", "2048",
                     "--vision-recompute", "full"]) == 0
    rec = {e["layout"]["name"]: e["memory_gib"] for e in
           json.loads(capsys.readouterr().out)["ranked"]}
    # vision.recompute=full: the tower keeps only its layer inputs, so fewer activations.
    assert (by_name[layout]["activations"] < rec[layout]["activations"]
            < vl["ranked"][0]["memory_gib"]["activations"])
    result = plan(PlanInputs(model=model_config("8b"), seq=8192, cluster=Cluster(gpus=8)))
    assert result.inputs.resolved_visual_tokens_per_row == 0  # text-only model
