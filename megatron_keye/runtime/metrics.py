"""Throughput, MFU, memory, and where metrics go: a console progress line, a JSONL file, wandb.

MFU is model FLOPs per second over the *measured* matmul peak of this device, so a laptop and an
H100 report comparable percentages (on GPUs pass the datasheet peak via `peak_flops` instead).
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch

from megatron_keye.config.schema import LoggingConfig, ModelConfig

log = logging.getLogger(__name__)


def matmul_params(model: ModelConfig) -> int:
    """Parameters that take part in matmuls (embedding lookup excluded, LM head included)."""
    h, hd = model.hidden_size, model.head_dim
    q, kv = model.num_attention_heads * hd, model.num_query_groups * hd
    attention = h * (q + 2 * kv) + q * h
    mlp = 3 * h * model.ffn_hidden_size
    return model.num_layers * (attention + mlp) + h * model.vocab_size


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6N + 6·L·S·(heads·head_dim) (causal attention counted half)."""
    attention_width = model.num_attention_heads * model.head_dim
    return 6.0 * matmul_params(model) + 6.0 * model.num_layers * seq_length * attention_width


_PEAK_CACHE: dict[tuple, float] = {}


def measured_matmul_peak(
    *, size: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu", repeats: int = 5
) -> float:
    """Best observed FLOP/s of a square matmul on this device with the current thread count."""
    key = (size, dtype, device, torch.get_num_threads())
    if key not in _PEAK_CACHE:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.matmul(a, b)
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        _PEAK_CACHE[key] = 2.0 * size**3 / best
    return _PEAK_CACHE[key]


def published_bf16_peak(device_name: str) -> float | None:
    """Datasheet dense (no sparsity) BF16 tensor-core FLOP/s of a GPU, from its CUDA name.

    For MFU on GPUs, where a small probe matmul reaches well under the peak. Names as
    `torch.cuda.get_device_name` gives them ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
    "AMD Instinct MI300X"); None for a GPU not in the table (or without BF16 tensor cores).
    """
    name = " " + re.sub(r"[-_/]", " ", device_name.upper()) + " "
    for pattern, flops in _PUBLISHED_BF16_PEAKS:
        if re.search(pattern, name):
            return flops
    return None


# (pattern over the upper-cased name, dense BF16 FLOP/s); the first match wins, so variants
# come before their family.
_PUBLISHED_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    (r"\bGB200\b", 2.5e15),
    (r"\bB200\b", 2.25e15),
    (r"\bB100\b", 1.75e15),
    (r"\bGH200\b", 989.4e12),
    (r"\bH200 NVL\b", 835.5e12),
    (r"\bH200\b", 989.4e12),
    (r"\bH100 NVL\b", 835.5e12),
    (r"\bH100\b.*\bPCIE\b", 756.5e12),
    (r"\bH100\b", 989.4e12),  # SXM ("H100 80GB HBM3")
    (r"\bH800\b.*\bPCIE\b", 756.5e12),
    (r"\bH800\b", 989.4e12),
    (r"\bH20\b", 148e12),
    (r"\bA100\b", 312e12),
    (r"\bA800\b", 312e12),
    (r"\bA30\b", 165e12),
    (r"\bA40\b", 149.7e12),
    (r"\bA10\b", 125e12),  # not the A10G, whose figure differs
    (r"\bL40S\b", 362.05e12),
    (r"\bL40\b", 181.05e12),
    (r"\bL4\b", 121e12),
    (r"\bMI325X\b", 1307.4e12),
    (r"\bMI300X\b", 1307.4e12),
    (r"\bMI250X\b", 383e12),
)


def peak_flops(device: torch.device, *, dtype: torch.dtype) -> float:
    """The FLOP/s MFU is measured against, per process.

    On a GPU with a published 16-bit peak (`published_bf16_peak`) and a 16-bit run, that figure
    (a 2048² probe matmul reaches well under it); otherwise the measured matmul peak.
    """
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        published = published_bf16_peak(torch.cuda.get_device_name(device))
        if published:
            return published
    return measured_matmul_peak(device=device.type, dtype=dtype)


def peak_memory_bytes() -> int:
    """Peak device memory (CUDA allocator) or peak resident set size of this process (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MetricsSink:
    """Writes step metrics to the console (rank 0), `metrics.jsonl` and, if enabled, wandb."""

    def __init__(self, config: LoggingConfig, *, run_config: dict, is_writer: bool):
        self.config = config
        self.is_writer = is_writer
        self.wandb = None
        self.file = None
        if not is_writer:
            return
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")  # noqa: SIM115 (lives as long as the run)
        self.wandb = _start_wandb(config, run_config)

    def log(self, step: int, metrics: dict, *, total_steps: int) -> None:
        if not self.is_writer:
            return
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        print(format_progress(step, total_steps, metrics), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def format_progress(step: int, total: int, m: dict) -> str:
    """One console line per logged step."""
    parts = [f"step {step:>6}/{total}"]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f}")
    for key, fmt in (
        ("grad_norm", "grad {:.3f}"),
        ("lr", "lr {:.2e}"),
        ("tokens_per_s", "tok/s {:,.0f}"),
        ("loss_tokens_per_s", "loss tok/s {:,.0f}"),
        ("mfu", "mfu {:.1%}"),
        ("peak_mem_gb", "mem {:.2f}GB"),
        ("step_time_s", "{:.3f}s/it"),
    ):
        if key in m and m[key] is not None:
            parts.append(fmt.format(m[key]))
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    return " | ".join(parts)


def _start_wandb(config: LoggingConfig, run_config: dict):
    """wandb in offline mode unless a project is configured; None if unavailable or disabled."""
    mode = config.wandb_mode
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = "online" if config.wandb_project else "offline"
    try:
        import wandb
    except ImportError:
        if config.wandb_project:
            log.warning("logging.wandb_project is set but wandb is not installed; "
                        "pip install megatron-keye[wandb]")
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=config.wandb_project or "megatron-keye",
        name=config.run_name,
        mode=mode,
        dir=config.output_dir,
        config=run_config,
    )
