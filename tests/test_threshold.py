"""The sharded top-k threshold against torch.topk and a stable-sort reference, on 1, 2 and 4 ranks."""

from __future__ import annotations

import pytest
import torch

from sparse_lm.sparsity import threshold as threshold_module
from sparse_lm.sparsity.threshold import Threshold, bytes_exchanged, select_topk, select_topk_capped, topk_threshold
from tests.distributed import run_distributed

KINDS = ("uniform", "normal_abs", "ties", "all_equal", "zeros", "denormal", "large")


def make_scores(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, generator=gen)
    if kind == "normal_abs":
        return torch.randn(n, generator=gen).abs()
    if kind == "ties":  # only five distinct values: long runs of exact ties
        return torch.randint(0, 5, (n,), generator=gen).float() * 0.25
    if kind == "all_equal":
        return torch.full((n,), 3.5)
    if kind == "zeros":  # +0.0 and -0.0 mixed: both are zero, so all tie
        return torch.where(torch.rand(n, generator=gen) < 0.5, 0.0, -0.0)
    if kind == "denormal":  # subnormal floats (< 1.18e-38) and a few zeros
        x = torch.rand(n, generator=gen) * 1e-39
        x[::7] = 0.0
        return x
    if kind == "large":  # near float32 max, with some +inf
        x = torch.rand(n, generator=gen) * 3e38
        x[::11] = float("inf")
        return x
    raise ValueError(kind)


def ks_for(n: int) -> list[int]:
    return sorted({k for k in (0, 1, n // 2, n - 1, n) if k >= 0})


def reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, float, int, int]:
    """Top-k mask with ties by lowest index (a stable descending sort), threshold, n_above, ties taken."""
    flat = x.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if k == 0:
        return mask.view(x.shape), float("inf"), 0, 0
    order = torch.sort(flat, descending=True, stable=True).indices
    mask[order[:k]] = True
    value = flat[order[k - 1]].item()
    n_above = int((flat > value).sum())
    return mask.view(x.shape), value, n_above, k - n_above


def check_single(x: torch.Tensor, k: int) -> None:
    ref_mask, ref_value, ref_above, ref_ties = reference(x, k)
    thr = topk_threshold(x, k)
    assert isinstance(thr, Threshold)
    assert (thr.value, thr.n_above, thr.n_ties_taken, thr.k, thr.comm_bytes) == (ref_value, ref_above, ref_ties, k, 0)
    assert torch.tensor([thr.value]).view(torch.int32).item() == thr.bits
    if k:
        assert thr.value == torch.topk(x.reshape(-1).float(), k).values[-1].item()
    mask = select_topk(x, k)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    assert int(mask.sum()) == k
    assert torch.equal(mask, ref_mask)
    flat = x.reshape(-1)
    if k and flat.unique().numel() == flat.numel():  # no ties: exactly torch.topk's set
        topk_mask = torch.zeros(flat.numel(), dtype=torch.bool)
        topk_mask[torch.topk(flat, k).indices] = True
        assert torch.equal(mask.reshape(-1), topk_mask)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4099])
def test_single_process_matches_reference(kind, n):
    x = make_scores(kind, n, seed=n)
    for k in ks_for(n):
        check_single(x, k)


@pytest.mark.parametrize("kind", ["uniform", "ties", "all_equal", "large"])
def test_small_chunks_match(kind, monkeypatch):
    """Chunk boundaries (including a tie run spanning several chunks) change nothing."""
    monkeypatch.setattr(threshold_module, "_CHUNK", 97)
    x = make_scores(kind, 1000, seed=3)
    for k in (1, 333, 500, 999):
        check_single(x, k)


def test_shapes_and_half_precision():
    base = make_scores("ties", 60 * 50, seed=5).view(60, 50)
    for x in (base, base.t(), base[:, ::3]):  # non-contiguous: row-major order of the view
        check_single(x, 777)
    for dtype in (torch.float16, torch.bfloat16):
        x = make_scores("normal_abs", 2000, seed=6).to(dtype)
        thr = topk_threshold(x, 100)
        assert thr.value == torch.topk(x.float(), 100).values[-1].item()
        assert torch.equal(select_topk(x, 100), reference(x.float(), 100)[0])


