"""Exact top-k of magnitudes sharded over ranks, without gathering them (docs/design/threshold.md).

Top-KAST and Spartan re-pick their sets from |θ| of a weight that is split over tensor-parallel
ranks (and, for a global budget, over pipeline stages). Gathering the values to sort them would
cost O(N) memory and traffic; instead every rank histograms the bit patterns of its own shard and
the ranks all-reduce the histograms only:

* a non-negative float32 and its bit pattern, read as an integer, sort the same way, so the k-th
  largest value is the k-th largest 32-bit integer;
* three rounds histogram the next 11, 11 and 10 bits of the entries that still match the prefix
  found so far (2048, 2048 and 1024 int64 counters), each summed over the group; every rank walks
  the same summed histogram from the top, so all ranks narrow the prefix identically;
* after the third round all 32 bits are known: the threshold is exact, not approximate.

Traffic per call is a constant (`bytes_exchanged`), whatever the layer size; local work is three
O(N/ranks) passes in chunks of `_CHUNK` elements, so transient memory stays bounded.

Ties at the threshold are broken by global element index (lowest first), so exactly k entries are
selected and every data-parallel replica holding the same values selects the same ones.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ChunkedScores", "Threshold", "bytes_exchanged", "select_topk", "select_topk_positions", "topk_threshold"]

# (shift, width) of the digit each round histograms, most significant bits first: 11 + 11 + 10 = 32.
_ROUNDS = ((21, 11), (10, 11), (0, 10))
# Elements per local pass; bounds the int32/bool temporaries (~4M elements ≈ 16 MiB each).
_CHUNK = 1 << 22
_INF_BITS = 0x7F800000  # +inf: the largest valid pattern; positive NaNs lie above it
_SIGN_BIT = -(1 << 31)  # -0.0 read as int32: allowed (it is a zero), every other sign-bit pattern is not
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # widen exactly to float32
_GATHER_FIELDS = 3  # per rank in select_topk: (global_offset, local numel, local ties at the threshold)


@dataclass(frozen=True)
class ChunkedScores:
    """Scores that are never materialised whole: `chunks()` yields them as consecutive flat float
    tensors (the same sequence on every call; the select makes up to four passes), `numel` in all.

    A sparse layer scores its whole weight this way at reselection — B's values overlaid on the
    regenerated or offloaded complement, one row block at a time — so memory stays bounded.
    """

    chunks: Callable[[], Iterable[torch.Tensor]]
    numel: int
    device: torch.device

    @staticmethod
    def of(scores: "torch.Tensor | ChunkedScores") -> "ChunkedScores":
        if isinstance(scores, ChunkedScores):
            return scores
        flat = scores.reshape(-1)  # a view when contiguous, otherwise one copy of this shard
        return ChunkedScores(lambda: (flat[i : i + _CHUNK] for i in range(0, flat.numel(), _CHUNK)),
                             flat.numel(), flat.device)


@dataclass(frozen=True)
class Threshold:
    """The k-th largest score over the whole group; identical on every rank of the group.

    Selecting every entry with a score greater than `value` (`n_above` of them over the group)
    plus `n_ties_taken` of the entries equal to it gives exactly k = `n_above + n_ties_taken`.
    For k = 0 nothing is selected: `value` is +inf (`bits` its pattern), `n_above` and
    `n_ties_taken` are 0, so the rule above still selects nothing, even if some scores are +inf.
    """

    value: float  # the k-th largest score, as a float32 value
    bits: int  # its float32 bit pattern (uint32; -0.0 counts as 0.0)
    n_above: int  # entries strictly greater than `value`, summed over the group
    n_ties_taken: int  # entries equal to `value` that must also be taken (≥ 1 unless k = 0)
    comm_bytes: int  # bytes this rank handed to collectives for this call (see `bytes_exchanged`)

    @property
    def k(self) -> int:
        return self.n_above + self.n_ties_taken


def bytes_exchanged(world_size: int, tie_break: bool = False) -> int:
    """Collective payload per rank for one call, independent of the number of scores.

    It is the size of the buffers each rank hands to collectives: three histogram all-reduces
    (2048 + 1 + 2048 + 1024 int64 counters; the extra counter carries invalid-input counts, so a
    bad score on one rank raises on every rank instead of hanging the others) and, with
    `tie_break` (`select_topk`), one all-gather of three int64 per rank. A ring all-reduce moves
    about twice its payload over the wire. A world of one (or `group=None`) sends nothing; k = 0
    sends nothing either.
    """
    if world_size <= 1:
        return 0
    counters = sum(1 << width for _, width in _ROUNDS) + 1
    return 8 * counters + (8 * _GATHER_FIELDS if tie_break else 0)


def topk_threshold(scores: torch.Tensor | ChunkedScores, k: int, group: dist.ProcessGroup | None = None) -> Threshold:
    """Exact k-th largest entry of `scores` over all ranks of `group`, without moving the scores.

    `scores` is this rank's shard (any shape, flattened; float32, or float16/bfloat16 widened
    exactly) of non-negative magnitudes; `k` is the global count and must be the same on every
    rank. `group=None` means a single process: no communication at all (it does NOT mean the
    default world group; pass `torch.distributed.group.WORLD` for that). With a group, every rank
    must call this (collectives); a negative or NaN score on any rank, or k greater than the total
    number of scores, raises ValueError on every rank alike.
    """
    threshold, _, _ = _radix_select(ChunkedScores.of(scores), k, group)
    return threshold


def select_topk(
    scores: torch.Tensor,
    k: int,
    group: dist.ProcessGroup | None = None,
    global_offset: int = 0,
    global_numel: int | None = None,
) -> torch.Tensor:
    """Bool mask (shape of `scores`) selecting exactly k entries over the group: the top-k.

    All entries above the threshold are taken, and of those equal to it, the ones with the lowest
    global index. Local element i (in row-major order of `scores`) has global index
    `global_offset + i`: a rank's shard must be one contiguous range of a canonical flattening
    the caller chooses (e.g. rank-major for a row-parallel split), so that ranges of different
    ranks do not overlap. `global_numel`, if given, is the length of that flattening; the shards
    must then cover it exactly. Both are checked on every rank alike (ValueError).

    Ranks learn how many tied entries lie on lower-offset ranks from one all-gather of three
    int64 per rank, on top of `topk_threshold`'s histograms; see `bytes_exchanged`.
    """
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[select_topk_positions(scores, k, group, global_offset, global_numel)] = True
    return mask.view(scores.shape)


def select_topk_positions(
    scores: torch.Tensor | ChunkedScores,
    k: int,
    group: dist.ProcessGroup | None = None,
    global_offset: int = 0,
    global_numel: int | None = None,
) -> torch.Tensor:
    """`select_topk` as this rank's selected local positions (int64, ascending) instead of a mask,
    so that chunked scores need no dense mask either."""
    source = ChunkedScores.of(scores)
    threshold, local_ties, has_neg_zero = _radix_select(source, k, group)
    if threshold.k == 0:
        return torch.zeros(0, dtype=torch.int64, device=source.device)
    offset = operator.index(global_offset)
    row = torch.tensor([offset, source.numel, local_ties], dtype=torch.int64, device=source.device)
    if group is None:
        rows = [row]
    else:
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, row, group=group)
    shards = torch.stack(rows).cpu().tolist()
    _check_layout(shards, global_numel)
    ties_before = sum(ties for off, n, ties in shards if n > 0 and off < offset)
    quota = min(max(threshold.n_ties_taken - ties_before, 0), local_ties)

    picked = [torch.zeros(0, dtype=torch.int64, device=source.device)]  # a rank may hold no scores
    start = taken = 0
    for key in _chunks(source, clear_sign=has_neg_zero):
        take = key > threshold.bits
        if quota and taken < quota:
            tie = key == threshold.bits
            if quota < local_ties:  # a partial tie: take this rank's first `quota` tied entries
                order = tie.cumsum(0) + taken  # 1-based index among this rank's ties
                taken = int(order[-1])
                tie &= order <= quota
            take |= tie
        picked.append(torch.nonzero(take).view(-1) + start)
        start += key.numel()
    return torch.cat(picked)


def select_topk_capped(
    scores: torch.Tensor | ChunkedScores,
    k: int,
    capacity: int,
    group: dist.ProcessGroup | None = None,
    global_offset: int = 0,
    global_numel: int | None = None,
) -> tuple[torch.Tensor, int]:
    """`select_topk_positions` where no rank may take more than `capacity` entries.

    A tensor-parallel shard stores its part of B in a fixed number of slots (a parameter cannot
    change size under the optimizer), so when the exact top-k would put more than `capacity` on
    one rank, that rank keeps its own top-`capacity` and the rest of the budget is re-selected
    over the other ranks (water-filling; at most one round per rank, each a constant-size
    exchange). The total stays exactly k as long as k ≤ Σ min(capacity, shard size). Returns
    (this rank's positions, number of capped ranks — 0 means the result is the exact top-k).
    """
    source = ChunkedScores.of(scores)
    if group is None or capacity >= source.numel:
        positions = select_topk_positions(source, k, group, global_offset, global_numel)
        return positions, 0
    empty = ChunkedScores(lambda: iter(()), 0, source.device)
    remaining, capped, n_capped = k, False, 0
    while True:
        positions = select_topk_positions(empty if capped else source, remaining, group, global_offset,
                                          global_numel if not n_capped else None)
        newly = torch.tensor([int(not capped and len(positions) > capacity)], dtype=torch.int64,
                             device=source.device)
        dist.all_reduce(newly, op=dist.ReduceOp.SUM, group=group)
        if not int(newly):
            break
        if not capped and len(positions) > capacity:
            capped = True
        n_capped += int(newly)
        remaining -= int(newly) * capacity
    if capped:
        positions = select_topk_positions(source, capacity)
    return positions, n_capped


def _radix_select(scores: ChunkedScores, k: int, group: dist.ProcessGroup | None) -> tuple[Threshold, int, bool]:
    """The threshold; how many of this rank's entries equal it (read off the last round's local
    histogram, so tie-breaking needs no extra pass); whether this shard holds -0.0 (whose sign
    bit later passes must clear)."""
    k = operator.index(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:  # nothing to find: no communication, but bad input is still bad input
        bad = sum(int(_invalid(bits).sum()) for bits in _chunks(scores))
        if bad:
            raise ValueError(f"scores must be non-negative and not NaN: {bad} invalid entries on this rank")
        return Threshold(math.inf, _INF_BITS, 0, 0, 0), 0, False
    device = scores.device

    # Round 1 reads raw patterns. All valid ones lie in [0, +inf] except -0.0 (sign bit only), so
    # one min/max reduction per chunk clears the common case; only a shard that fails it is
    # scanned again to count its invalid entries (or to find that it merely holds -0.0).
    shift, width = _ROUNDS[0]
    bins = 1 << width
    hist = torch.zeros(bins + 1, dtype=torch.int64, device=device)  # [bins]: invalid entries
    suspect = torch.zeros((), dtype=torch.bool, device=device)
    for bits in _chunks(scores):
        low, high = torch.aminmax(bits)
        suspect |= (low < 0) | (high > _INF_BITS)
        digits = (bits >> shift).bitwise_and_(0x3FF)  # sign bit dropped: -0.0 lands with 0.0
        hist[:bins] += torch.bincount(digits, minlength=bins)
    has_neg_zero = bool(suspect)
    if has_neg_zero:
        for bits in _chunks(scores):
            hist[bins] += _invalid(bits).sum()
    total, local = _all_reduce(hist, group)
    if total[bins]:
        raise ValueError(
            "scores must be non-negative and not NaN: "
            f"{int(total[bins])} invalid entries over the group, {int(local[bins])} on this rank"
        )
    numel = int(total[:bins].sum())
    if k > numel:
        raise ValueError(f"k={k} exceeds the number of scores over the group ({numel})")
    prefix, remaining, n_above = _walk(total[:bins], k)

    # Rounds 2 and 3 histogram the entries that match the prefix. Round 2 keeps them when they
    # are few (≤ one chunk), so round 3 need not scan the shard again.
    kept: list[torch.Tensor] | None = []
    n_kept = 0
    local_ties = 0
    for r, (shift, width) in enumerate(_ROUNDS[1:], start=1):
        bins = 1 << width
        hist = torch.zeros(bins, dtype=torch.int64, device=device)
        source = kept if r == 2 and kept is not None else _chunks(scores, clear_sign=has_neg_zero)
        for key in source:
            key = key[(key >> (shift + width)) == prefix]
            if r == 1 and kept is not None:
                n_kept += key.numel()
                kept = kept + [key] if n_kept <= _CHUNK else None
            digits = key >> shift if shift else key
            hist += torch.bincount(digits & (bins - 1), minlength=bins)
        total, local = _all_reduce(hist, group)
        digit, remaining, above = _walk(total, remaining)
        prefix = (prefix << width) | digit
        n_above += above
        local_ties = int(local[digit])  # after the last round: this rank's entries equal to the threshold

    value = torch.tensor([prefix], dtype=torch.int32).view(torch.float32).item()
    comm = 0 if group is None else bytes_exchanged(dist.get_world_size(group))
    return Threshold(value, prefix, n_above, remaining, comm), local_ties, has_neg_zero


def _all_reduce(hist: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed over the group, this rank's own) histogram, both on the CPU."""
    local = hist.to("cpu", copy=True)  # survives the in-place all-reduce
    if group is None:
        return local, local
    dist.all_reduce(hist, op=dist.ReduceOp.SUM, group=group)
    return hist.cpu(), local


