"""Context-parallel attention: a row's tokens are spread over the CP group in zig-zag order.

`context_parallel_attention` takes this CP rank's queries, keys and values ([b, h, s_local, d],
zig-zag layout of `zigzag.py`), each token's position in the full row and, for packed rows, its
sample id, and returns this rank's output of full-row attention: token i attends token j iff
(not causal or pos_j <= pos_i) and (no segments or seg_i == seg_j). Four transports:

- `allgather`: gather K/V (and positions/segments) from the whole group, attend the local queries
  to all keys; backward reduce-scatters dK/dV.
- `p2p` (ring): K/V travel round the ring by batched isend/irecv, overlapped with the current
  block; per-block outputs are merged by their log-sum-exp. The backward is a ring too, dK/dV
  accumulators travelling with K/V, each block fed the merged output/log-sum-exp. Rows in the
  zig-zag layout (per sample for packed rows) use the balanced schedule on torch's CPU flash
  kernel, sample by sample (own chunks causal; an earlier rank's first chunk seen by all local
  queries; a later rank's keys seen by the local second chunk only): no score matrix at all.
  Anything else (other layouts, non-CPU tensors) uses the masked block kernel built from
  positions/segments, which forms one block's scores (s_local x s_local) at a time.
- `a2a` (Ulysses): all-to-all from sequence-sharded to head-sharded full rows, local attention,
  all-to-all back. Needs the K/V heads divisible by CP.
- `a2a+p2p`: `a2a` inside groups of `a2a_size` consecutive CP ranks, ring across those groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_keye.ops.attention.local_kernels import (
    block_flash_usable,
    flash_block_backward,
    flash_block_forward,
    masked_block_backward,
    masked_block_forward,
    merge_partial,
)
from megatron_keye.ops.attention.zigzag import packed_zigzag_indices, zigzag_indices

COMM_TYPES = ("p2p", "a2a", "allgather", "a2a+p2p")
_KV_TAG, _GRAD_TAG = 0, 4  # K/V and meta use tags 0 and 1


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    positions: torch.Tensor,
    segments: torch.Tensor | None,
    group: dist.ProcessGroup,
    comm: str,
    a2a_size: int = 1,
    subgroups: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None,
) -> torch.Tensor:
    """This CP rank's attention output [b, heads, s_local, d] (differentiable in q, k, v).

    q [b, heads, s_local, d]; k, v [b, kv_heads, s_local, d]; positions [b, s_local] int64 (each
    token's index in the full row); segments [b, s_local] sample ids or None. `comm` is one of
    p2p | a2a | allgather | a2a+p2p; for a2a+p2p, `a2a_size` consecutive CP ranks form an a2a
    group and the ring runs across groups (`subgroups` = (a2a group, ring group) of this rank may
    be passed, e.g. megatron's hierarchical CP groups; otherwise they are created once and cached).
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[::2] != q.shape[::2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "[b, heads, s_local, d] and two [b, kv_heads, s_local, d]")
    if q.size(1) % k.size(1):
        raise ValueError(f"{q.size(1)} query heads are not a multiple of {k.size(1)} K/V heads")
    if positions.shape != q.shape[::2] or (segments is not None and segments.shape != q.shape[::2]):
        raise ValueError(f"positions/segments must be [b, s_local] = {list(q.shape[::2])}")
    if comm == "p2p":
        return _RingAttention.apply(q, k, v, positions, segments, causal, scale, group)
    if comm == "allgather":
        return _allgather_attention(q, k, v, positions, segments, causal, scale, group)
    if comm == "a2a":
        return _ulysses_attention(q, k, v, positions, segments, causal, scale, group)
    if comm == "a2a+p2p":
        return _hierarchical_attention(q, k, v, positions, segments, causal, scale, group,
                                       a2a_size, subgroups)
    raise ValueError(f"parallel.cp_comm: {comm!r} is not a context-parallel transport; "
                     f"use one of {'|'.join(COMM_TYPES)}")


# ----------------------------------------------------------------------------- masks and layout


def allowed_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_seg: torch.Tensor | None,
                 k_seg: torch.Tensor | None, *, causal: bool) -> torch.Tensor | None:
    """[b, 1, sq, sk] True where query may attend key; None when everything is allowed."""
    mask = None
    if causal:
        mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    if q_seg is not None:
        same = q_seg[:, None, :, None] == k_seg[:, None, None, :]
        mask = same if mask is None else mask & same
    return mask


def _is_zigzag(pos: torch.Tensor, cp_size: int, cp_rank: int) -> bool:
    """Every row holds exactly CP rank `cp_rank`'s zig-zag chunks of an unpacked row."""
    s_local = pos.size(1)
    if s_local % 2:
        return False
    expected = zigzag_indices(s_local * cp_size, cp_size, cp_rank, device=pos.device)
    return bool((pos == expected).all())


def zigzag_layout(pos: torch.Tensor, seg: torch.Tensor | None, cp_size: int, cp_rank: int):
    """The per-sample zig-zag layout these local tokens are in, or None if they are not.

    Returns, per row, the local lengths of its samples (each sample's two chunks back to back;
    one sample per row when `seg` is None), when every row holds exactly rank `cp_rank`'s chunks
    of samples laid back to back from the row start (`packed_zigzag_indices`).
    """
    b, s_local = pos.shape
    if seg is None:
        return [(s_local,)] * b if _is_zigzag(pos, cp_size, cp_rank) else None
    starts = torch.ones(b, s_local, dtype=torch.bool, device=seg.device)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    layout = []
    for row in range(b):
        first = torch.nonzero(starts[row]).flatten().tolist() + [s_local]
        lengths = [e - s for s, e in zip(first[:-1], first[1:], strict=True)]
        if any(n % 2 for n in lengths):
            return None
        expected = packed_zigzag_indices([n * cp_size for n in lengths], cp_size, cp_rank,
                                         device=pos.device)
        if not bool((pos[row] == expected).all()):
            return None
        layout.append(tuple(lengths))
    return layout


def _row_groups(layout):
    """(row slice, sample lengths) runs of consecutive rows sharing a layout."""
    groups, start = [], 0
    for row in range(1, len(layout) + 1):
        if row == len(layout) or layout[row] != layout[start]:
            groups.append((slice(start, row), layout[start]))
            start = row
    return groups


def block_plan(q_pos, k_pos, q_seg, k_seg, *, causal: bool, cp_size: int, q_rank: int,
               k_rank: int, q_layout=False, flash: bool | None = None):
    """How this rank's queries meet one rank's K/V block: a list of
    (row slice, q slice, k slice, kind, mask).

    kind is "full" (flash, unmasked), "causal" (flash, aligned causal) or "masked" (explicit
    mask over all rows); an empty list means no query sees any key of the block. Flash is chosen
    only where a flash block kernel takes the tensors (`flash`; default: CPU, where torch's own
    does; on GPUs `block_flash_usable`) and it is exact: both sides in the (per-sample, for packed rows)
    zig-zag layout, so each sample meets the same sample's chunks by the balanced schedule: own
    chunks causal; an earlier rank's first chunk seen by all the sample's queries (its second
    chunk follows both of ours); a later rank's chunks (both between our two) seen by the
    sample's second-chunk queries only. `q_layout` = `zigzag_layout` of the queries if known.
    """
    everything = slice(None)
    if flash is None:
        flash = q_pos.device.type == "cpu"
    if flash:
        if q_seg is None and not causal:
            return [(everything, everything, everything, "full", None)]
        if q_layout is False:
            q_layout = zigzag_layout(q_pos, q_seg, cp_size, q_rank)
        if q_layout is not None and zigzag_layout(k_pos, k_seg, cp_size, k_rank) == q_layout:
            plan = []
            for rows, lengths in _row_groups(q_layout):
                offset = 0
                for length in lengths:
                    sample, half = slice(offset, offset + length), offset + length // 2
                    if not causal:
                        plan.append((rows, sample, sample, "full", None))
                    elif k_rank == q_rank:
                        plan.append((rows, sample, sample, "causal", None))
                    elif k_rank < q_rank:
                        plan.append((rows, sample, slice(offset, half), "full", None))
                    else:
                        plan.append((rows, slice(half, offset + length), sample, "full", None))
                    offset += length
            return plan
    mask = allowed_mask(q_pos, k_pos, q_seg, k_seg, causal=causal)
    if mask is None:
        return [(everything, everything, everything, "masked",
                 torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q_pos.device))]
    if not bool(mask.any()):
        return []
    return [(everything, everything, everything, "masked", mask)]


