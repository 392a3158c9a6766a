"""GroupNorm statistics in Triton: per-(sample, group) mean and rstd over the whole C/G*H*W, deterministically.

Math. For sample n and group g the statistics run over every element x[n, c, h, w] with c in the group's
C/G channels: `mean = sum(x) / count`, `var = sum((x - mean)^2) / count` (biased, as `torch.nn.GroupNorm`), and
`rstd = 1 / sqrt(var + eps)`, all in fp32.

Parallel split. At batch 1 the VAE has only 32 groups, far fewer than a GPU has SMs, so each (sample, group)
reduction is split over `num_splits` programs along the pixels (H*W). Each program walks its pixel range in
tiles of [BLOCK_P pixels, BLOCK_C channels]; for every tile it takes the tile's own mean and centred M2 (sum of
squared deviations from that mean) and merges them into its running (count, mean, M2) with Chan et al.'s
pairwise update (`kernels._jit.chan_merge`; Chan, Golub, LeVeque, "Updating formulae and a pairwise algorithm for
computing sample variances", 1979):

    delta = mean_b - mean_a;  count = count_a + count_b
    mean = mean_a + delta * count_b / count;  M2 = M2_a + M2_b + delta^2 * count_a * count_b / count

A second small kernel merges the `num_splits` partial triples of each (sample, group) in one fixed-shape
reduction, a fixed pairwise tree of the same update (`kernels._jit.chan_reduce`). There are
no atomics and the reduction order is fixed, so two runs give the same bits. `group_norm_partials` returns the
merged (count, mean, M2) themselves, and `merge_group_norm_partials` merges such triples of disjoint parts of
the groups (image bands on several ranks) in list order.

Stability when |mean| >> std: every program first subtracts a shift K shared by the whole (sample, group), the
group's first element x[n, g*C/G, 0, 0], so all sums, partial means and deviations are of `x - K`, which is of
the order of the spread, not of the mean (the "shifted data" algorithm). The final mean is `K + mean(x - K)`,
rounded once. With a mean of 1e4 and a std of 1 the fp32 rstd stays within about 1e-6 of the float64 value,
where fp32 partial means stored without the shift would carry errors of about ulp(1e4) = 1e-3 each.

Determinism across batch sizes: `num_splits` and the tile shape are chosen from (C, G, H, W) only, never from
the batch, and no reduction crosses samples, so an image gives bitwise the same statistics alone or in a batch.

Layouts: x is (N, C, H, W) with any strides (NCHW, channels_last, sliced views), fp16/bf16/fp32; every offset is
computed in int64 (a 4096^2 decode has 2^31-element activations). Each tile covers only the channels of one
group (BLOCK_C = next power of two >= C/G, masked), so no lane touches the next group; any C/G >= 1 works.
fp64 is not handled here (`sdvae_fast.ops.group_norm_stats` uses the PyTorch reference for it).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from sdvae_fast.kernels._common import check_image_input, require_kernels
from sdvae_fast.kernels._jit import chan_merge, chan_reduce


# Elements of a tile ([BLOCK_P, BLOCK_C]) and elements one program should reduce on the GPU.
_TILE_ELEMENTS = 4096
_ELEMENTS_PER_PROGRAM = 32768
# Upper bound on the splits of one (sample, group); the combine kernel loads them in one block.
_MAX_SPLITS = 1024


@triton.jit
def _gn_partial_kernel(
    x_ptr, part_ptr,
    HW, W, G, CPG, pixels_per_split, num_splits,
    sxn, sxc, sxh, sxw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: (count, mean, M2) of one pixel range of one (sample, group); grid (N*G, num_splits)."""
    pid_ng = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n = pid_ng // G
    g = pid_ng % G

    # The group's channels only: lanes >= CPG are masked, so no lane reaches the next group.
    c_lane = tl.arange(0, BLOCK_C)
    c_mask = c_lane < CPG
    c_off = (g * CPG + c_lane.to(tl.int64)) * sxc  # (BLOCK_C,) int64

    p_start = split * pixels_per_split
    p_end = tl.minimum(p_start + pixels_per_split, HW)
    num_tiles = tl.cdiv(p_end - p_start, BLOCK_P)

    base = x_ptr + n * sxn
    # The shift K shared by every split of this (sample, group): its first element. Means below are of x - K.
    shift = tl.load(base + g * CPG * sxc).to(tl.float32)
    count = tl.zeros((), dtype=tl.float32)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    for t in range(0, num_tiles):
        p = p_start + t * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # (BLOCK_P,) pixel index h*W + w
        p_mask = p < p_end
        h = p // W
        w = p % W
        offs = (h * sxh + w * sxw)[:, None] + c_off[None, :]  # (BLOCK_P, BLOCK_C)
        mask = p_mask[:, None] & c_mask[None, :]
        v = tl.where(mask, tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        # This tile's count, mean and centred M2 (every tile of the loop holds at least one pixel).
        n_pix = tl.minimum(p_end - (p_start + t * BLOCK_P), BLOCK_P)
        count_b = (n_pix * CPG).to(tl.float32)
        mean_b = tl.sum(tl.sum(v, axis=1), axis=0) / count_b
        d = tl.where(mask, v - mean_b, 0.0)
        m2_b = tl.sum(tl.sum(d * d, axis=1), axis=0)
        # Chan's pairwise merge of (count, mean, M2) with this tile's triple.
        count, mean, m2 = chan_merge(count, mean, m2, count_b, mean_b, m2_b)

    out = part_ptr + (pid_ng * num_splits + split) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _store_stats(pid, count, mean, m2, eps, mean_ptr, rstd_ptr, count_out_ptr, mean_out_ptr, m2_out_ptr,
                 STORE_PARTIALS: tl.constexpr):
    """Store one (sample, group)'s merged statistics at index pid: mean and rstd = 1 / sqrt(M2 / count + eps), and
    with STORE_PARTIALS the raw (count, mean, M2) too. Each argument tensor is (1,) fp32."""
    out = pid + tl.arange(0, 1)  # (1,): this program's (sample, group)
    tl.store(mean_ptr + out, mean)
    tl.store(rstd_ptr + out, 1.0 / tl.sqrt(m2 / count + eps))
    if STORE_PARTIALS:
        tl.store(count_out_ptr + out, count)
        tl.store(mean_out_ptr + out, mean)
        tl.store(m2_out_ptr + out, m2)


@triton.jit
def _gn_combine_kernel(
    x_ptr, part_ptr, mean_ptr, rstd_ptr, count_out_ptr, mean_out_ptr, m2_out_ptr,
    G, CPG, sxn, sxc, num_splits, eps, BLOCK_S: tl.constexpr, STORE_PARTIALS: tl.constexpr,
):
    """One program per (sample, group): merge its partial triples in one fixed-order reduction; grid (N*G,).

    The partial means are of x - K (K the group's first element, as in `_gn_partial_kernel`). STORE_PARTIALS:
    also store the merged (count, mean of x, M2), each (N*G,) fp32, to count_out/mean_out/m2_out.
    """
    pid = tl.program_id(0).to(tl.int64)
    shift = tl.load(x_ptr + (pid // G) * sxn + (pid % G) * CPG * sxc).to(tl.float32)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    base = part_ptr + pid * num_splits * 3 + s.to(tl.int64) * 3
    cnt = tl.load(base, mask=s_mask, other=0.0)
    mu = tl.load(base + 1, mask=s_mask, other=0.0)
    m2 = tl.load(base + 2, mask=s_mask, other=0.0)
    total, mean, m2_total = chan_reduce(cnt[None, :], mu[None, :], m2[None, :])  # each (1,)
    mean = shift + mean
    _store_stats(pid, total, mean, m2_total, eps, mean_ptr, rstd_ptr, count_out_ptr, mean_out_ptr, m2_out_ptr,
                 STORE_PARTIALS)


@triton.jit
def _gn_merge_partials_kernel(
    part_ptr, tiles_ptr, mean_ptr, rstd_ptr, count_out_ptr, mean_out_ptr, m2_out_ptr, RUNS_PER_GROUP, eps,
    BLOCK_S: tl.constexpr, STORE_PARTIALS: tl.constexpr,
):
    """One program per (sample, group): merge the (count, mean, M2) triples a conv epilogue wrote; grid (N*G,).

    part_ptr: (N, G*RUNS_PER_GROUP, T, 3) fp32 (the conv kernel's EMIT_STATS layout), so the triples of one
    (sample, group) are RUNS_PER_GROUP*T consecutive entries; T is read from tiles_ptr (int32), where the conv
    wrote it. Chunks of BLOCK_S entries are each reduced with `chan_reduce` (a pairwise tree) and merged in
    order with `chan_merge`. STORE_PARTIALS: also store the merged (count, mean, M2), each (N*G,) fp32.
    """
    pid = tl.program_id(0).to(tl.int64)
    length = RUNS_PER_GROUP * tl.load(tiles_ptr).to(tl.int64)
    base = part_ptr + pid * length * 3
    count = tl.zeros((1,), dtype=tl.float32)
    mean = tl.zeros((1,), dtype=tl.float32)
    m2 = tl.zeros((1,), dtype=tl.float32)
    for s0 in range(0, length, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        s_mask = s < length
        cnt = tl.load(base + s * 3, mask=s_mask, other=0.0)[None, :]  # (1, BLOCK_S)
        mu = tl.load(base + s * 3 + 1, mask=s_mask, other=0.0)[None, :]
        m2_s = tl.load(base + s * 3 + 2, mask=s_mask, other=0.0)[None, :]
        count_b, mean_b, m2_b = chan_reduce(cnt, mu, m2_s)  # each (1,)
        count, mean, m2 = chan_merge(count, mean, m2, count_b, mean_b, m2_b)
    _store_stats(pid, count, mean, m2, eps, mean_ptr, rstd_ptr, count_out_ptr, mean_out_ptr, m2_out_ptr,
                 STORE_PARTIALS)


class GroupNormPartials(NamedTuple):
    """Raw GroupNorm statistics of each (sample, group), before the variance becomes an rstd.

    count: elements reduced (C/G * H * W, or a band's share of it); mean: their mean; m2: the sum of squared
    deviations from that mean (biased variance = m2 / count). Each (N, G) float32. Partials of disjoint parts of
    the same groups (image bands on several ranks) merge with `merge_group_norm_partials`.
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def _stats_outputs(batch: int, num_groups: int, device, with_partials: bool) -> list[torch.Tensor]:
    """[mean, rstd] or [mean, rstd, count, mean, m2] of the statistics kernels, each (N, G) float32."""
    return [torch.empty((batch, num_groups), device=device, dtype=torch.float32)
            for _ in range(5 if with_partials else 2)]


def merge_partial_stats(
    partials: torch.Tensor, tiles: torch.Tensor, batch: int, num_groups: int, runs_per_group: int, eps: float,
    *, return_partials: bool = False,
):
    """(mean, rstd) of each (sample, group) from the partial triples a conv epilogue wrote (`EMIT_STATS`).

    Args:
        partials: flat fp32 buffer holding (N, num_groups*runs_per_group, T, 3) triples (count, mean, M2); its
            size is the launcher's bound on T (from the shapes only), which sets the merge's chunk size.
        tiles: int32 (1,) tensor holding T, written by the conv on the device (no host sync).
        batch: N. num_groups: G. runs_per_group: channel runs per group (C/G / the conv's STATS_GS).
        eps: added to the biased variance before the reciprocal square root.
        return_partials: also return the merged raw statistics.
    Returns:
        (mean, rstd), each (N, G) float32 contiguous; with `return_partials` the triple (mean, rstd,
        `GroupNormPartials`).
    """
    outs = _stats_outputs(batch, num_groups, partials.device, return_partials)
    # Entries per (sample, group) the buffer can hold; a chunk covers all of them up to 1024.
    max_length = partials.numel() // (3 * batch * num_groups)
    _gn_merge_partials_kernel[(batch * num_groups,)](
        partials, tiles, *outs[:2], *(outs[2:] if return_partials else outs[:1] * 3), runs_per_group, float(eps),
        BLOCK_S=min(1024, triton.next_power_of_2(max_length)), STORE_PARTIALS=return_partials,
    )
    if return_partials:
        return outs[0], outs[1], GroupNormPartials(*outs[2:])
    return outs[0], outs[1]


def merge_group_norm_partials(
    partials: Sequence[GroupNormPartials], eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) of each (sample, group) from partial statistics of disjoint parts of the groups.

    The partials are merged left to right, `((p0 + p1) + p2) + ...`, each step Chan, Golub and LeVeque's
    pairwise update (1979; the formula of `kernels._jit.chan_merge`) in fp32 torch arithmetic: a fixed order
    and no atomics, so the result depends only on the list, bitwise. Callers that merge image bands across
    ranks pass them in band order on every rank, so every rank gets the same bits. A single partial gives its
    own mean and `rstd = 1 / sqrt(m2 / count + eps)`.

    Args:
        partials: a non-empty sequence of `GroupNormPartials` (or (count, mean, m2) triples), each tensor
            (N, G), all float32 (the kernels' partials) or all float64 (the fp64 reference's), on one device.
        eps: added to the biased variance before the reciprocal square root.
    Returns:
        (mean, rstd), each (N, G) in the partials' dtype.
    Raises:
        ValueError: an empty sequence, or tensors of differing shapes or not 2-D.
        TypeError: non-tensors, dtypes other than float32/float64, mixed dtypes, or differing devices.
    """
    partials = [GroupNormPartials(*p) for p in partials]
    if not partials:
        raise ValueError("partials must hold at least one (count, mean, m2) triple")
    first = partials[0].count
    if not isinstance(first, torch.Tensor) or first.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"partials[0].count must be a float32 or float64 tensor, got {getattr(first, 'dtype', first)}")
    for i, part in enumerate(partials):
        for name, t in zip(GroupNormPartials._fields, part):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"partials[{i}].{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != first.dtype or t.device != first.device:
                raise TypeError(f"partials[{i}].{name} must be {first.dtype} on {first.device} like "
                                f"partials[0].count, got {t.dtype} on {t.device}")
            if t.dim() != 2 or t.shape != first.shape:
                raise ValueError(f"partials[{i}].{name} must be (N, G) {tuple(first.shape)}, got {tuple(t.shape)}")
    count, mean, m2 = partials[0]
    for part in partials[1:]:
        total = count + part.count
        safe = total.clamp(min=1.0)
        delta = part.mean - mean
        mean = mean + delta * (part.count / safe)
        m2 = m2 + part.m2 + delta * delta * (count * part.count / safe)
        count = total
    # sqrt through fp64 and one rounding: the correctly rounded fp32 sqrt (torch's fp32 CPU sqrt is not always).
    return mean.clone(), 1.0 / torch.sqrt((m2 / count + eps).double()).to(mean.dtype)


def _tile_shape(channels_per_group: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): BLOCK_C covers one group's channels, BLOCK_P*BLOCK_C about _TILE_ELEMENTS."""
    block_c = triton.next_power_of_2(channels_per_group)
    block_p = max(1, _TILE_ELEMENTS // block_c)
    return block_p, block_c


def choose_num_splits(num_channels: int, num_groups: int, height: int, width: int) -> int:
    """Programs per (sample, group): about one per _ELEMENTS_PER_PROGRAM elements, at most _MAX_SPLITS.

    A function of the per-sample sizes only (never the batch), so the statistics of an image do not depend
    on what it is batched with. The result is trimmed so that every split holds at least one pixel.
    """
    hw = height * width
    group_elements = (num_channels // num_groups) * hw
    splits = max(1, min(_MAX_SPLITS, hw, triton.cdiv(group_elements, _ELEMENTS_PER_PROGRAM)))
    pixels = triton.cdiv(hw, splits)
    return triton.cdiv(hw, pixels)


def _run_stats(x: torch.Tensor, num_groups: int, eps: float, num_splits: Optional[int], what: str,
               with_partials: bool) -> list[torch.Tensor]:
    """Validate, launch the partial and combine kernels, and return [mean, rstd] (+ [count, mean, m2])."""
    check_image_input(x)
    n, c, h, w = x.shape
    if num_groups <= 0 or c % num_groups != 0:
        raise ValueError(f"num_channels ({c}) must be divisible by num_groups ({num_groups})")
    require_kernels(x.device, what)

    hw = h * w
    if num_splits is None:
        num_splits = choose_num_splits(c, num_groups, h, w)
    if not 1 <= num_splits <= min(hw, _MAX_SPLITS):
        raise ValueError(f"num_splits must be in [1, {min(hw, _MAX_SPLITS)}], got {num_splits}")
    pixels_per_split = triton.cdiv(hw, num_splits)
    num_splits = triton.cdiv(hw, pixels_per_split)  # every split non-empty
    channels_per_group = c // num_groups
    block_p, block_c = _tile_shape(channels_per_group)

    partials = torch.empty((n * num_groups, num_splits, 3), device=x.device, dtype=torch.float32)
    outs = _stats_outputs(n, num_groups, x.device, with_partials)
    _gn_partial_kernel[(n * num_groups, num_splits)](
        x, partials,
        hw, w, num_groups, channels_per_group, pixels_per_split, num_splits,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        BLOCK_P=block_p, BLOCK_C=block_c,
    )
    _gn_combine_kernel[(n * num_groups,)](
        x, partials, *outs[:2], *(outs[2:] if with_partials else outs[:1] * 3),
        num_groups, channels_per_group, x.stride(0), x.stride(1), num_splits, float(eps),
        BLOCK_S=triton.next_power_of_2(num_splits), STORE_PARTIALS=with_partials,
    )
    return outs


def group_norm_stats(
    x: torch.Tensor, num_groups: int, eps: float = 1e-6, *, num_splits: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the statistics kernels: (mean, rstd) of each (sample, group) of x, as `torch.nn.GroupNorm` does.

    Args:
        x: (N, C, H, W) fp16, bf16 or fp32, any strides; CUDA, or CPU under TRITON_INTERPRET=1.
        num_groups: G, dividing C.
        eps: added to the biased variance before the reciprocal square root.
        num_splits: programs per (sample, group), 1..min(H*W, 1024); default `choose_num_splits(C, G, H, W)`.
            Tests set it to exercise the split-and-merge path on small inputs.
    Returns:
        (mean, rstd), each (N, G) float32 contiguous.
    Raises:
        TypeError: x not a tensor or of an unsupported dtype.
        ValueError: x not 4-D, C not divisible by num_groups (naming both), empty x, bad num_splits.
        RuntimeError: the kernels cannot run on x's device.
    """
    mean, rstd = _run_stats(x, num_groups, eps, num_splits, "group_norm_stats", with_partials=False)
    return mean, rstd


def group_norm_partials(
    x: torch.Tensor, num_groups: int, *, num_splits: Optional[int] = None
) -> GroupNormPartials:
    """The raw statistics of `group_norm_stats`' kernels: (count, mean, M2) of each (sample, group) of x.

    The same kernels and merge order as `group_norm_stats`, so `merge_group_norm_partials([p], eps)` of the
    result gives its mean bitwise and its rstd bitwise under the interpreter (IEEE fp32 division and square
    root on both sides; on a GPU, where the kernel's sqrt and division may round differently, within a few
    ulp). Partials of several bands of an image merge with `merge_group_norm_partials`.

    Args:
        x: (N, C, H, W) fp16, bf16 or fp32, any strides; CUDA, or CPU under TRITON_INTERPRET=1.
        num_groups: G, dividing C.
        num_splits: as in `group_norm_stats`.
    Returns:
        `GroupNormPartials` (count, mean, m2), each (N, G) float32 contiguous; count = C/G * H * W.
    Raises:
        As `group_norm_stats`.
    """
    _, _, count, mean, m2 = _run_stats(x, num_groups, 0.0, num_splits, "group_norm_partials", with_partials=True)
    return GroupNormPartials(count, mean, m2)
