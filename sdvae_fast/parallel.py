"""Exact patch parallelism over `torch.distributed`: each rank encodes or decodes one band of rows
(docs/patch_parallel.md).

Every rank calls with the same full input (as pipelines do); the image is split by rows of the smallest feature
map (the latents for decode, the deepest encoder map for encode), each rank runs the fast path's units (`sdvae_fast.fast.units`) on its band, and
`RowParallelHooks` make the result equal to one process's:
- before every spatial conv, the halo rows its taps need come from the neighbouring bands (`conv_input`): one row
  each side at stride 1; for a stride-2 conv with bottom/right padding only, one row from below;
- before the 4-phase upsample conv, one low-resolution row each side (`upsample_input`), and the output rows that
  came from the halo are cropped;
- every GroupNorm uses the whole image's statistics: each rank's per-(sample, group) (count, mean, M2) partials
  are all-gathered and merged with Chan's formula in rank order (`merge_stats`): the same bits on every rank;
- the mid-block attention sees all tokens: the band is all-gathered to the full map, attention runs on it and each
  rank keeps its own rows (`attention_input`; simple and exact, but it holds the whole latent-resolution map).
All exchanges are collectives of `torch.distributed` (all_gather with bands padded to the largest, then trimmed;
gloo on CPU, NCCL on GPUs); no reduction uses atomics, so repeated runs give the same bits.

The process group comes from `torch.distributed` (e.g. started by `torchrun`, or `init_process_group("gloo")`).
Which kernels run is the ops' decision (`sdvae_fast.ops`): the Triton kernels on CUDA (or the interpreter), the
PyTorch references elsewhere. Inference only (no autograd); fp16 is refused for now (its overflow recompute is
decided per rank, so ranks could diverge), fp32 and bf16 run.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from sdvae_fast import ops
from sdvae_fast.fast.units import ParallelHooks, RunContext, Stats

Tensor = torch.Tensor


def row_bands(rows: int, world_size: int) -> List[Tuple[int, int]]:
    """[start, end) rows of each rank's band of a map with `rows` rows: sizes differ by at most one, the larger
    bands first (rank order = image order).

    Raises:
        ValueError: world_size < 1, or world_size larger than `rows` (every band needs at least one row; the
            message names both numbers).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size > rows:
        raise ValueError(f"world size {world_size} is larger than the {rows} rows of the smallest feature map (the "
                         f"latents); use at most {rows} ranks, or a taller image")
    base, extra = divmod(rows, world_size)
    bands, start = [], 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        bands.append((start, end))
        start = end
    return bands


def _all_gather(t: Tensor, group) -> List[Tensor]:
    """Every rank's `t` (same shape on all ranks), in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _band_heights(band: Tensor, group) -> List[int]:
    """Every rank's band height, in rank order (one small all_gather)."""
    return [int(h) for h in _all_gather(torch.tensor([band.shape[2]], device=band.device), group)]


def gather_rows(band: Tensor, group=None, heights: Optional[List[int]] = None) -> Tensor:
    """The full map from every rank's band of rows: (N, C, rows_r, W) on rank r -> (N, C, sum rows_r, W) on all.

    Bands may differ in height: each is padded to the tallest, all-gathered, trimmed and concatenated in rank
    order. `heights`: every rank's band height when already known (else gathered here). Collective: every
    rank of `group` must call it.
    """
    heights = heights if heights is not None else _band_heights(band, group)
    padded = band.new_zeros(band.shape[0], band.shape[1], max(heights), band.shape[3])
    padded[:, :, : band.shape[2]] = band
    parts = _all_gather(padded, group)
    return torch.cat([p[:, :, :h] for p, h in zip(parts, heights)], dim=2)


