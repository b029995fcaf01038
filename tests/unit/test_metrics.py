"""FLOP accounting and the progress line."""

from megatron_keye.config import load_config
from megatron_keye.runtime.metrics import flops_per_token, format_progress, matmul_params


def test_qwen3_8b_flops_match_the_anchor_table():
    """anchors-systems.md §5: 6N = 45.4 GFLOP/token and 52.7 total at 8K for Qwen3-8B."""
    model = load_config(None, ["model.flavor=8b"]).model
    assert abs(6 * matmul_params(model) / 1e9 - 45.4) < 0.1
    assert abs(flops_per_token(model, 8192) / 1e9 - 52.7) < 0.1
    assert abs(flops_per_token(model, 131072) / 1e9 - 161.4) < 0.2


def test_progress_line():
    line = format_progress(10, 100, {"loss": 2.5, "grad_norm": 1.0, "lr": 1e-3,
                                     "tokens_per_s": 1234.0, "loss_tokens_per_s": 617.0,
                                     "mfu": 0.1, "skipped_steps": 2})
    assert line.startswith("step     10/100 | loss 2.5000")
    assert "tok/s 1,234 | loss tok/s 617" in line and "mfu 10.0%" in line and "skipped 2" in line
