"""Which vision embedding goes to which placeholder token, on which rank, and who encodes it.

The batch lists every image and video frame (`vision_grids`, one (t, h, w) row per item) in the
order their `<|image_pad|>`/`<|video_pad|>` tokens appear, row by row, left to right; item i
yields t*h*w/merge² embeddings, one per pad, in raster order. So the k-th pad of the micro-batch
(its "slot") takes the k-th embedding, and item i owns a contiguous run of slots.

Without context parallelism one rank encodes every item and writes slot k to its pad. Under
CP each rank holds only its zig-zag chunks of the rows, so:

1. the ranks of a CP group all-gather which of their tokens are pads and where those tokens
   sit in the full row (`VisionLayout`), so every rank knows every slot's owner;
2. the items are split between the ranks by estimated cost (`assign_items`: patches for the
   MLP and projections plus patches² for the attention, so one large slow frame weighs as
   much as several fast ones), whole items only;
3. each rank encodes its items and sends every embedding to the rank holding its pad
   (`all_to_all_rows`, uneven all-to-all), whose backward returns each rank the gradients of
   the embeddings it produced. No rank ever holds all embeddings.

Every rank computes the same plan from the same all-gathered layout, so the plan needs no
further communication, and a count mismatch is raised identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VisionLayout:
    """Where the pads of a micro-batch are, over the full rows of the CP group.

    `mask` [b, s] marks pad tokens of the full rows; `owner` [b, s] is the CP rank holding each
    token and `local` [b, s] its column in that rank's chunk; `sample_ids` [b, s] or None.
    """

    mask: torch.Tensor
    owner: torch.Tensor
    local: torch.Tensor
    sample_ids: torch.Tensor | None


def gather_layout(
    pad_mask: torch.Tensor,
    *,
    positions: torch.Tensor | None,
    sample_ids: torch.Tensor | None,
    group: dist.ProcessGroup | None,
) -> VisionLayout:
    """The full-row `VisionLayout` from this rank's [b, n] pad mask and row positions.

    With a CP group of size > 1 the ranks all-gather (mask, positions, sample ids); `positions`
    [b, n] says where each local token sits in its full row (the CP split provides it).
    """
    size = 1 if group is None else dist.get_world_size(group)
    rows, n = pad_mask.shape
    if size == 1:
        column = torch.arange(n, device=pad_mask.device).expand(rows, n)
        return VisionLayout(mask=pad_mask, owner=torch.zeros_like(column), local=column,
                            sample_ids=sample_ids)
    if positions is None:
        raise ValueError("vision under context parallelism needs the batch's `positions` "
                         "(added by the CP split)")
    ids = sample_ids if sample_ids is not None else torch.zeros_like(positions)
    mine = torch.stack([pad_mask.long(), positions.long(), ids.long()])  # [3, b, n]
    pieces = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(pieces, mine.contiguous(), group=group)
    s = n * size
    mask = torch.zeros(rows, s, dtype=torch.bool, device=pad_mask.device)
    owner = torch.zeros(rows, s, dtype=torch.long, device=pad_mask.device)
    local = torch.zeros(rows, s, dtype=torch.long, device=pad_mask.device)
    full_ids = torch.zeros(rows, s, dtype=torch.long, device=pad_mask.device)
    column = torch.arange(n, device=pad_mask.device).expand(rows, n)
    for rank, piece in enumerate(pieces):
        where = piece[1]
        mask.scatter_(1, where, piece[0].bool())
        owner.scatter_(1, where, torch.full_like(where, rank))
        local.scatter_(1, where, column)
        full_ids.scatter_(1, where, piece[2])
    return VisionLayout(mask=mask, owner=owner, local=local,
                        sample_ids=full_ids if sample_ids is not None else None)


def tokens_per_item(grids: torch.Tensor, merge: int) -> list[int]:
    """Embeddings (= pad tokens) of each (t, h, w) item: t * h * w / merge²."""
    return [t * h * w // (merge * merge) for t, h, w in grids.tolist()]


def check_counts(layout: VisionLayout, counts: list[int]) -> None:
    """Every sample's pads must cover whole items, and all items must be covered.

    Raises a ValueError naming the batch row (and packed sample) where pads and grids part.
    """
    mask = layout.mask.cpu()
    ids = layout.sample_ids.cpu() if layout.sample_ids is not None else None
    item, total_items = 0, len(counts)
    for row in range(mask.size(0)):
        if ids is None:
            segments = [(None, int(mask[row].sum()))]
        else:
            values, lengths = torch.unique_consecutive(ids[row], return_counts=True)
            bounds = torch.cumsum(lengths, 0).tolist()
            starts = [0] + bounds[:-1]
            segments = [(int(v), int(mask[row, a:b].sum()))
                        for v, a, b in zip(values.tolist(), starts, bounds, strict=True)]
        for sample, pads in segments:
            where = f"batch row {row}" + (f", sample {sample}" if sample is not None else "")
            left = pads
            while left > 0:
                if item >= total_items:
                    raise ValueError(
                        f"{where}: holds image/video pad tokens beyond the {total_items} "
                        f"vision items of the batch ({sum(counts)} embeddings in all, "
                        f"{int(mask.sum())} pad tokens)")
                if counts[item] > left:
                    raise ValueError(
                        f"{where}: its {pads} image/video pad tokens end inside vision item "
                        f"{item} ({counts[item]} tokens); the pads do not match vision_grids")
                left -= counts[item]
                item += 1
    if item != total_items:
        raise ValueError(
            f"batch: {total_items - item} vision item(s) from item {item} on have no "
            f"image/video pad tokens ({int(mask.sum())} pads for {sum(counts)} embeddings)")


def item_costs(grids: torch.Tensor, *, hidden: int, ffn_hidden: int) -> list[float]:
    """Estimated ViT work per item: P·(4·hidden + 2·ffn) for the linears + 2·P² for attention.

    Multiply-adds per layer in units of `hidden`: qkv and output projection 4·hidden² per
    patch, the MLP 2·hidden·ffn per patch, scores and weighted sum 2·P²·hidden per frame of P
    patches. A video item of t frames attends within each frame.
    """
    out = []
    for t, h, w in grids.tolist():
        patches = h * w
        out.append(t * (patches * (4 * hidden + 2 * ffn_hidden) + 2 * patches * patches))
    return out


def assign_items(costs: list[float], ranks: int) -> list[int]:
    """Rank of each item: greatest cost first, to the least-loaded rank (ties: lower index).

    Deterministic, so every rank computes the same assignment.
    """
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += costs[index]
    return owner


@dataclass(frozen=True)
class PlacementPlan:
    """What this rank encodes, sends, receives and where the received embeddings go."""

    items: list[int]  # items this rank encodes, ascending
    send_order: torch.Tensor  # permutation of the encoded rows, grouped by destination rank
    send_counts: list[int]
    recv_counts: list[int]
    rows: torch.Tensor  # batch row of each received embedding
    cols: torch.Tensor  # local column of each received embedding


def plan_placement(layout: VisionLayout, counts: list[int], costs: list[float], *,
                   cp_size: int, cp_rank: int) -> PlacementPlan:
    """This rank's share of the encoding and the routes of all embeddings (see module doc)."""
    device = layout.mask.device
    seq = layout.mask.size(1)
    flat = layout.mask.flatten().nonzero().flatten()  # slot -> flat position
    slot_owner = layout.owner.flatten()[flat]
    slot_row = flat // seq
    slot_col = layout.local.flatten()[flat]
    encoder = assign_items(costs, cp_size) if cp_size > 1 else [0] * len(counts)
    slot_encoder = torch.repeat_interleave(
        torch.tensor(encoder, dtype=torch.long), torch.tensor(counts, dtype=torch.long)
    ).to(device)
    mine = [i for i, r in enumerate(encoder) if r == cp_rank]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    my_slots = torch.cat([torch.arange(starts[i], starts[i + 1], device=device) for i in mine]) \
        if mine else torch.zeros(0, dtype=torch.long, device=device)
    destination = slot_owner[my_slots]
    send_order = torch.sort(destination, stable=True).indices
    send_counts = torch.bincount(destination, minlength=cp_size).tolist()
    received = []
    recv_counts = []
    for source in range(cp_size):
        slots = ((slot_owner == cp_rank) & (slot_encoder == source)).nonzero().flatten()
        received.append(slots)
        recv_counts.append(int(slots.numel()))
    incoming = torch.cat(received)
    return PlacementPlan(items=mine, send_order=send_order, send_counts=send_counts,
                         recv_counts=recv_counts, rows=slot_row[incoming],
                         cols=slot_col[incoming])


class _AllToAllRows(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends each gradient back to its producer."""

    @staticmethod
    def forward(ctx, rows, send_counts, recv_counts, group):
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        out = rows.new_empty(sum(recv_counts), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_counts,
                               input_split_sizes=send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty(sum(ctx.send_counts), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send_counts,
                               input_split_sizes=ctx.recv_counts, group=ctx.group)
        return back, None, None, None


def all_to_all_rows(rows: torch.Tensor, *, send_counts: list[int], recv_counts: list[int],
                    group: dist.ProcessGroup) -> torch.Tensor:
    """Send `rows` (grouped by destination, `send_counts` each) and receive `recv_counts`."""
    return _AllToAllRows.apply(rows, send_counts, recv_counts, group)
