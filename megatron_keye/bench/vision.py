"""Vision tower + projector throughput: ours (packed, variable resolution) vs transformers'
SiglipVisionModel of the same size run its native way, same inputs, same run.

Inputs: a mix of images of different sizes and the slow (large) and fast (small) frames of a
video, as patch rows [P, 3, 14, 14] with one (1, h, w) grid per image or frame (the batch
contract). Ours encodes all of them in ONE call: the packed sequence through the tower
(per-frame attention, 2D RoPE, interpolated positions) and the 2x2-merging projector. The peer
gets the same pixels as images [n, 3, 14h, 14w] with `interpolate_pos_encoding=True`, one call per
resolution: every image alone, consecutive video frames of one size batched together (the most
it can batch without reordering; slow and fast frames interleave in temporal order). Both run fp32 on this CPU with the same torch threads; the peer has no pooling
head (`vision_use_head=False`) and no projector, so ours does strictly more work (the projector,
and exact 2D RoPE on q/k).

Reported per side and mode (forward under no_grad; forward + backward of a random projection of
the outputs into every weight, one backward per batch): median wall time over `--runs` timed
runs after a warm-up, the two sides timed in alternation,
images/s (images and video frames each count one) and visual tokens/s (LLM tokens = patches / 4,
the same count for both sides), and our/peer ratio of visual tokens/s. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# (h, w) in patches of the images; then a video in temporal order: slow frames (full budget)
# and fast frames (~30% of a slow frame's tokens) as SlowFast classification interleaves them.
IMAGE_GRIDS = [(32, 24), (20, 28), (16, 16), (12, 20)]
VIDEO_FRAME_TYPES = "SFFSFFFSFFSFFFFSFFSFFFSF"
SLOW_GRID, FAST_GRID = (16, 22), (8, 12)


def workload(scale: float = 1.0) -> list[tuple[int, int]]:
    """(h, w) of every image and frame; `scale` shrinks or grows every side (kept even)."""
    def sized(hw):
        return tuple(max(2, 2 * round(s * scale / 2)) for s in hw)

    frames = [sized(hw) for hw in IMAGE_GRIDS]
    frames += [sized(SLOW_GRID if kind == "S" else FAST_GRID) for kind in VIDEO_FRAME_TYPES]
    return frames


def patch_rows(frames: list[tuple[int, int]], patch: int, *, seed: int = 0):
    """Random normalized pixels as patch rows [P, 3, p, p] and the (1, h, w) grids."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[1, h, w] for h, w in frames])
    patches = int(grids.prod(1).sum())
    return torch.rand(patches, 3, patch, patch, generator=g) * 2 - 1, grids


def as_images(pixels: torch.Tensor, frames: list[tuple[int, int]], patch: int) -> list[torch.Tensor]:
    """The peer's calls: [n, 3, p*h, p*w] images, consecutive equal sizes batched."""
    calls, start = [], 0
    for h, w in frames:
        rows = pixels[start:start + h * w]
        start += h * w
        image = rows.view(h, w, 3, patch, patch).permute(2, 0, 3, 1, 4).reshape(
            3, h * patch, w * patch)
        if calls and calls[-1][0] == (h, w):
            calls[-1][1].append(image)
        else:
            calls.append(((h, w), [image]))
    return [torch.stack(images) for _, images in calls]


def build_ours(flavor: str, lm_hidden: int):
    from megatron.core import parallel_state, tensor_parallel

    from megatron_keye.config.schema import VisionConfig
    from megatron_keye.models.keye_vl.builder import initialize_vision_by_name
    from megatron_keye.models.keye_vl.projector import Projector
    from megatron_keye.models.keye_vl.vision import VisionTower
    from megatron_keye.runtime.parallel import init_distributed

    init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    vc = VisionConfig.from_flavor(flavor)
    tower = VisionTower(vc, attention_backend="sdpa")
    projector = Projector(vc, lm_hidden_size=lm_hidden)
    initialize_vision_by_name(tower, prefix="vision.", seed=0)
    initialize_vision_by_name(projector, prefix="projector.", seed=0)
    return vc, tower, projector


