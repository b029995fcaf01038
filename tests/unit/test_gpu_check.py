"""The GPU check's CPU-side pieces: it skips cleanly without CUDA, its checks judge records
correctly, and its phases (reference, train + save, resume) run end to end on the CPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from megatron_keye.bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_without_cuda_it_says_so_and_exits_77(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == gpu_check.SKIPPED_NO_CUDA == 77
    assert "no CUDA device" in capsys.readouterr().out


def test_shell_wrapper_parses_and_skips_without_cuda():
    script = ROOT / "tools" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the wrapper would run the whole check")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 77, out.stdout + out.stderr
    assert "no CUDA device" in out.stdout


def _records(losses, *, first_ref=7.6, next_a=4.5, next_b=4.5, it_b=20):
    train = {"losses": losses, "applied": [True] * len(losses), "step_times": [0.1] * len(losses),
             "iteration": len(losses), "next_loss": next_a, "published_peak": 989.4e12,
             "measured_peak": 7e14, "device_name": "NVIDIA H100 80GB HBM3", "precision": "bf16"}
    return {"first_loss": first_ref}, train, {"next_loss": next_b, "iteration": it_b}


def _verdicts(row):
    return {name: ok for name, ok, _ in row["checks"]}


def test_checks_pass_on_a_good_run():
    losses = [7.6 - 0.15 * i for i in range(20)]
    row = gpu_check.evaluate("tiny", "sdpa", *_records(losses), loss_rtol=1e-2,
                             resume_rtol=0.0, steps=20)
    assert row["passed"] and all(_verdicts(row).values())
    seq, batch, _ = gpu_check.FLAVOR_SHAPES["tiny"]
    assert row["tokens_per_s"] == pytest.approx(seq * batch / 0.1)
    assert 0 < row["mfu_published"] < row["mfu_measured"]
    assert "H100" in gpu_check.format_table([row])


@pytest.mark.parametrize("change,failing", [
    (dict(losses=[7.6] * 20), "loss falls"),
    (dict(first_ref=7.0), "first loss = CPU fp32"),
    (dict(next_b=4.5 + 1e-6), "resume: same next loss"),
    (dict(it_b=0), "resume: same next loss"),
    (dict(losses=[7.6 - 0.15 * i for i in range(19)] + [float("nan")]), "finite"),
])
def test_checks_fail_when_they_should(change, failing):
    losses = change.pop("losses", [7.6 - 0.15 * i for i in range(20)])
    row = gpu_check.evaluate("tiny", "sdpa", *_records(losses, **change), loss_rtol=1e-2,
                             resume_rtol=0.0, steps=20)
    assert not row["passed"] and not _verdicts(row)[failing]


def test_te_parameter_names_map_to_the_local_ones():
    assert gpu_check._te_to_local("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") \
        == "decoder.layers.3.input_layernorm.weight"
    assert gpu_check._te_to_local("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") \
        == "decoder.layers.0.pre_mlp_layernorm.weight"
    assert gpu_check._te_to_local("decoder.layers.0.mlp.linear_fc1.weight") \
        == "decoder.layers.0.mlp.linear_fc1.weight"


def test_phases_run_end_to_end_on_cpu(tmp_path):
    """The GPU check's three phases in fresh processes, on the CPU in fp32 (a dry run)."""
    import argparse

    ns = argparse.Namespace(steps=4, lr=3e-3, loss_rtol=1e-2, resume_rtol=0.0, budget_s=600.0,
                            workdir=str(tmp_path), cpu_dry_run=True, backends=None)
    rows, failures, notes = gpu_check.run_checks(ns, ["tiny"])
    assert not failures, failures
    (row,) = rows
    verdicts = _verdicts(row)
    # fp32 against fp32 and an exact resume; 4 steps are too few to judge the loss curve.
    assert verdicts["finite"] and verdicts["first loss = CPU fp32"]
    assert verdicts["resume: same next loss"]