class RowParallelHooks(ParallelHooks):
    """`ParallelHooks` for a process group whose ranks hold consecutive bands of rows (rank 0 the top band).

    Every method is a collective: all ranks of the group call it in the same order (the units do).
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _halo(self, x: Tensor, top: int, bottom: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(the `top` rows above this band, the `bottom` rows below it) from the neighbouring ranks; None at the
        image border. Needs every band at least max(top, bottom) rows tall (the band rule guarantees it)."""
        k = max(top, bottom, 1)
        if x.shape[2] < k:
            raise RuntimeError(f"rank {self.rank}: a band of {x.shape[2]} rows is thinner than the halo of {k} rows")
        edges = _all_gather(torch.cat([x[:, :, :k], x[:, :, -k:]], dim=2), self.group)  # (N, C, 2k, W) each
        above = edges[self.rank - 1][:, :, 2 * k - top:] if self.rank > 0 and top else None
        below = edges[self.rank + 1][:, :, :bottom] if self.rank < self.world_size - 1 and bottom else None
        return above, below

    def _extend(self, x: Tensor, top: int, bottom: int) -> Tuple[Tensor, int, int]:
        """x with the neighbours' halo rows concatenated; returns (x_ext, rows added on top, rows added below)."""
        above, below = self._halo(x, top, bottom)
        parts = [p for p in (above, x, below) if p is not None]
        x_ext = torch.cat(parts, dim=2) if len(parts) > 1 else x
        return x_ext, (0 if above is None else above.shape[2]), (0 if below is None else below.shape[2])

    def conv_input(self, x: Tensor, padding: List[int], kernel_size: int, stride: int) -> Tuple[Tensor, List[int]]:
        """This band with the rows its conv taps need from the neighbours, and the padding left to apply.

        With (left, right, top, bottom) padding, an output band starting at input row s reads from row s - top,
        and its last row reads `kernel_size - stride - top` rows past the band's end: those come from the
        neighbours (3x3 stride 1 pad 1: one row each side; diffusers' stride-2 downsample, padding (0, 1, 0, 1):
        one row from below), and their zero padding is dropped. The image's own top and bottom keep theirs.
        """
        left, right, top, bottom = padding
        need_below = max(kernel_size - stride - top, 0)
        x_ext, added_top, added_below = self._extend(x, top, need_below)
        return x_ext, [left, right, top if added_top == 0 else 0, bottom if added_below == 0 else 0]

    def upsample_input(self, x: Tensor) -> Tuple[Tensor, int, int]:
        """Before the nearest-2x + 3x3 conv: x with one low-resolution row from each neighbour, and the number of
        low-resolution rows added (top, bottom); crop 2*top output rows above and 2*bottom below."""
        return self._extend(x, 1, 1)

    def attention_input(self, x: Tensor) -> Tuple[Tensor, int, int]:
        """Before attention over all tokens: the full map (all bands gathered) and this band's [start, end) rows
        in it."""
        heights = _band_heights(x, self.group)
        full = gather_rows(x, self.group, heights)
        start = sum(heights[: self.rank])
        return full, start, start + x.shape[2]

    def merge_stats(self, partials: Tuple[Tensor, Tensor, Tensor], eps: float) -> Stats:
        """GroupNorm (mean, rstd) of the whole image: every rank's (count, mean, M2) all-gathered and merged with
        Chan's formula in rank order (the same bits on every rank)."""
        gathered = [_all_gather(t, self.group) for t in partials]  # 3 lists of world_size (N, G) tensors
        return ops.merge_group_norm_partials(list(zip(*gathered)), eps)


def _local_problem(vae, z: Tensor, world: int, what: str) -> Optional[str]:
    """What this rank finds wrong before any collective (None when nothing): the message every rank will raise."""
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or not z.is_floating_point():
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        return f"the input must be a 4-D float tensor (N, C, H, W), got {got}"
    if z.dtype == torch.float16:
        return (f"{what} does not support float16 yet (the fp16 overflow recompute is decided per rank); use "
                f"bfloat16 or float32")
    weight = next(vae.parameters())
    if weight.dtype != z.dtype or weight.device != z.device:
        return (f"the input is {z.dtype} on {z.device} but the VAE's parameters are {weight.dtype} on "
                f"{weight.device}")
    return None


def _agree(vae, z: Tensor, group, what: str) -> None:
    """One collective before any other: every rank's own validation result and a checksum of its input (shape,
    sum and sum of squares in fp64) are all-gathered, and if any rank found a problem or the inputs differ,
    every rank raises the same ValueError (naming the ranks), so no rank is left waiting in a collective."""
    problem = _local_problem(vae, z, dist.get_world_size(group), what)
    checksum = None
    if problem is None:
        z64 = z.detach().to(torch.float64)
        checksum = (tuple(z.shape), z64.sum().item(), z64.square().sum().item())
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (problem, checksum), group=group)
    problems = [f"rank {r}: {p}" for r, (p, _) in enumerate(everyone) if p is not None]
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
    if any(c != everyone[0][1] for _, c in everyone):
        shapes = [c[0] for _, c in everyone]
        raise ValueError(f"{what}: every rank must pass the same input, got shapes/checksums that differ across "
                         f"ranks (shapes by rank: {shapes})")


