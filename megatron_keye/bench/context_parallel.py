"""Context parallelism on this CPU machine: per-rank memory and step time vs sequence length.

For each (sequence S, CP degree, recompute mode) one spawned gloo world of CP ranks runs real
training steps (forward + backward + AdamW, micro batch 1, fp32, `parallel.cp_comm`) of one
random row of S tokens through `runtime.trainer.Trainer`: a warm-up step (it also allocates the
Adam state), one step with the memory probes on, then `repeats` more; the step time is the median
of the probed and the `repeats` steps (slowest rank of each). Same total cores: CP=1 runs with
2 torch threads, every CP>1 rank with 1 thread (CP=4 on 2 cores oversubscribes 2x).

What each rank measures
-----------------------
- activations: the *peak of live bytes saved for backward* during the probed step. Every tensor
  autograd saves goes through `saved_tensors_hooks`; its storage is counted while at least one
  saved reference to it is alive (the saved object is released by autograd after its node's
  backward), parameters' storages left out. That is `planning.measure.SavedTensorCounter` made
  peak-aware, so recompute's re-materialized layer (saved again inside the backward pass and
  freed right after) counts while it lives rather than adding up. It is independent of
  allocator caching and of the other processes on this machine, which is why it, and not the
  RSS, is compared with the planner's activation model.
- step RSS: peak resident memory during the probed step (VmHWM after `clear_refs` 5) minus the
  resident memory before it: everything the step allocates (saved activations, their gradients,
  attention workspace, CP receive buffers, glibc caching). Reported, not compared.
- weights+grads+optimizer: the parameter storage, the fp32 gradient buffers (`main_grad`) and
  `runtime.optim.optimizer_state_bytes` (Adam moments, ZeRO-1 sharded over DP·CP).
- step time: median wall time of `Trainer.train_step` over the timed steps (max over ranks).

Predicted: `planning.memory.predict_memory` for the same row (TP1, PP1, DP1, CP, recompute,
fp32): activations + logits, under full recompute the larger of that and the layer inputs plus
the one layer the backward pass re-materializes (the planner's `transient`; the head's saved
tensors are gone by then), and weights_and_optimizer. The cap comparison uses the planner's
total, which adds the transient and the CP receive buffers on top (conservative). The longest sequence under a per-rank cap is found from
the planner, scaled by the measured/predicted ratio of the longest measured row of that CP degree
and recompute mode, plus the measured runtime baseline (RSS of an idle set-up rank minus its
weights) — i.e. *predicted*, extrapolated from measurements, because a step at those lengths
takes far too long on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

GIB = float(2**30)


# ---------------------------------------------------------------------------------- probes
class LiveSavedBytes:
    """Context manager: current and peak bytes of unique storages held for backward."""

    def __init__(self, exclude: list | None = None):
        self._exclude = {p.untyped_storage().data_ptr() for p in (exclude or [])}
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [saved references, bytes]
        self.live = 0
        self.peak = 0
        self._hooks = None

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self._exclude or nbytes == 0:
            return tensor
        entry = self._refs.get(ptr)
        if entry is None:
            entry = self._refs[ptr] = [0, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        return _Held(tensor, self, ptr)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[ptr]

    def __enter__(self):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


class _Held:
    """What autograd keeps instead of the tensor; tells the counter when autograd drops it."""

    __slots__ = ("tensor", "counter", "ptr")

    def __init__(self, tensor, counter: LiveSavedBytes, ptr: int):
        self.tensor, self.counter, self.ptr = tensor, counter, ptr

    def __del__(self):
        self.counter._release(self.ptr)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------- worker
def _config(*, flavor: str, seq: int, cp: int, recompute: str, cp_comm: str):
    from megatron_keye.config import load_config

    return load_config(None, [
        f"model.flavor={flavor}", f"data.seq_length={seq}", f"parallel.context={cp}",
        f"parallel.cp_comm={cp_comm}", f"model.recompute={recompute}", "precision=fp32",
        "schedule.global_batch_size=1", "schedule.micro_batch_size=1",
        "schedule.warmup_iters=0", "schedule.decay_style=constant",
        "logging.wandb_mode=disabled", "logging.output_dir=outputs/bench_context_parallel",
    ])


def bench_worker(*, flavor: str, seq: int, recompute: str, cp_comm: str, repeats: int) -> dict:
    """One rank of a CP world: warm-up step, probed step, `repeats` timed steps."""
    import logging

    import torch
    import torch.distributed as dist

    from megatron_keye.models.keye_vl.rope import text_position_ids
    from megatron_keye.runtime.optim import optimizer_state_bytes
    from megatron_keye.runtime.trainer import Trainer

    logging.getLogger("megatron_keye").setLevel(logging.WARNING)
    cp = int(os.environ["WORLD_SIZE"])
    config = _config(flavor=flavor, seq=seq, cp=cp, recompute=recompute, cp_comm=cp_comm)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (1, seq), generator=g)
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_weights": torch.ones(1, seq),
             "position_ids": text_position_ids(1, seq)}

    class OneRow:
        def next_step(self):
            return [dict(batch)]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    trainer = Trainer(config, loader=OneRow()).setup()
    params = [p for m in trainer.model for p in m.parameters()]
    param_bytes = sum(s.nbytes() for s in {p.untyped_storage().data_ptr(): p.untyped_storage()
                                           for p in params}.values())
    grad_bytes = sum(p.main_grad.numel() * p.main_grad.element_size() for p in params
                     if getattr(p, "main_grad", None) is not None)
    rss_setup = _status_kib("VmRSS") * 1024

    def step():
        dist.barrier()
        start = time.perf_counter()
        result = trainer.train_step(trainer.loader.next_step())
        return time.perf_counter() - start, result

    warm_s, _ = step()  # allocates Adam state
    opt_bytes = optimizer_state_bytes(trainer.optimizer)
    dist.barrier()
    rss_before = _status_kib("VmRSS") * 1024
    reset = _reset_peak_rss()
    with LiveSavedBytes(exclude=params) as saved:
        probe_s, _ = step()
    rss_peak = _status_kib("VmHWM") * 1024 if reset else 0
    times = [probe_s]  # the hooks cost a few hundred Python calls: a timed step like the rest
    loss = float("nan")
    for _ in range(repeats):
        t, result = step()
        times.append(t)
        loss = result.loss
    return {
        "rank": dist.get_rank(), "threads": torch.get_num_threads(),
        "warmup_s": warm_s, "probe_s": probe_s, "times": times,
        "act_peak": saved.peak, "act_left": saved.live,
        "rss_setup": rss_setup, "rss_before": rss_before,
        "rss_step": (rss_peak - rss_before) if reset else None,
        "rss_peak": rss_peak if reset else None,
        "param_bytes": param_bytes, "grad_bytes": grad_bytes, "opt_bytes": opt_bytes,
        "loss": loss,
    }


# ---------------------------------------------------------------------------------- planner
def _shape(flavor: str):
    from megatron_keye.planning.shapes import ModelShape, model_config

    return ModelShape.of(model_config(flavor))


def predicted(flavor: str, *, seq: int, cp: int, recompute: str, cp_comm: str) -> dict:
    """Planner's per-rank bytes for a row: the activation peak comparable with the measured
    saved-tensor peak, weights+optimizer, and the total (with CP buffers and transients)."""
    from megatron_keye.planning.layout import Layout
    from megatron_keye.planning.memory import _sum as sum_components
    from megatron_keye.planning.memory import head_components, layer_components, predict_memory

    shape = _shape(flavor)
    layout = Layout(tp=1, cp=cp, pp=1, dp=1, sequence_parallel=False, cp_comm=cp_comm,
                    recompute=recompute, micro_batch=1)
    m = predict_memory(shape, layout, seq=seq, precision="fp32", stage="only")
    act = m.activations + m.logits
    if recompute == "full":
        # The backward pass re-materializes one layer at a time, after the head's saved
        # tensors (final norm, fp32 softmax) are released: the peak is the larger of the two.
        tokens = float(seq)
        layer = sum_components(layer_components(shape, recompute="none", precision="fp32"),
                               layout, tokens=tokens, precision="fp32")
        head = sum_components(head_components(shape), layout, tokens=tokens, precision="fp32")
        act = max(act, act - head + layer)
    return {"act": act, "weights": m.weights_and_optimizer, "total": m.total}


def longest_under_cap(flavor: str, *, cp: int, recompute: str, cp_comm: str, cap: float,
                      act_scale: float, overhead: float, step: int = 1024) -> int:
    """Longest multiple of `step` whose calibrated predicted per-rank peak stays under `cap`:
    overhead + weights + (total - weights) · act_scale (bisection on the monotone model)."""

    def fits(seq: int) -> bool:
        p = predicted(flavor, seq=seq, cp=cp, recompute=recompute, cp_comm=cp_comm)
        return overhead + p["weights"] + (p["total"] - p["weights"]) * act_scale <= cap

    step = max(step, 2 * cp)
    lo, hi = 0, step
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------- driver
def run_row(*, flavor: str, seq: int, cp: int, recompute: str, cp_comm: str, repeats: int,
            threads_total: int, timeout: float) -> dict:
    from megatron_keye.runtime.spawn import spawn_ranks

    threads = max(1, threads_total // cp)
    start = time.perf_counter()
    ranks = spawn_ranks(bench_worker, cp, timeout=timeout, threads=threads, flavor=flavor,
                        seq=seq, recompute=recompute, cp_comm=cp_comm, repeats=repeats)
    wall = time.perf_counter() - start
    per_step = [max(r["times"][i] for r in ranks) for i in range(repeats + 1)]
    step_s = statistics.median(per_step)
    pred = predicted(flavor, seq=seq, cp=cp, recompute=recompute, cp_comm=cp_comm)
    act = max(r["act_peak"] for r in ranks)
    weights = max(r["param_bytes"] + r["grad_bytes"] + r["opt_bytes"] for r in ranks)
    rss_step = [r["rss_step"] for r in ranks if r["rss_step"] is not None]
    overhead = max(r["rss_setup"] - r["param_bytes"] - r["grad_bytes"] for r in ranks)
    return {
        "flavor": flavor, "seq": seq, "cp": cp, "recompute": recompute, "threads": threads,
        "step_s": step_s, "steps": per_step, "warmup_s": max(r["warmup_s"] for r in ranks),
        "tokens_s": seq / step_s, "act": act, "act_pred": pred["act"], "ratio": act / pred["act"],
        "weights": weights, "weights_pred": pred["weights"],
        "rss_step": max(rss_step) if rss_step else float("nan"),
        "rss_peak": max((r["rss_peak"] or 0) for r in ranks),
        "overhead": overhead, "wall_s": wall, "loss": ranks[0]["loss"],
    }


def _estimate(prev: list[tuple[int, float]], seq: int) -> float:
    """Step time at `seq` extrapolated from the measured (seq, step s) of the same CP/recompute:
    the last doubling's growth factor (at least 2.5x per doubling: attention is quadratic),
    3x per doubling if one point."""
    if not prev:
        return 0.0
    (s1, t1) = prev[-1]
    growth = 3.0
    if len(prev) >= 2:
        s0, t0 = prev[-2]
        growth = max(2.5, (t1 / t0) ** (math.log(2) / math.log(s1 / s0)))
    return t1 * growth ** math.log2(seq / s1)


def _fmt_table(rows: list[dict]) -> str:
    head = (f"{'flavor':6} {'seq':>6} {'CP':>2} {'thr':>3} {'recompute':9} {'step s':>8} "
            f"{'tok/s':>7} {'act GiB':>8} {'pred GiB':>8} {'meas/pred':>9} {'w+opt GiB':>9} "
            f"{'stepRSS GiB':>11} {'peakRSS GiB':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['flavor']:6} {r['seq']:>6} {r['cp']:>2} {r['threads']:>3} {r['recompute']:9} "
            f"{r['step_s']:8.2f} {r['tokens_s']:7.0f} {r['act'] / GIB:8.3f} "
            f"{r['act_pred'] / GIB:8.3f} {r['ratio']:9.3f} {r['weights'] / GIB:9.4f} "
            f"{r['rss_step'] / GIB:11.3f} {r['rss_peak'] / GIB:11.3f}")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def goal_report(rows: list[dict], *, flavor: str, recomputes: list[str], cp_comm: str,
                cap: float) -> list[str]:
    out = []
    by = {(r["seq"], r["cp"], r["recompute"]): r for r in rows}
    for rc in recomputes:
        common = sorted(s for (s, cp, r) in by if cp == 1 and r == rc and (s, 2, rc) in by)
        if not common:
            out.append(f"[{rc}] no length measured at both CP=1 and CP=2")
            continue
        s = common[-1]
        a = by[(s, 2, rc)]["act"] / by[(s, 1, rc)]["act"]
        out.append(f"[{rc}] activation/rank CP2/CP1 at {s} (longest common, measured): {a:.3f} "
                   f"(goal <= 0.55) {_verdict(a <= 0.55)}"
                   + ("" if a <= 0.55 else f", over by {a / 0.55 - 1:.1%}"))
        for s in common:
            t = by[(s, 2, rc)]["step_s"] / by[(s, 1, rc)]["step_s"]
            out.append(f"[{rc}] step time CP2 (2x1 thread) / CP1 (2 threads) at {s} (measured): "
                       f"{t:.3f} (goal <= 1.10) {_verdict(t <= 1.10)}"
                       + ("" if t <= 1.10 else f", over by {t / 1.10 - 1:.1%}"))
    for rc in recomputes:
        longest = {}
        for cp in (1, 4):
            measured = [r for r in rows if r["cp"] == cp and r["recompute"] == rc]
            if not measured:
                continue
            last = max(measured, key=lambda r: r["seq"])
            pred = predicted(flavor, seq=last["seq"], cp=cp, recompute=rc, cp_comm=cp_comm)
            # calibrate the whole non-weight part by the measured/predicted activation ratio
            scale = max(1.0, last["ratio"])
            overhead = max(r["overhead"] for r in measured)
            longest[cp] = longest_under_cap(flavor, cp=cp, recompute=rc, cp_comm=cp_comm,
                                            cap=cap, act_scale=scale, overhead=overhead)
            out.append(f"[{rc}] CP={cp}: longest sequence with per-rank peak <= "
                       f"{cap / GIB:.1f} GiB (predicted: planner total x {scale:.3f} + "
                       f"{overhead / GIB:.2f} GiB runtime; longest measured {last['seq']}, "
                       f"planner total there {pred['total'] / GIB:.3f} GiB): {longest[cp]:,}")
        if 1 in longest and 4 in longest and longest[1]:
            x = longest[4] / longest[1]
            out.append(f"[{rc}] longest sequence CP4/CP1 under the cap (predicted): {x:.2f}x "
                       f"(goal >= 3.5) {_verdict(x >= 3.5)}"
                       + ("" if x >= 3.5 else f", short by {1 - x / 3.5:.1%}"))
    errs = [(r, r["ratio"] - 1.0) for r in rows]
    bad = [(r, e) for r, e in errs if abs(e) > 0.15]
    worst = max(errs, key=lambda re: abs(re[1])) if errs else None
    if worst:
        r, e = worst
        out.append(f"planner activation error per row: worst {e:+.1%} (seq {r['seq']}, CP "
                   f"{r['cp']}, {r['recompute']}); {len(rows) - len(bad)}/{len(rows)} rows "
                   f"within ±15% {_verdict(not bad)}")
        werr = max(abs(r["weights"] / r["weights_pred"] - 1) for r in rows)
        out.append(f"planner weights+grads+optimizer error: worst {werr:.2%} "
                   f"{_verdict(werr <= 0.15)}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="tiny")
    parser.add_argument("--min-seq", type=int, default=4096)
    parser.add_argument("--max-seq", type=int, default=65536)
    parser.add_argument("--cp", default="1,2,4", help="CP degrees, comma separated")
    parser.add_argument("--recompute", default="none,full",
                        help="recompute modes (none|selective|full), comma separated")
    parser.add_argument("--cp-comm", default="p2p")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed steps after the probed one (median of repeats + 1)")
    parser.add_argument("--threads", type=int, default=2, help="total torch threads per row")
    parser.add_argument("--max-step-s", type=float, default=20.0,
                        help="skip a row whose extrapolated step time exceeds this")
    parser.add_argument("--cap-gib", type=float, default=24.0 / 4,
                        help="per-rank memory cap for the longest-sequence comparison")
    parser.add_argument("--total-gib", type=float, default=24.0,
                        help="machine memory: skip rows whose predicted total over ranks exceeds")
    args = parser.parse_args(argv)

    cps = [int(x) for x in args.cp.split(",")]
    recomputes = args.recompute.split(",")
    rows: list[dict] = []
    skipped: list[str] = []
    t0 = time.perf_counter()
    for rc in recomputes:
        for cp in cps:
            history: list[tuple[int, float]] = []
            seq = args.min_seq
            while seq <= args.max_seq:
                pred = predicted(args.flavor, seq=seq, cp=cp, recompute=rc, cp_comm=args.cp_comm)
                est = _estimate(history, seq)
                if pred["total"] * cp > args.total_gib * GIB * 0.8:
                    skipped.append(f"{seq} CP{cp} {rc}: predicted {pred['total'] * cp / GIB:.1f} "
                                   f"GiB over all ranks")
                    break
                if est > args.max_step_s:
                    skipped.append(f"{seq} CP{cp} {rc}: step estimated at {est:.0f} s "
                                   f"> {args.max_step_s:.0f} s")
                    break
                row = run_row(flavor=args.flavor, seq=seq, cp=cp, recompute=rc,
                              cp_comm=args.cp_comm, repeats=args.repeats,
                              threads_total=args.threads,
                              timeout=max(300.0, 60 + 8 * max(est, 10.0) * (args.repeats + 2)))
                rows.append(row)
                history.append((seq, row["step_s"]))
                print(f"  measured {args.flavor} seq={seq} CP={cp} {rc}: step "
                      f"{row['step_s']:.2f}s (all {', '.join(f'{x:.2f}' for x in row['steps'])};"
                      f" warm-up {row['warmup_s']:.2f}s), act {row['act'] / GIB:.3f} GiB "
                      f"(pred {row['act_pred'] / GIB:.3f}), row wall {row['wall_s']:.0f}s",
                      flush=True)
                seq *= 2
    elapsed = time.perf_counter() - t0

    print(f"\nContext parallelism, flavor={args.flavor}, fp32, micro batch 1, cp_comm="
          f"{args.cp_comm}, {args.threads} threads in total per row (CP=1: {args.threads} "
          f"threads; CP>1: {max(1, args.threads // 2)} per rank; CP=4 oversubscribes "
          f"{os.cpu_count()} cores), step = median of {args.repeats + 1} timed steps after warm-up")
    print("act = measured peak of live bytes saved for backward per rank; pred = planner; "
          "w+opt = measured weights + grad buffers + Adam state per rank; stepRSS = peak RSS "
          "during the step minus RSS before it (max over ranks)\n")
    print(_fmt_table(rows))
    if skipped:
        print("\nnot measured: " + "; ".join(skipped))
    print("\ngoals:")
    for line in goal_report(rows, flavor=args.flavor, recomputes=recomputes,
                            cp_comm=args.cp_comm, cap=args.cap_gib * GIB):
        print("  " + line)
    print(f"\n(total bench wall time {elapsed / 60:.1f} min)")


if __name__ == "__main__":
    main()
