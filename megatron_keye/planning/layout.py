"""Parallel layouts (TP × CP × PP × DP) and which of them a model, sequence and cluster allow."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_keye.planning.shapes import ModelShape


@dataclass(kw_only=True, frozen=True)
class Cluster:
    """GPUs, their memory and links. Bandwidths are per GPU per direction, in GB/s (1e9 B/s)."""

    gpus: int
    gpus_per_node: int = 8
    memory_gib: float = 80.0  # per GPU, GiB (2**30 B) as torch reports it
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    intra_node_gbps: float = 450.0  # NVLink 4 (H100 SXM): 900 GB/s bidirectional
    inter_node_gbps: float = 50.0  # one 400 Gb/s InfiniBand NIC per GPU
    peak_flops: float = 989.4e12  # dense BF16 datasheet peak (H100 SXM)


@dataclass(kw_only=True, frozen=True)
class Layout:
    """One parallel layout; rank order is TP (fastest), CP, DP, PP (megatron's tp-cp-dp-pp)."""

    tp: int
    cp: int
    pp: int
    dp: int
    vpp: int = 1
    sequence_parallel: bool = True
    cp_comm: str = "p2p"  # p2p (ring) | a2a (Ulysses); only meaningful when cp > 1
    recompute: str = "selective"  # none | selective | full
    micro_batch: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def name(self) -> str:
        parts = [f"TP{self.tp}", f"CP{self.cp}" + (f"-{self.cp_comm}" if self.cp > 1 else ""),
                 f"PP{self.pp}" + (f"x{self.vpp}" if self.vpp > 1 else ""), f"DP{self.dp}"]
        return " ".join(parts) + f" rc={self.recompute}"

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


def group_bandwidth(layout: Layout, cluster: Cluster, group: str) -> float:
    """GB/s of a group's links: intra-node when the group's rank span fits in one node.

    With TP fastest, then CP, DP, PP, a group of size g at stride `inner` spans g·inner ranks.
    """
    inner = {"tp": 1, "cp": layout.tp, "dp": layout.tp * layout.cp,
             "pp": layout.tp * layout.cp * layout.dp}[group]
    size = {"tp": layout.tp, "cp": layout.cp, "dp": layout.dp, "pp": layout.pp}[group]
    if group == "dp":  # the distributed optimizer's group is DP × CP (stride TP)
        inner, size = layout.tp, layout.cp * layout.dp
    span = inner * size
    return cluster.intra_node_gbps if span <= cluster.gpus_per_node else cluster.inter_node_gbps


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problems(layout: Layout, shape: ModelShape, *, seq: int, global_batch: int,
                    cluster: Cluster) -> list[str]:
    """Why a layout cannot run (empty when it can): the rules of config/validation plus CP's."""
    why = []
    if layout.world != cluster.gpus:
        why.append(f"TP·CP·PP·DP = {layout.world} != {cluster.gpus} GPUs")
    if shape.heads % layout.tp:
        why.append(f"TP {layout.tp} does not divide {shape.heads} attention heads")
    if shape.kv_heads % layout.tp:
        why.append(f"TP {layout.tp} does not divide {shape.kv_heads} KV heads")
    if layout.tp > cluster.gpus_per_node:
        why.append(f"TP {layout.tp} > {cluster.gpus_per_node} GPUs per node")
    if shape.layers % (layout.pp * layout.vpp):
        why.append(f"PP·VPP {layout.pp * layout.vpp} does not divide {shape.layers} layers")
    if layout.vpp > 1 and layout.pp < 2:
        why.append("virtual pipeline stages need PP >= 2")
    split = 2 * layout.cp * (layout.tp if layout.sequence_parallel else 1)
    if (layout.cp > 1 or layout.sequence_parallel) and seq % split:
        why.append(f"sequence {seq} not divisible by 2·CP·TP = {split}"
                   if layout.sequence_parallel else f"sequence {seq} not divisible by 2·CP = {split}")
    if layout.cp > 1 and layout.cp_comm == "a2a":
        kv_local = shape.kv_heads // layout.tp if shape.kv_heads % layout.tp == 0 else 0
        if kv_local == 0 or kv_local % layout.cp:
            why.append(f"a2a needs CP {layout.cp} to divide the {max(kv_local, 0)} KV heads "
                       f"per TP rank")
    per_step = layout.micro_batch * layout.dp
    if global_batch % per_step:
        why.append(f"global batch {global_batch} not divisible by micro batch × DP = {per_step}")
    return why


def candidate_layouts(shape: ModelShape, *, cluster: Cluster, micro_batch: int,
                      recomputes: tuple[str, ...], cp_comms: tuple[str, ...] = ("p2p", "a2a"),
                      vpp: int = 1) -> list[Layout]:
    """Every TP × CP × PP × DP factorization of the GPU count, with each recompute mode and CP
    transport (SP on whenever TP > 1); feasibility is decided by `layout_problems`."""
    out = []
    for tp in _divisors(cluster.gpus):
        for cp in _divisors(cluster.gpus // tp):
            for pp in _divisors(cluster.gpus // (tp * cp)):
                dp = cluster.gpus // (tp * cp * pp)
                for comm in cp_comms if cp > 1 else ("p2p",):
                    for rc in recomputes:
                        out.append(Layout(tp=tp, cp=cp, pp=pp, dp=dp,
                                          vpp=vpp if pp > 1 else 1,
                                          sequence_parallel=tp > 1, cp_comm=comm,
                                          recompute=rc, micro_batch=micro_batch))
    return out