def _check_group(vae, z: Tensor, group, what: str) -> Tuple[int, int]:
    """(world size, rank) after the checks every patch-parallel call makes before its first collective."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs an initialised torch.distributed process group (start the script with "
                           f"torchrun, or call torch.distributed.init_process_group first)")
    _agree(vae, z, group, what)
    return dist.get_world_size(group), dist.get_rank(group)


def _run_band(stages, band: Tensor, group) -> Tensor:
    from sdvae_fast import fast

    ctx = RunContext(parallel=RowParallelHooks(group))
    with torch.no_grad():
        return fast.run_stages(stages, band.contiguous(), ctx).contiguous()


def decode_patch_parallel(vae, z: Tensor, group=None, *, gather: bool = True):
    """`vae.decode(z).sample` split by rows over the ranks of `group`, exactly (module docstring).

    Args:
        vae: a VAE with diffusers' AutoencoderKL structure (ours or a live diffusers one).
        z: the same unscaled latents (N, latent_channels, h, w) on every rank, the VAE's dtype (fp32/bf16) and
            device (CPU for gloo, this rank's GPU for NCCL).
        group: a `torch.distributed` process group (default: the world).
        gather: return the full images on every rank (True), or only this rank's band.
    Returns:
        images (N, out_channels, f*h, f*w) with f the VAE's downsample factor, or with `gather=False` a tuple
        (band (N, out_channels, f*(end - start), f*w), first image row of the band).
    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError (the same on every rank, before any other collective): ranks hold different inputs; a rank's
            input is not a float 4-D tensor in the VAE's dtype and device; fp16 (not yet supported); more ranks
            than latent rows.
    """
    from sdvae_fast import fast

    world, rank = _check_group(vae, z, group, "patch parallel decode")
    start, end = row_bands(z.shape[2], world)[rank]
    stages = fast.decoder_units(vae.decoder, getattr(vae, "post_quant_conv", None))
    band = _run_band(stages, z[:, :, start:end], group)
    factor = band.shape[2] // (end - start)
    return gather_rows(band, group) if gather else (band, start * factor)


def encode_patch_parallel(vae, x: Tensor, group=None, *, gather: bool = True):
    """`quant_conv(encoder(x))` (the posterior's moments) split by rows over the ranks of `group`, exactly.

    The bands are rows of the deepest encoder map (diffusers' size arithmetic: each stride-2 downsample with
    (0, 1, 0, 1) padding halves the rows rounding down, 468 -> 234 -> 117 -> 58); rank r encodes the image rows
    [start * F, end * F) with F = 2 ** (levels - 1), the last rank also the remainder rows at the bottom.

    Args:
        vae: a VAE with diffusers' AutoencoderKL structure.
        x: the same images (N, in_channels, H, W) on every rank, the VAE's dtype (fp32/bf16) and device.
        group, gather: as for `decode_patch_parallel`.
    Returns:
        moments (N, 2*latent_channels, h, w), or with `gather=False` (this rank's band of them, its first row).
    Raises:
        As `decode_patch_parallel` (the row count checked is the deepest map's).
    """
    from sdvae_fast import fast

    world, rank = _check_group(vae, x, group, "patch parallel encode")
    levels = len(vae.encoder.down_blocks)
    factor = 2 ** (levels - 1)
    start, end = row_bands(x.shape[2] // factor, world)[rank]
    stop = x.shape[2] if rank == world - 1 else end * factor
    stages = fast.encoder_units(vae.encoder, getattr(vae, "quant_conv", None))
    band = _run_band(stages, x[:, :, start * factor:stop], group)
    return gather_rows(band, group) if gather else (band, start)


def enable_patch_parallel(vae_or_pipe, group=None, *, gather: bool = True):
    """Turn on patch parallelism for sdvae_fast's AutoencoderKL, or a pipeline holding one as `.vae`; returns the
    argument. See `AutoencoderKL.enable_patch_parallel`.

    Raises:
        TypeError: a diffusers AutoencoderKL that is not ours (not yet supported: load it as
            `sdvae_fast.AutoencoderKL.from_pretrained(...)`, or build ours with `from_config(vae.config)` and
            `load_state_dict(vae.state_dict())`), or an object without a VAE.
        RuntimeError: torch.distributed is not initialised.
    """
    from sdvae_fast.patching import _find_vae

    vae = _find_vae(vae_or_pipe)
    if not callable(getattr(vae, "enable_patch_parallel", None)):
        raise TypeError(f"enable_patch_parallel: {type(vae).__name__} is not sdvae_fast's AutoencoderKL; patch "
                        f"parallelism on a live diffusers VAE is not supported yet: load it as "
                        f"sdvae_fast.AutoencoderKL.from_pretrained(...) (or from_config + load_state_dict)")
    vae.enable_patch_parallel(group, gather=gather)
    return vae_or_pipe


def disable_patch_parallel(vae_or_pipe):
    """Undo `enable_patch_parallel` (a no-op when it is off); returns the argument."""
    from sdvae_fast.patching import _find_vae

    vae = _find_vae(vae_or_pipe)
    if callable(getattr(vae, "disable_patch_parallel", None)):
        vae.disable_patch_parallel()
    return vae_or_pipe


__all__: Sequence[str] = ("row_bands", "gather_rows", "RowParallelHooks", "decode_patch_parallel",
                          "encode_patch_parallel", "enable_patch_parallel", "disable_patch_parallel")