def build_peer(vc):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=vc.hidden_size, intermediate_size=vc.ffn_hidden_size,
        num_hidden_layers=vc.num_layers, num_attention_heads=vc.num_attention_heads,
        num_channels=vc.num_channels, image_size=vc.position_grid * vc.patch_size,
        patch_size=vc.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=vc.layer_norm_eps,
        vision_use_head=False, attention_dropout=0.0,
    )
    config._attn_implementation = "sdpa"
    return SiglipVisionModel(config).float()


def _alternating_medians(first, second, runs: int) -> tuple[float, float]:
    """Median wall times of two functions timed in alternation (after one warm-up each), so
    load changes on a shared machine hit both sides alike."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def measure(args) -> tuple[list[dict], dict]:
    vc, tower, projector = build_ours(args.flavor, args.lm_hidden)
    peer = build_peer(vc)
    frames = workload(args.scale)
    pixels, grids = patch_rows(frames, vc.patch_size)
    images = as_images(pixels, frames, vc.patch_size)
    tokens = pixels.size(0) // 4
    g = torch.Generator().manual_seed(1)
    our_cotangent = torch.randn(tokens, args.lm_hidden, generator=g)
    peer_cotangents = [torch.randn(x.size(0), (x.size(2) // vc.patch_size)
                                   * (x.size(3) // vc.patch_size), vc.hidden_size, generator=g)
                       for x in images]

    def ours_forward():
        with torch.no_grad():
            projector(tower(pixels, grids), grids)

    def ours_backward():
        out = projector(tower(pixels, grids), grids)
        (out * our_cotangent).sum().backward()

    def peer_forward():
        with torch.no_grad():
            for x in images:
                peer(pixel_values=x, interpolate_pos_encoding=True)

    def peer_backward():  # one loss over the whole batch, one backward (a training step)
        loss = 0.0
        for x, cot in zip(images, peer_cotangents, strict=True):
            out = peer(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
            loss = loss + (out * cot).sum()
        loss.backward()

    rows = []
    for mode, ours_fn, peer_fn in (("forward", ours_forward, peer_forward),
                                   ("forward+backward", ours_backward, peer_backward)):
        timed = _alternating_medians(ours_fn, peer_fn, args.runs)
        for side, calls, seconds in (("ours (packed)", 1, timed[0]),
                                     ("HF SiglipVisionModel", len(images), timed[1])):
            rows.append({"mode": mode, "side": side, "seconds": seconds, "calls": calls,
                         "images_per_s": len(frames) / seconds, "tokens_per_s": tokens / seconds})
    return rows, {"frames": len(frames), "patches": pixels.size(0), "tokens": tokens,
                  "peer_calls": len(images), "flavor": args.flavor,
                  "threads": torch.get_num_threads(),
                  "attention": peer.config._attn_implementation}


def print_table(rows: list[dict], info: dict) -> None:
    print(f"vision tower + projector, flavor {info['flavor']}, fp32, {info['threads']} torch "
          f"threads: {info['frames']} images/frames, {info['patches']} patches, "
          f"{info['tokens']} visual tokens (peer: {info['peer_calls']} calls, "
          f"{info['attention']} attention)")
    print(f"{'mode':<18} {'side':<22} {'calls':>5} {'median s':>9} {'images/s':>9} "
          f"{'tokens/s':>10}")
    for r in rows:
        print(f"{r['mode']:<18} {r['side']:<22} {r['calls']:>5} {r['seconds']:>9.3f} "
              f"{r['images_per_s']:>9.2f} {r['tokens_per_s']:>10.1f}")
    for mode in ("forward", "forward+backward"):
        ours, peer = (r for r in rows if r["mode"] == mode)
        print(f"ratio ours/peer visual tokens/s, {mode}: "
              f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x")
    print("(medians of timed runs on a shared, noisy machine; the peer has no projector)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="small", help="vision flavor (config/flavors.py)")
    parser.add_argument("--lm-hidden", type=int, default=512, help="projector output width")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side and mode")
    parser.add_argument("--scale", type=float, default=1.0, help="scale every grid side")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for both sides (0: torch's default); 1 is the least "
                             "sensitive to other processes on a shared machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, info = measure(args)
    print_table(rows, info)