def _walk(hist: torch.Tensor, rank: int) -> tuple[int, int, int]:
    """Walk the histogram from its top bin down to the bin holding the `rank`-th largest entry:
    (that bin, the entry's rank within it, entries in higher bins)."""
    at_or_above = hist.flip(0).cumsum(0)  # [j]: entries in the top j + 1 bins
    j = int(torch.searchsorted(at_or_above, rank))
    digit = hist.numel() - 1 - j
    higher = int(at_or_above[j]) - int(hist[digit])
    return digit, rank - higher, higher


def _chunks(scores: ChunkedScores, clear_sign: bool = False):
    """The score chunks as int32 bit patterns (row-major order).

    The patterns are a free view of float32 input (float16/bfloat16 are widened per chunk);
    `clear_sign` maps -0.0 to 0.0, for validated shards that hold it.
    """
    for chunk in scores.chunks():
        if chunk.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"scores must be float32 (or float16/bfloat16), got {chunk.dtype}")
        chunk = chunk.reshape(-1)
        if chunk.dtype != torch.float32:
            chunk = chunk.float()
        bits = chunk.view(torch.int32)
        yield bits & 0x7FFFFFFF if clear_sign else bits


def _invalid(bits: torch.Tensor) -> torch.Tensor:
    """Negative (sign bit set, except -0.0) or NaN (pattern above +inf)."""
    return ((bits < 0) & (bits != _SIGN_BIT)) | (bits > _INF_BITS)


def _check_layout(shards: list[list[int]], global_numel: int | None) -> None:
    """Each rank's (offset, numel) must be a disjoint range; every rank sees the same list."""
    ranges = sorted((off, n) for off, n, _ in shards if n > 0)
    for off, n in ranges:
        if off < 0:
            raise ValueError(f"global_offset must be >= 0, got {off}")
    for (off_a, n_a), (off_b, _) in zip(ranges, ranges[1:]):
        if off_a + n_a > off_b:
            raise ValueError(
                f"shards overlap: [{off_a}, {off_a + n_a}) and one starting at {off_b}; "
                "global_offset must give each rank a disjoint range of global indices"
            )
    if global_numel is not None:
        covered = sum(n for _, n in ranges)
        end = max((off + n for off, n in ranges), default=0)
        if covered != global_numel or end > global_numel:
            raise ValueError(
                f"shards cover {covered} elements ending at {end}, expected exactly global_numel={global_numel}"
            )