def test_special_values():
    x = torch.tensor([0.0, float("inf"), 1e-45, -0.0, 3.4e38, float("inf"), 1e-45, 1.0])
    for k in range(x.numel() + 1):
        check_single(x, k)
    thr = topk_threshold(x, 1)
    assert thr.value == float("inf") and thr.n_above == 0 and thr.n_ties_taken == 1
    zero = topk_threshold(x, 8)
    assert zero.value == 0.0 and zero.bits == 0 and zero.n_ties_taken == 2  # -0.0 is a zero like 0.0


def test_k_zero_selects_nothing():
    thr = topk_threshold(torch.tensor([float("inf"), 1.0]), 0)
    assert (thr.value, thr.n_above, thr.n_ties_taken, thr.k, thr.comm_bytes) == (float("inf"), 0, 0, 0, 0)
    assert not select_topk(torch.tensor([float("inf"), 1.0]), 0).any()
    assert not select_topk(torch.empty(0), 0).any()


def test_errors():
    x = torch.rand(10)
    with pytest.raises(ValueError, match="exceeds"):
        topk_threshold(x, 11)
    with pytest.raises(ValueError, match="exceeds"):
        select_topk(torch.empty(0), 1)
    with pytest.raises(ValueError, match="k must be >= 0"):
        topk_threshold(x, -1)
    for bad in (-1.0, -1e-45, float("nan"), -float("inf"), -float("nan")):
        y = x.clone()
        y[4] = bad
        for k in (0, 3):
            with pytest.raises(ValueError, match="non-negative and not NaN"):
                topk_threshold(y, k)
            with pytest.raises(ValueError, match="non-negative and not NaN"):
                select_topk(y, k)
    with pytest.raises(TypeError, match="float32"):
        topk_threshold(torch.arange(10), 3)
    with pytest.raises(TypeError, match="float32"):
        topk_threshold(x.double(), 3)
    with pytest.raises(ValueError, match="global_numel"):
        select_topk(x, 3, global_numel=11)
    with pytest.raises(ValueError, match="global_numel"):
        select_topk(x, 3, global_offset=5, global_numel=15)  # indices 0..4 belong to nobody
    with pytest.raises(ValueError, match="global_offset must be >= 0"):
        select_topk(x, 3, global_offset=-1)
    assert select_topk(x, 3, global_offset=5).sum() == 3
    assert select_topk(x, 3, global_offset=0, global_numel=10).sum() == 3


def test_bytes_exchanged_is_constant():
    assert bytes_exchanged(1) == 0
    assert bytes_exchanged(2) == bytes_exchanged(64) == 8 * (2048 + 1 + 2048 + 1024)
    assert bytes_exchanged(4, tie_break=True) == bytes_exchanged(4) + 24


# ---------------------------------------------------------------------------------------------
# Sharded: real gloo ranks. One spawn per world size runs every case, since spawning costs seconds.

