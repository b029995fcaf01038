"""One-GPU check: the tiny and small flavors train in bf16 on one GPU, agree with the CPU fp32 run,
resume exactly from a checkpoint, and report tokens/s and MFU.

For every flavor (tiny, small) and every attention backend present (sdpa always; flash when
flash-attn imports; te when TransformerEngine imports), in fresh processes:
1. reference (CPU, fp32, gloo world of one, CUDA hidden): set up the run, write its initial
   weights, take one step; its loss is the reference first loss;
2. train (GPU, bf16, NCCL world of one): load those weights, train `--steps` steps and save a
   checkpoint, then take one more step (the uninterrupted run's next loss);
3. resume (GPU, bf16): a new process resumes from the checkpoint and takes that step again.
Checks: every loss finite and the loss falls; the first bf16 loss equals the fp32 reference
within `--loss-rtol`; the resumed next loss equals the uninterrupted one (`--resume-rtol`,
default 0: identical). Prints a table with tokens/s and MFU against the GPU's published dense
BF16 peak (and against a measured bf16 matmul peak).

    python -m megatron_keye.bench.gpu_check [--flavors tiny,small] [--backends sdpa,flash,te]

Exit codes: 0 all checks passed, 1 a check failed, 77 no CUDA device (nothing was run).
`tools/gpu_check.sh` wraps this (and installs what a fresh GPU box lacks from local wheels).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SKIPPED_NO_CUDA = 77
FLAVOR_SHAPES = {
    # seq, global batch, micro batch
    "tiny": (128, 16, 4),
    "small": (1024, 8, 4),
}
# Learning rates for a clear fall within 20 steps (AdamW, clipped, 2 warmup steps).
FLAVOR_LR = {"tiny": 3e-3, "small": 1e-3}
OPTIONAL_BACKENDS = {"flash": "flash_attn", "te": "transformer_engine"}
# Local-spec parameter names → the TE spec's fused-norm names (same weights).
_TE_NAMES = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}


def run_overrides(flavor: str, *, backend: str, precision: str, steps: int, workdir: Path,
                  lr: float) -> list[str]:
    """The run, as overrides of the `tiny-cpu-text` recipe: one process, no parallelism."""
    seq, global_batch, micro_batch = FLAVOR_SHAPES[flavor]
    return [
        f"model.flavor={flavor}",
        f"model.attention_backend={backend}",
        "parallel.tensor=1",
        "parallel.pipeline=1",
        "parallel.virtual_pipeline=1",
        "parallel.context=1",
        "parallel.sequence_parallel=false",
        f"precision={precision}",
        f"data.seq_length={seq}",
        f"schedule.global_batch_size={global_batch}",
        f"schedule.micro_batch_size={micro_batch}",
        f"schedule.train_iters={steps}",
        "schedule.exit_at_iteration=0",
        "schedule.warmup_iters=2",
        "schedule.decay_style=constant",
        f"optimizer.lr={lr}",
        f"checkpoint.save_dir={workdir / 'checkpoints'}",
        "checkpoint.save_interval=0",
        "checkpoint.save_at_end=true",
        f"logging.output_dir={workdir / 'logs'}",
        f"logging.log_interval={max(steps // 4, 1)}",
        "logging.wandb_mode=disabled",
    ]


# ----------------------------------------------------------------------------- child side
def _child(args) -> dict:
    """One phase in this (fresh) process; returns what the parent needs as JSON-able data."""
    import torch

    from megatron_keye.config import load_config
    from megatron_keye.runtime.trainer import Trainer

    if args.role != "reference" and not args.cpu_dry_run:
        if not torch.cuda.is_available():
            raise RuntimeError("the GPU phases need CUDA")
        module = OPTIONAL_BACKENDS.get(args.backend)
        if module is not None:
            try:
                importlib.import_module(module if module != "transformer_engine"
                                        else "transformer_engine.pytorch")
            except Exception as err:  # a broken install counts as absent
                return {"status": "unavailable", "reason": f"{module}: {err}".strip()[:300]}
    workdir = Path(args.workdir)
    config = load_config("tiny-cpu-text", run_overrides(
        args.flavor, backend=args.backend, precision=args.precision, steps=args.steps,
        workdir=workdir, lr=args.lr))
    trainer = Trainer(config).setup()
    weights_file = workdir.parent / "initial_weights.pt"
    result: dict = {"status": "ok", "precision": args.precision}

    if args.role == "reference":
        torch.save(_full_weights(trainer), weights_file)
        step = trainer.train_step(trainer.loader.next_step())
        result.update(first_loss=step.loss)
    elif args.role == "train":
        _load_weights(trainer, torch.load(weights_file, weights_only=True))
        history = trainer.run()  # trains args.steps steps, then saves (save_at_end)
        result.update(
            losses=[h.loss for h in history],
            step_times=[h.step_time_s for h in history],
            applied=[h.applied for h in history],
            iteration=trainer.iteration,
        )
        nxt = trainer.train_step(trainer.loader.next_step())
        result.update(next_loss=nxt.loss, **_device_facts(torch, cpu=args.cpu_dry_run))
    elif args.role == "resume":
        result.update(iteration=trainer.iteration)
        nxt = trainer.train_step(trainer.loader.next_step())
        result.update(next_loss=nxt.loss)
    else:
        raise ValueError(args.role)
    return result


def _full_weights(trainer) -> dict:
    """name → fp32 tensor of every parameter (one process holds the whole model)."""
    out = {}
    for chunk in trainer.model:
        module = chunk.module if hasattr(chunk, "module") else chunk
        for name, param in module.named_parameters():
            out[name] = param.detach().float().cpu().clone()
    return out


def _load_weights(trainer, weights: dict) -> None:
    """Copy the reference's weights into this run (local or TE spec names)."""
    import torch

    with torch.no_grad():
        for chunk in trainer.model:
            module = chunk.module if hasattr(chunk, "module") else chunk
            params = dict(module.named_parameters())
            wanted = {_te_to_local(n): n for n in params}
            missing = sorted(set(wanted) - set(weights))
            unused = sorted(set(weights) - set(wanted))
            if missing or unused:
                raise KeyError(f"reference weights do not fit: missing {missing[:4]}, "
                               f"unused {unused[:4]}")
            for local, name in wanted.items():
                params[name].copy_(weights[local])
    trainer.optimizer.reload_model_params()


