"""`megatron-keye plan` / `tools/plan_parallel.py`: argument parsing and output."""

from __future__ import annotations

import argparse

from megatron_keye.config.flavors import FLAVORS, VISION_FLAVORS
from megatron_keye.config.schema import VisionConfig
from megatron_keye.planning.layout import Cluster
from megatron_keye.planning.plan import PlanInputs, plan
from megatron_keye.planning.report import format_table, to_json
from megatron_keye.planning.shapes import model_config
from megatron_keye.planning.vision import VISUAL_ITEMS_PER_ROW
from megatron_keye.runtime.metrics import published_bf16_peak

DESCRIPTION = """Plan TP/CP/PP/DP layouts for a model, sequence length and GPU cluster.

Prints parameters, FLOPs per token (6N + attention), and the feasible layouts ranked by
estimated step time with memory per rank (weights, fp32 grads, ZeRO-1 Adam state over DP·CP,
activations with the recompute mode, logits; with --vision-flavor the first stage also
holds the vision tower and projector and their activations), MFU and the context-parallel ring-overlap check.
Estimates, not measurements: see megatron_keye/planning/*.py for every coefficient.

example: megatron-keye plan --flavor 8b --seq 131072 --gpus 8 --gpu H100"""

_MODEL_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                 "head_dim", "ffn_hidden_size", "vocab_size")


def build_parser(prog: str = "megatron-keye plan") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="8b", choices=sorted(FLAVORS), help="model preset")
    for name in _MODEL_FIELDS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"override model.{name}")
    p.add_argument("--tie-word-embeddings", action="store_true", default=None)
    p.add_argument("--vision-flavor", default=None, choices=sorted(VISION_FLAVORS),
                   help="add a Keye-VL vision tower + projector of this preset (first stage)")
    p.add_argument("--vision-recompute", default="none", choices=["none", "full"],
                   help="the tower's model.vision.recompute (full: each ViT layer keeps only "
                        "its input)")
    p.add_argument("--visual-tokens-per-row", type=int, default=None,
                   help="visual LLM tokens (4 patches each) in one packed row (default: "
                        f"{VISUAL_ITEMS_PER_ROW} items of the largest image/video budget, "
                        "at most --seq)")
    p.add_argument("--seq", type=int, default=8192, help="tokens per sequence")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="per GPU, GiB")
    p.add_argument("--reserve-gb", type=float, default=None,
                   help="per GPU, GiB kept for CUDA context, NCCL and fragmentation "
                        "(default: 5%% of --gpu-memory-gb)")
    p.add_argument("--intra-node-gbps", type=float, default=450.0,
                   help="GB/s per GPU per direction inside a node (NVLink 4: 450)")
    p.add_argument("--inter-node-gbps", type=float, default=50.0,
                   help="GB/s per GPU per direction between nodes (400 Gb/s IB: 50)")
    p.add_argument("--gpu", default="H100", help="GPU name for the published BF16 peak")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense peak TFLOP/s (overrides --gpu)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step (default: about 4M tokens)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--recompute", choices=["auto", "none", "selective", "full"], default="auto",
                   help="activation recompute; auto tries all three")
    p.add_argument("--cp-comm", choices=["auto", "p2p", "a2a"], default="auto")
    p.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages (interleaved)")
    p.add_argument("--gemm-efficiency", type=float, default=0.60,
                   help="fraction of peak reached by the dense matmuls")
    p.add_argument("--attention-efficiency", type=float, default=0.45,
                   help="fraction of peak reached by flash attention")
    p.add_argument("--dp-overlap", type=float, default=0.8,
                   help="fraction of the DP·CP gradient/parameter traffic hidden by compute")
    p.add_argument("--top", type=int, default=10, help="layouts to show")
    p.add_argument("--json", action="store_true", help="everything as JSON")
    return p


def inputs_from_args(args: argparse.Namespace) -> PlanInputs:
    if args.peak_tflops is not None:
        peak = args.peak_tflops * 1e12
    else:
        peak = published_bf16_peak(args.gpu)
        if peak is None:
            raise ValueError(f"--gpu: no published BF16 peak for {args.gpu!r}; pass --peak-tflops")
    overrides = {name: getattr(args, name) for name in _MODEL_FIELDS}
    overrides["tie_word_embeddings"] = args.tie_word_embeddings
    model = model_config(args.flavor, **overrides)
    if args.vision_flavor is not None:
        model.vision = VisionConfig.from_flavor(args.vision_flavor,
                                                recompute=args.vision_recompute)
    if args.visual_tokens_per_row is not None and args.visual_tokens_per_row < 0:
        raise ValueError("--visual-tokens-per-row must be >= 0")
    cluster = Cluster(gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                      memory_gib=args.gpu_memory_gb, reserve_gib=(args.reserve_gb if args.reserve_gb is not None
                                   else 0.05 * args.gpu_memory_gb),
                      intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                      peak_flops=peak)
    return PlanInputs(model=model, seq=args.seq, cluster=cluster, micro_batch=args.micro_batch,
                      global_batch=args.global_batch, precision=args.precision,
                      recompute=args.recompute, cp_comm=args.cp_comm, vpp=args.vpp,
                      gemm_efficiency=args.gemm_efficiency,
                      attention_efficiency=args.attention_efficiency, dp_overlap=args.dp_overlap,
                      visual_tokens_per_row=args.visual_tokens_per_row)


def cli_main(argv: list[str] | None = None, *, prog: str = "megatron-keye plan") -> int:
    args = build_parser(prog).parse_args(argv)
    result = plan(inputs_from_args(args))
    print(to_json(result, top=args.top) if args.json else format_table(result, top=args.top))
    return 0 if result.ranked else 1
