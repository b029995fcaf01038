"""Video front-end throughput: ours vs the released keye-vl-utils `fetch_video`, same clip, same run.

    python tools/bench_video.py [--seconds 60] [--height 720] [--width 1280] [--fps 30] [--runs 5]

Both sides do the same work on the same file: read the video, sample frames at 2 fps (decord in
keye-vl-utils), classify slow/fast frames and solve the token budget. Runs alternate between the
sides and the median wall time of each gives frames/s (sampled frames per second; source frames per
second are in proportion). Ours is timed with each requested backend ("auto" picks the reader per stream:
PyAV for this H.264 clip). The script checks that every side returns identical frames, timestamps, frame
types and slow/fast sizes, and prints where our time goes. It asserts nothing about time. The
synthetic clip (libx264, scene cuts, static, fading and panning stretches) is written once and
cached.

keye-vl-utils is never a dependency of the package; the `dev` extra (what `make setup` installs)
brings it for the test oracles and this comparison, or:
    pip install opencv-python-headless keye-vl-utils==1.5.2 einops
It imports torchvision, which has no wheel matching this torch; the script registers stand-in
modules for the import (the SlowFast path never uses torchvision).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from megatron_keye.data.media.slowfast import SLOW, classify_slow_fast
from megatron_keye.data.media.synthetic_media import benchmark_scenes, write_video
from megatron_keye.data.media.video import decode_video
from megatron_keye.data.media.video_budget import solve_video_budget
from megatron_keye.data.media.video_config import VideoConfig
from megatron_keye.data.media.video_pipeline import load_video
from megatron_keye.testing.keye_reference import INSTALL_HINT, import_vision_process


def import_keye_vl_utils():
    """keye_vl_utils.vision_process, or None with the reason printed."""
    try:
        return import_vision_process()
    except ImportError as error:
        print(f"keye-vl-utils unavailable ({error}); to compare, run: {INSTALL_HINT}")
        return None


def bench_clip(args) -> Path:
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"bench_{args.seconds}s_{args.height}p_{args.fps}fps.mp4"
    if not path.exists():
        print(f"writing the benchmark clip {path} (once) ...", flush=True)
        started = time.perf_counter()
        partial = path.with_suffix(".partial.mp4")
        write_video(
            partial,
            scenes=benchmark_scenes(seconds=args.seconds, fps=args.fps),
            fps=args.fps,
            height=args.height,
            width=args.width,
            crf=23,
        )
        partial.rename(path)
        print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def ours_stages(path: Path, config: VideoConfig) -> dict[str, float]:
    """Where our time goes: decode, classification, budget (one run)."""
    decode_s, decoded = timed(lambda: decode_video(path, config=config))
    classify_s, types_ = timed(lambda: classify_slow_fast(decoded.frames, config=config))
    num_slow = int((types_ == SLOW).sum())
    budget_s, _ = timed(
        lambda: solve_video_budget(
            num_slow=num_slow,
            num_fast=types_.numel() - num_slow,
            height=decoded.height,
            width=decoded.width,
            config=config,
        )
    )
    return {"decode": decode_s, "classify": classify_s, "budget": budget_s}


def compare(ours, theirs_result) -> str:
    """Whether our result equals keye-vl-utils' (types, sizes, frames, timestamps)."""
    their_frames, kwargs = theirs_result
    budget = ours.budget
    checks = {
        "frame types": torch.equal(ours.frame_types, kwargs["frame_types"]),
        "sizes": (budget.slow_height, budget.slow_width, budget.fast_height, budget.fast_width)
        == (kwargs["height"], kwargs["width"], kwargs["fast_height"], kwargs["fast_width"]),
        "frames": torch.equal(ours.frames, their_frames),
        "timestamps": torch.equal(ours.timestamps, kwargs["timestamps"]),
    }
    return ", ".join(f"{name} {'yes' if same else 'NO'}" for name, same in checks.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--backends", default="auto,decord", help="our backends to time (auto, decord, pyav)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads for both sides (0: leave the default; data-loader workers use 1)",
    )
    parser.add_argument("--cache-dir", default="outputs/bench_video")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    path = bench_clip(args)
    theirs = import_keye_vl_utils()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    print(
        f"clip: {path} ({path.stat().st_size / 1e6:.1f} MB); torch threads "
        f"{torch.get_num_threads()}; cpu cores {os.cpu_count()}"
    )
    sides = {f"megatron-keye ({backend})": VideoConfig(backend=backend) for backend in backends}
    times: dict[str, list[float]] = {name: [] for name in sides}
    results = {}
    if theirs is not None:
        times["keye-vl-utils 1.5.2"] = []
    for run in range(args.runs):
        line = []
        for name, config in sides.items():
            seconds, results[name] = timed(lambda config=config: load_video(path, config=config))
            times[name].append(seconds)
            line.append(f"{name} {seconds:.2f} s")
        if theirs is not None:
            seconds, results["theirs"] = timed(lambda: theirs.fetch_video({"video": str(path)}))
            times["keye-vl-utils 1.5.2"].append(seconds)
            line.append(f"keye-vl-utils {seconds:.2f} s")
        print(f"run {run + 1}: " + ", ".join(line), flush=True)

    sample = results[next(iter(sides))]
    frames, source = sample.num_frames, sample.decoded.total_frames
    print(f"\n{frames} sampled frames of {source} ({sample.num_slow} slow, {sample.num_fast} fast)")
    reference = statistics.median(times["keye-vl-utils 1.5.2"]) if theirs is not None else None
    print(
        f"| side | median s ({args.runs} runs) | sampled frames/s | source frames/s | vs keye-vl-utils |"
    )
    print("|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{reference / median:.2f}x" if reference else "-"
        print(
            f"| {name} | {median:.2f} | {frames / median:.1f} | {source / median:.0f} | {ratio} |"
        )
    if theirs is not None:
        for name in sides:
            print(f"{name} identical to keye-vl-utils: {compare(results[name], results['theirs'])}")
    budget = sample.budget
    print(
        f"sizes: slow {budget.slow_height}x{budget.slow_width}, fast "
        f"{budget.fast_height}x{budget.fast_width}"
    )
    for backend in backends:
        config = VideoConfig(backend=backend)
        stages = [ours_stages(path, config) for _ in range(3)]
        print(
            f"our stages, {backend}, run one after the other (median of 3): "
            + ", ".join(
                f"{stage} {statistics.median(s[stage] for s in stages):.3f} s"
                for stage in stages[0]
            )
        )


if __name__ == "__main__":
    main()