def _te_to_local(name: str) -> str:
    for local, te in _TE_NAMES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def _device_facts(torch, *, cpu: bool = False) -> dict:
    from megatron_keye.runtime.metrics import measured_matmul_peak, published_bf16_peak

    if cpu:
        return {"device_name": "cpu (dry run)", "published_peak": None,
                "measured_peak": measured_matmul_peak(size=1024, repeats=3)}
    name = torch.cuda.get_device_name()
    return {
        "device_name": name,
        "published_peak": published_bf16_peak(name),
        "measured_peak": measured_matmul_peak(size=8192, dtype=torch.bfloat16, device="cuda",
                                              repeats=10),
    }


# ---------------------------------------------------------------------------- parent side
def _spawn(role: str, *, flavor: str, backend: str, workdir: Path, args, timeout: float) -> dict:
    """Run one phase in a new interpreter; returns its result (or a failure record)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    precision = "fp32" if role == "reference" or args.cpu_dry_run else "bf16"
    if role == "reference" or args.cpu_dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path: gloo, fp32, CPU shims
    result_file = workdir / f"{role}.json"
    log_file = workdir / f"{role}.log"
    command = [sys.executable, "-m", "megatron_keye.bench.gpu_check", "--child", role,
               "--flavor", flavor, "--backend", backend, "--precision", precision,
               "--steps", str(args.steps), "--lr", str(args.lr or FLAVOR_LR[flavor]),
               "--workdir", str(workdir),
               "--result", str(result_file)] + (["--cpu-dry-run"] if args.cpu_dry_run else [])
    start = time.perf_counter()
    try:
        with open(log_file, "w") as log:
            code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"{role}: no result within {timeout:.0f}s",
                "log": _tail(log_file)}
    elapsed = time.perf_counter() - start
    if code != 0 or not result_file.exists():
        return {"status": "failed", "reason": f"{role}: exit code {code}", "log": _tail(log_file)}
    result = json.loads(result_file.read_text())
    result["elapsed_s"] = elapsed
    return result


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def evaluate(flavor: str, backend: str, reference: dict, train: dict, resume: dict, *,
             loss_rtol: float, resume_rtol: float, steps: int) -> dict:
    """The checks of one (flavor, backend) run and its throughput figures (pure: testable)."""
    from megatron_keye.config import load_config
    from megatron_keye.runtime.metrics import flops_per_token

    checks: list[tuple[str, bool, str]] = []
    losses = train["losses"]
    finite = all(math.isfinite(x) for x in losses) and all(train["applied"])
    checks.append(("finite", finite, f"{len(losses)} steps, all applied" if finite
                   else f"non-finite or skipped steps: {losses}"))
    tail = losses[-5:]
    falls = finite and len(losses) == steps and statistics.mean(tail) < 0.9 * losses[0]
    checks.append(("loss falls", falls,
                   f"{losses[0]:.4f} -> {statistics.mean(tail):.4f} (mean of the last 5)"))
    ref = reference["first_loss"]
    diff = abs(losses[0] - ref)
    checks.append(("first loss = CPU fp32", diff <= loss_rtol * abs(ref),
                   f"{train.get('precision', 'bf16')} {losses[0]:.5f} vs fp32 {ref:.5f} (|d| {diff:.2e}, "
                   f"tolerance {loss_rtol * abs(ref):.2e})"))
    a, b = train["next_loss"], resume.get("next_loss", float("nan"))
    same = resume.get("iteration") == train["iteration"] and abs(a - b) <= resume_rtol * abs(a)
    checks.append(("resume: same next loss", same,
                   f"uninterrupted {a!r} vs resumed {b!r} at iteration "
                   f"{resume.get('iteration')} (of {train['iteration']})"))

    seq, global_batch, _ = FLAVOR_SHAPES[flavor]
    model = load_config(None, [f"model.flavor={flavor}"]).model
    timed = train["step_times"][min(5, len(losses) - 1):]  # after warm-up and compilation
    step_time = statistics.median(timed)
    tokens_per_s = global_batch * seq / step_time
    achieved = tokens_per_s * flops_per_token(model, seq)
    published, measured = train.get("published_peak"), train.get("measured_peak")
    return {
        "flavor": flavor,
        "backend": backend,
        "checks": checks,
        "passed": all(ok for _, ok, _ in checks),
        "tokens_per_s": tokens_per_s,
        "tflops": achieved / 1e12,
        "mfu_published": achieved / published if published else None,
        "mfu_measured": achieved / measured if measured else None,
        "device_name": train.get("device_name"),
        "published_peak": published,
        "measured_peak": measured,
    }


def _available_backends(requested: list[str] | None) -> list[str]:
    if requested:
        return requested
    found = ["sdpa"]
    for backend, module in OPTIONAL_BACKENDS.items():
        if importlib.util.find_spec(module) is not None:
            found.append(backend)
    return found


def _versions() -> str:
    import torch

    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}",
             f"CUDA {torch.version.cuda}"]
    for dist in ("megatron-core", "flash-attn", "transformer-engine", "transformer_engine"):
        try:
            from importlib.metadata import version

            parts.append(f"{dist} {version(dist)}")
        except Exception:
            pass
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavors", default="tiny,small")
    parser.add_argument("--backends", default=None,
                        help="comma list of sdpa,flash,te (default: sdpa and whatever imports)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate (default per flavor: {FLAVOR_LR})")
    parser.add_argument("--loss-rtol", type=float, default=1e-2,
                        help="first bf16 loss vs the fp32 CPU one, relative")
    parser.add_argument("--resume-rtol", type=float, default=0.0,
                        help="resumed vs uninterrupted next loss, relative (0: identical)")
    parser.add_argument("--budget-s", type=float, default=280.0,
                        help="skip optional backends once this much wall time is used")
    parser.add_argument("--workdir", default=None, help="keep run files here (default: a temp dir)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="exercise the phases on the CPU in fp32 (no GPU claims; for tests)")
    # Internal: one phase in a child process.
    parser.add_argument("--child", choices=["reference", "train", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--flavor", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        args.role = args.child
        Path(args.result).write_text(json.dumps(_child(args)))
        return 0

    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing was run "
              f"(exit {SKIPPED_NO_CUDA})", flush=True)
        return SKIPPED_NO_CUDA
    flavors = [f for f in args.flavors.split(",") if f]
    unknown = sorted(set(flavors) - set(FLAVOR_SHAPES))
    if unknown:
        parser.error(f"--flavors: unknown {unknown}; choose from {sorted(FLAVOR_SHAPES)}")
    start = time.perf_counter()
    rows, failures, notes = run_checks(args, flavors)
    print(format_table(rows), flush=True)
    from megatron_keye.bench.cp_kernels import check_block_kernels, format_rows

    kernel_rows = check_block_kernels("cpu" if args.cpu_dry_run else "cuda",
                                      dtype=torch.float32 if args.cpu_dry_run else torch.bfloat16)
    print(format_rows(kernel_rows), flush=True)
    rows = rows + [{"passed": r["passed"]} for r in kernel_rows]
    for note in notes:
        print(note, flush=True)
    for flavor, what, record in failures:
        print(f"FAIL [{flavor}/{what}] {record.get('reason')}\n{record.get('log', '')}",
              flush=True)
    passed = bool(not failures and rows and all(r["passed"] for r in rows))
    print(f"gpu_check: {'PASSED' if passed else 'FAILED'} in {time.perf_counter() - start:.0f}s",
          flush=True)
    return 0 if passed else 1


def run_checks(args, flavors: list[str]) -> tuple[list[dict], list[tuple], list[str]]:
    """Every (flavor, backend) run: evaluated rows, failed phases, notes on skipped backends."""
    start = time.perf_counter()
    if args.cpu_dry_run:
        backends = ["sdpa"]
    else:
        backends = _available_backends(args.backends.split(",") if args.backends else None)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="megatron-keye-gpu-check-"))
    print(f"gpu_check: {_versions()}", flush=True)
    print(f"gpu_check: flavors {flavors}, backends {backends}, {args.steps} steps, files in "
          f"{root}", flush=True)

    rows, failures, notes = [], [], []
    for flavor in flavors:
        flavor_dir = root / flavor
        shutil.rmtree(flavor_dir, ignore_errors=True)
        (flavor_dir / "reference").mkdir(parents=True)
        reference = _spawn("reference", flavor=flavor, backend="sdpa",
                           workdir=flavor_dir / "reference", args=args, timeout=240)
        print(f"[{flavor}] CPU fp32 reference: {_brief(reference)}", flush=True)
        if reference.get("status") != "ok":
            failures.append((flavor, "reference", reference))
            continue
        for backend in backends:
            used = time.perf_counter() - start
            if backend != "sdpa" and used > args.budget_s:
                notes.append(f"[{flavor}/{backend}] skipped: {used:.0f}s of the "
                             f"{args.budget_s:.0f}s budget used")
                continue
            run_dir = flavor_dir / backend
            run_dir.mkdir(parents=True)
            train = _spawn("train", flavor=flavor, backend=backend, workdir=run_dir, args=args,
                           timeout=300)
            print(f"[{flavor}/{backend}] train: {_brief(train)}", flush=True)
            if train.get("status") == "unavailable" and backend != "sdpa":
                notes.append(f"[{flavor}/{backend}] skipped: {train['reason']}")
                continue
            if train.get("status") != "ok":
                failures.append((flavor, backend, train))
                continue
            resume = _spawn("resume", flavor=flavor, backend=backend, workdir=run_dir,
                            args=args, timeout=240)
            print(f"[{flavor}/{backend}] resume: {_brief(resume)}", flush=True)
            if resume.get("status") != "ok":
                failures.append((flavor, backend, resume))
                continue
            row = evaluate(flavor, backend, reference, train, resume, loss_rtol=args.loss_rtol,
                           resume_rtol=args.resume_rtol, steps=args.steps)
            rows.append(row)
            for name, ok, detail in row["checks"]:
                print(f"[{flavor}/{backend}]   {'PASS' if ok else 'FAIL'} {name}: {detail}",
                      flush=True)
    return rows, failures, notes


def _brief(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')}: {result.get('reason')}"
    keys = ("first_loss", "next_loss", "iteration", "device_name")
    parts = [f"{k}={result[k]:.5f}" if isinstance(result.get(k), float) else f"{k}={result[k]}"
             for k in keys if k in result]
    return ", ".join(parts + [f"{result.get('elapsed_s', 0):.0f}s"])


def format_table(rows: list[dict]) -> str:
    """tokens/s and MFU per run (MFU against the published peak, and the measured one)."""
    if not rows:
        return "gpu_check: no completed runs"
    first = rows[0]
    published = first.get("published_peak")
    lines = [
        f"\n{first.get('device_name')}: published dense BF16 peak "
        f"{published / 1e12:.0f} TFLOP/s" if published else
        f"\n{first.get('device_name')}: no published BF16 peak in the table",
        f"measured matmul peak: {(first.get('measured_peak') or 0) / 1e12:.1f} TFLOP/s",
        f"{'flavor':8} {'backend':8} {'tokens/s':>12} {'TFLOP/s':>8} {'MFU(pub)':>9} "
        f"{'MFU(meas)':>9}  checks",
    ]
    for r in rows:
        pub = f"{r['mfu_published']:.1%}" if r["mfu_published"] is not None else "-"
        meas = f"{r['mfu_measured']:.1%}" if r["mfu_measured"] is not None else "-"
        lines.append(f"{r['flavor']:8} {r['backend']:8} {r['tokens_per_s']:12,.0f} "
                     f"{r['tflops']:8.1f} {pub:>9} {meas:>9}  "
                     f"{'pass' if r['passed'] else 'FAIL'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