def layout(world: int, n: int, variant: int = 1) -> tuple[list[int], list[int]]:
    """Unequal shard sizes (variant 0: one rank empty), laid out in the global order in a rank
    order that is not 0..world-1, so tie-breaking must follow global_offset rather than rank."""
    if world == 2:
        sizes, order = ([0, n], [1, 0]) if variant == 0 else ([n - n // 3, n // 3], [1, 0])
    else:
        a, b = n // 5, n // 2
        sizes, order = [a, 0, b, n - a - b], [3, 0, 1, 2]
    offsets, start = [0] * world, 0
    for rank in order:
        offsets[rank] = start
        start += sizes[rank]
    return sizes, offsets


def _sharded_body(rank, world, cases, n_big):
    import torch.distributed as dist

    group = dist.group.WORLD
    out = {"cases": [], "errors": {}, "comm": {}}
    for i, (x, k) in enumerate(cases):
        sizes, offsets = layout(world, x.numel(), variant=i % 2)
        shard = x[offsets[rank] : offsets[rank] + sizes[rank]]
        thr = topk_threshold(shard, k, group)
        mask = select_topk(shard, k, group, global_offset=offsets[rank], global_numel=x.numel())
        out["cases"].append((thr, offsets[rank], mask))

    def error(name, fn):
        try:
            fn()
        except ValueError as exc:
            out["errors"][name] = str(exc)

    x = torch.rand(100) + 0.5
    sizes, offsets = layout(world, 100)
    shard = x[offsets[rank] : offsets[rank] + sizes[rank]]
    bad = shard.clone()
    if rank == 0:
        bad[0] = -1.0  # only one rank holds a negative score: every rank must raise
    error("negative", lambda: topk_threshold(bad, 5, group))
    error("k_too_big", lambda: select_topk(shard, 101, group, offsets[rank]))
    error("overlap", lambda: select_topk(shard, 5, group, global_offset=0))
    error("coverage", lambda: select_topk(shard, 5, group, offsets[rank], global_numel=99))
    assert select_topk(shard, 5, group, offsets[rank]).sum() <= 5  # still in step after errors

    for n in (1_000, n_big):
        x = make_scores("uniform", n, seed=1)
        sizes, offsets = layout(world, n)
        thr = topk_threshold(x[offsets[rank] : offsets[rank] + sizes[rank]], n // 10, group)
        out["comm"][n] = thr.comm_bytes
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_matches_single_process(world):
    n = 1000
    cases = [(make_scores(kind, n, seed=11), k) for kind in KINDS for k in ks_for(n)]
    cases.append((make_scores("all_equal", 10), 3))  # shards smaller than the tie run
    results = run_distributed(_sharded_body, world, cases, 1_000_000, timeout=60)

    for i, (x, k) in enumerate(cases):
        thresholds = {results[r]["cases"][i][0] for r in range(world)}
        assert len(thresholds) == 1, f"ranks disagree on the threshold: {thresholds}"
        thr = thresholds.pop()
        single = topk_threshold(x, k)
        assert (thr.value, thr.bits, thr.n_above, thr.n_ties_taken) == (
            single.value,
            single.bits,
            single.n_above,
            single.n_ties_taken,
        )
        assert thr.comm_bytes == (bytes_exchanged(world) if k else 0)
        union = torch.zeros(x.numel(), dtype=torch.bool)
        for r in range(world):
            _, offset, mask = results[r]["cases"][i]
            union[offset : offset + mask.numel()] = mask
        assert int(union.sum()) == k
        assert torch.equal(union, select_topk(x, k))
        assert torch.equal(union, reference(x, k)[0])

    for r in range(world):
        errors = results[r]["errors"]
        assert set(errors) == {"negative", "k_too_big", "overlap", "coverage"}, errors
        assert "non-negative and not NaN" in errors["negative"]
        comm = results[r]["comm"]
        assert comm[1_000] == comm[1_000_000] == bytes_exchanged(world) > 0


def _raise_on_negative(rank, world):
    x = torch.rand(10)
    if rank == 1:
        x[3] = -2.0
    return topk_threshold(x, 4, torch.distributed.group.WORLD)


def test_rank_error_reaches_the_parent():
    """A rank's exception is re-raised in the parent, with its traceback; no rank hangs."""
    with pytest.raises(ValueError, match="non-negative and not NaN") as info:
        run_distributed(_raise_on_negative, 2, timeout=60)
    assert "topk_threshold" in str(info.value.__cause__)


def _capped_body(rank, world, x, k, capacity):
    shard = x.view(world, -1)[rank]
    positions, capped = select_topk_capped(shard, k, capacity, torch.distributed.group.WORLD,
                                           global_offset=rank * shard.numel(), global_numel=x.numel())
    return positions + rank * shard.numel(), capped


@pytest.mark.parametrize("world", [2, 4])
def test_capped_select_is_exact_until_a_shard_is_full(world):
    """A tensor-parallel shard has a fixed number of slots: within it the selection is the exact
    top-k; a shard whose exact share exceeds it keeps its own top-`capacity` and the rest of the
    budget goes to the best remaining entries elsewhere, still exactly k in total."""
    n, k = 4000, 600
    x = make_scores("uniform", n, seed=5)
    roomy = run_distributed(_capped_body, world, x, k, k, timeout=60)
    assert all(capped == 0 for _, capped in roomy)
    assert torch.equal(torch.sort(torch.cat([p for p, _ in roomy])).values, torch.nonzero(reference(x, k)[0]).view(-1))

    skewed = x.clone()
    skewed[: n // world] += 10.0  # rank 0's entries are all larger than everyone else's
    capacity = k // world + 20
    results = run_distributed(_capped_body, world, skewed, k, capacity, timeout=60)
    chosen = [p for p, _ in results]
    assert {capped for _, capped in results} == {1}
    assert sum(len(p) for p in chosen) == k and all(len(p) <= capacity for p in chosen)
    shard0 = skewed[: n // world]
    assert torch.equal(chosen[0], torch.topk(shard0, capacity).indices.sort().values)  # its own top
    rest = skewed.clone()
    rest[: n // world] = -1.0  # the remaining budget: the exact top over the other ranks
    expected_rest = torch.topk(rest, k - capacity).indices.sort().values
    assert torch.equal(torch.cat(chosen[1:]).sort().values, expected_rest)