# ----------------------------------------------------------------------------- ring (p2p)


def _ring_exchange(tensors, group, send_to: int, recv_from: int, tag: int):
    """Post isend of `tensors` to `send_to` and irecv of same-shaped buffers from `recv_from`."""
    buffers = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, send_to, group, tag + i) for i, t in enumerate(tensors)]
    ops += [dist.P2POp(dist.irecv, b, recv_from, group, tag + i) for i, b in enumerate(buffers)]
    return dist.batch_isend_irecv(ops), buffers


def _wait(requests) -> None:
    for request in requests:
        request.wait()


def _ring_peers(group):
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return (size, rank, dist.get_global_rank(group, (rank + 1) % size),
            dist.get_global_rank(group, (rank - 1) % size))


def _pack_meta(positions: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    meta = [positions.long()] if segments is None else [positions.long(), segments.long()]
    return torch.stack(meta).contiguous()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, segments, causal, scale, group):
        size, rank, send_to, recv_from = _ring_peers(group)
        seg_q = None if segments is None else segments.long()
        flash = block_flash_usable(q)
        layout = zigzag_layout(positions, seg_q, size, rank) if flash else None
        b, h, sq, d = q.shape
        out = torch.zeros(b, h, sq, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float32, device=q.device)
        kv, meta = torch.stack([k, v]).contiguous(), _pack_meta(positions, segments)
        for step in range(size):
            if step + 1 < size:
                requests, (next_kv, next_meta) = _ring_exchange([kv, meta], group, send_to,
                                                                recv_from, _KV_TAG)
            src = (rank - step) % size
            plan = block_plan(positions, meta[0], seg_q, meta[1] if seg_q is not None else None,
                              causal=causal, cp_size=size, q_rank=rank, k_rank=src,
                              q_layout=layout, flash=flash)
            for rs, qs, ks, kind, mask in plan:
                qq, kk, vv = q[rs, :, qs], kv[0][rs, :, ks], kv[1][rs, :, ks]
                if kind == "masked":
                    o, l_ = masked_block_forward(qq, kk, vv, mask, scale=scale)
                else:
                    o, l_ = flash_block_forward(qq.contiguous(), kk.contiguous(), vv.contiguous(),
                                                causal=kind == "causal", scale=scale)
                out[rs, :, qs], lse[rs, :, qs] = merge_partial(out[rs, :, qs], lse[rs, :, qs],
                                                               o, l_)
            if step + 1 < size:
                _wait(requests)
                kv, meta = next_kv, next_meta
        ctx.save_for_backward(q, k, v, positions, segments, out, lse)
        ctx.causal, ctx.scale, ctx.group, ctx.layout = causal, scale, group, layout
        ctx.flash = flash
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, positions, segments, out, lse = ctx.saved_tensors
        causal, scale, group = ctx.causal, ctx.scale, ctx.group
        size, rank, send_to, recv_from = _ring_peers(group)
        seg_q = None if segments is None else segments.long()
        grad_out = grad_out.contiguous()
        out_q = out.to(q.dtype)
        delta = (grad_out.float() * out).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv, meta = torch.stack([k, v]).contiguous(), _pack_meta(positions, segments)
        grad_requests = grad_recv = None
        for step in range(size):
            if step + 1 < size:
                requests, (next_kv, next_meta) = _ring_exchange([kv, meta], group, send_to,
                                                                recv_from, _KV_TAG)
            src = (rank - step) % size
            plan = block_plan(positions, meta[0], seg_q, meta[1] if seg_q is not None else None,
                              causal=causal, cp_size=size, q_rank=rank, k_rank=src,
                              q_layout=ctx.layout, flash=ctx.flash)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
            for rs, qs, ks, kind, mask in plan:
                qq, kk, vv = q[rs, :, qs], kv[0][rs, :, ks], kv[1][rs, :, ks]
                if kind == "masked":
                    dqi, dki, dvi = masked_block_backward(
                        grad_out[rs, :, qs], qq, kk, vv, out[rs, :, qs], lse[rs, :, qs], mask,
                        scale=scale, delta=delta[rs, :, qs])
                else:
                    dqi, dki, dvi = flash_block_backward(
                        grad_out[rs, :, qs].contiguous(), qq.contiguous(), kk.contiguous(),
                        vv.contiguous(), out_q[rs, :, qs].contiguous(),
                        lse[rs, :, qs].contiguous(), causal=kind == "causal", scale=scale)
                dq[rs, :, qs] += dqi
                dkv[0][rs, :, ks] += dki
                dkv[1][rs, :, ks] += dvi
            if grad_requests is not None:  # the accumulator of this block, from the previous rank
                _wait(grad_requests)
                dkv += grad_recv[0]
            if size > 1:
                grad_requests, (grad_recv,) = _ring_exchange([dkv], group, send_to, recv_from,
                                                             _GRAD_TAG)
                grad_recv = [grad_recv]
            if step + 1 < size:
                _wait(requests)
                kv, meta = next_kv, next_meta
        if size > 1:  # one more hop brings our own block's accumulator home
            _wait(grad_requests)
            dkv = grad_recv[0]
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype),
                None, None, None, None, None)


# ----------------------------------------------------------------------------- all-gather


def _gather_seq(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` in group-rank order (no gradient)."""
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along the sequence (dim 2); backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group, dim=2)

    @staticmethod
    def backward(ctx, grad):
        size = dist.get_world_size(ctx.group)
        b, h, s_all, d = grad.shape
        stacked = grad.reshape(b, h, size, s_all // size, d).permute(2, 0, 1, 3, 4).contiguous()
        out = torch.empty(stacked.shape[1:], dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, stacked.view(size * b, *stacked.shape[2:]),
                                   group=ctx.group)
        return out, None


def _allgather_attention(q, k, v, positions, segments, causal, scale, group):
    k_all, v_all = _AllGatherSeq.apply(k, group), _AllGatherSeq.apply(v, group)
    pos_all = _gather_seq(positions, group, dim=1)
    seg_all = None if segments is None else _gather_seq(segments, group, dim=1)
    mask = allowed_mask(positions, pos_all, segments, seg_all, causal=causal)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale,
                                          enable_gqa=k.size(1) != q.size(1))


# ----------------------------------------------------------------------------- all-to-all (Ulysses)


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[b, h, s, d] sequence shard → [b, h / n, n * s, d] head shard of the gathered tokens."""
    n = dist.get_world_size(group)
    b, h, s, d = x.shape
    send = x.reshape(b, n, h // n, s, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)  # recv[i]: rank i's tokens, our heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def _heads_to_seq(y: torch.Tensor, group) -> torch.Tensor:
    """Inverse of `_seq_to_heads`: [b, h / n, n * s, d] → [b, h, s, d]."""
    n = dist.get_world_size(group)
    b, hn, s_all, d = y.shape
    send = y.reshape(b, hn, n, s_all // n, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)  # recv[j]: rank j's heads, our tokens
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(b, n * hn, s_all // n, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return _heads_to_seq(y, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group), None


def _check_heads_divisible(kv_heads: int, n: int, comm: str) -> None:
    if kv_heads % n:
        raise ValueError(
            f"parallel.cp_comm={comm} splits the {kv_heads} key/value heads (per tensor-parallel "
            f"rank) over {n} ranks (parallel.context"
            f"{' a2a part' if comm == 'a2a+p2p' else ''}), which needs the K/V heads divisible "
            f"by it; lower parallel.context or use parallel.cp_comm=p2p|allgather"
        )


def _full_row_attention(q, k, v, pos, seg, causal, scale):
    """Attention over whole rows whose tokens are in any order, described by pos/seg [b, S]."""
    gqa = k.size(1) != q.size(1)
    if seg is None and not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if seg is None and bool((pos == pos[:1]).all()):
        order = torch.argsort(pos[0])
        if bool((pos[0, order].diff() > 0).all()):
            q, k, v = (t.index_select(2, order) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                 enable_gqa=gqa)
            return out.index_select(2, torch.argsort(order))
    mask = allowed_mask(pos, pos, seg, seg, causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _ulysses_attention(q, k, v, positions, segments, causal, scale, group):
    n = dist.get_world_size(group)
    _check_heads_divisible(k.size(1), n, "a2a")
    qh, kh, vh = (_SeqToHeads.apply(t, group) for t in (q, k, v))
    pos_all = _gather_seq(positions, group, dim=1)
    seg_all = None if segments is None else _gather_seq(segments, group, dim=1)
    out = _full_row_attention(qh, kh, vh, pos_all, seg_all, causal, scale)
    return _HeadsToSeq.apply(out, group)


# ----------------------------------------------------------------------------- a2a + p2p

_SUBGROUPS: dict = {}


def hierarchical_cp_groups(group, a2a_size: int):
    """(a2a group, ring group) of this rank: a2a over `a2a_size` consecutive ranks of `group`,
    the ring over the ranks with the same place in their a2a group. Created once per
    (group, a2a_size), by this rank's members only (`use_local_synchronization`), inner first."""
    key = (group, a2a_size)
    if key not in _SUBGROUPS:
        ranks = dist.get_process_group_ranks(group)
        rank = dist.get_rank(group)
        first = rank - rank % a2a_size
        inner = dist.new_group(ranks[first:first + a2a_size], use_local_synchronization=True)
        outer = dist.new_group(ranks[rank % a2a_size::a2a_size], use_local_synchronization=True)
        _SUBGROUPS[key] = (inner, outer)
    return _SUBGROUPS[key]


def _hierarchical_attention(q, k, v, positions, segments, causal, scale, group, a2a_size,
                            subgroups):
    n = dist.get_world_size(group)
    if a2a_size < 1 or n % a2a_size:
        raise ValueError(f"parallel.cp_comm=a2a+p2p: an a2a size of {a2a_size} does not divide "
                         f"parallel.context={n}")
    _check_heads_divisible(k.size(1), a2a_size, "a2a+p2p")
    inner, outer = subgroups if subgroups is not None else hierarchical_cp_groups(group, a2a_size)
    qh, kh, vh = (_SeqToHeads.apply(t, inner) for t in (q, k, v))
    pos = _gather_seq(positions, inner, dim=1)
    seg = None if segments is None else _gather_seq(segments, inner, dim=1)
    # Sorted by position, an a2a group's tokens form the zig-zag layout of the ring across groups.
    order = torch.argsort(pos, dim=1)
    pos = pos.gather(1, order)
    seg = None if seg is None else seg.gather(1, order)

    def rows(t, index):
        return t.gather(2, index[:, None, :, None].expand(-1, t.size(1), -1, t.size(3)))

    qh, kh, vh = (rows(t, order) for t in (qh, kh, vh))
    out = _RingAttention.apply(qh, kh, vh, pos, seg, causal, scale, outer)
    out = rows(out, torch.argsort(order, dim=1))
    return _HeadsToSeq.apply(out, inner)
