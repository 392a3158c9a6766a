"""Exact patch parallelism over `torch.distributed`: each rank encodes or decodes one band of rows
(docs/patch_parallel.md).

Every rank calls with the same full input (as pipelines do); the image is split by rows of the smallest feature
map (the latents for decode, the deepest encoder map for encode), each rank runs the fast path's units
(`sdvae_fast.fast.units`) on its band, and `RowParallelHooks` make the result equal to one process's:
- before every spatial conv, the halo rows its taps need come from the neighbouring bands (`conv_input`): one row
  each side at stride 1; for a stride-2 conv with bottom/right padding only, one row from below;
- before the 4-phase upsample conv, one low-resolution row each side (`upsample_input`), and the output rows that
  came from the halo are cropped;
- every GroupNorm uses the whole image's statistics: each rank's per-(sample, group) (count, mean, M2) partials,
  emitted by the conv that wrote the band (or computed from it), are all-gathered and merged with Chan's formula
  in rank order (`merge_stats`): the same bits on every rank;
- the mid-block attention: each rank projects its band's tokens to q, k, v, the keys and values of all tokens are
  all-gathered (`gather_tokens`) and the band's queries attend to them: each rank computes 1/world of the
  attention and holds all keys and values (2 x inner channels per token), never the whole feature map;
- after every stage, one all-reduce of a flag (`end_stage`): for fp16, whether any rank's band overflowed, so all
  ranks recompute the stage wider together (the single-process policy of `sdvae_fast.fast`).
All exchanges are collectives of `torch.distributed` (all_gather with bands padded to the largest, then trimmed;
gloo on CPU, NCCL on GPUs); no reduction uses atomics, so repeated runs give the same bits.

Errors. Before the first collective every rank's own validation and a checksum of its input are all-gathered
(`_agree`): a bad or different input on one rank makes every rank raise the same ValueError. A failure later (an
exception on one rank in the middle of a stage, e.g. out of memory) is posted to the process group's key-value
store (the one `init_process_group` rendezvoused with) by the failing rank; the others wait for each collective
while watching that key, and every rank raises the same `PatchParallelError`. A stage-end all-reduce alone could
not do this: a rank that fails mid-stage never reaches it while the others wait in a halo exchange. After such a
mid-call failure the ranks' collectives are out of step: destroy and re-create the process group (as after any
collective error; with gloo, `dist.new_group()` is the reliable way: destroying a group with a pending collective
can hang). A rank that dies without a word leaves the others waiting `TIMEOUT_S` seconds, then they raise; the
first collective of a call (`_agree`, blocking) waits the process group's own timeout (`init_process_group(...,
timeout=...)`) instead.
CPU (gloo) collectives are waited on by polling; CUDA (NCCL) collectives stay stream-ordered and the host polls
only at the stage-end all-reduces (one host sync per stage).

The process group comes from `torch.distributed` (e.g. started by `torchrun`, or `init_process_group("gloo")`).
Which kernels run is the ops' decision (`sdvae_fast.ops`): the Triton kernels on CUDA (or the interpreter), the
PyTorch references elsewhere. Inference only (no autograd); fp32, bf16 and fp16 (with the overflow policy).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from sdvae_fast import ops
from sdvae_fast.fast.units import ParallelHooks, RunContext, Stats

Tensor = torch.Tensor

#: Seconds a rank waits for one collective before it raises (a peer died or stopped calling).
TIMEOUT_S = 600.0
#: Seconds between two looks at the error key while a collective is pending.
_STORE_POLL_S = 0.02


class PatchParallelError(RuntimeError):
    """A patch-parallel call failed on one rank (or timed out); every rank raises it with the same message."""


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
        raise ValueError(f"world size {world_size} is larger than the {rows} rows of the smallest feature map; use "
                         f"at most {rows} ranks, or a taller image")
    base, extra = divmod(rows, world_size)
    bands, start = [], 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        bands.append((start, end))
        start = end
    return bands


def _concat_padded(parts: List[Tensor], sizes: List[int], dim: int) -> Tensor:
    """Every rank's part, padded to the largest along `dim`, trimmed to its true size and concatenated in rank
    order."""
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


def _padded(t: Tensor, size: int, dim: int) -> Tensor:
    """t zero-padded along `dim` to `size` (t itself when it is that size already)."""
    if t.shape[dim] == size:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def gather_rows(band: Tensor, group=None, heights: Optional[List[int]] = None) -> Tensor:
    """The full map from every rank's band of rows: (N, C, rows_r, W) on rank r -> (N, C, sum rows_r, W) on all.

    Bands may differ in height: each is padded to the tallest, all-gathered, trimmed and concatenated in rank
    order. `heights`: every rank's band height when already known (else gathered here). Collective: every
    rank of `group` must call it (plain blocking collectives; the patch-parallel calls use `RowParallelHooks`,
    which also watch for a failing rank).
    """
    world = dist.get_world_size(group)
    if heights is None:
        sizes = [torch.zeros(1, dtype=torch.int64, device=band.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([band.shape[2]], device=band.device), group=group)
        heights = [int(h) for h in sizes]
    parts = [band.new_empty(band.shape[0], band.shape[1], max(heights), band.shape[3]) for _ in range(world)]
    dist.all_gather(parts, _padded(band, max(heights), 2), group=group)
    return _concat_padded(parts, heights, 2)


_CALLS: Dict[int, int] = {}


def _error_store(group):
    """The process group's key-value store (the rendezvous store `init_process_group` used), where a failing rank
    posts its error; None when this torch does not expose it (a failure after the first collective then leaves
    the other ranks to `TIMEOUT_S`)."""
    try:
        from torch.distributed.distributed_c10d import _get_process_group_store
    except ImportError:
        return None
    try:
        return _get_process_group_store(group if group is not None else dist.group.WORLD)
    except (KeyError, AttributeError, RuntimeError):
        return None


class RowParallelHooks(ParallelHooks):
    """`ParallelHooks` for a process group whose ranks hold consecutive bands of rows (rank 0 the top band).

    One instance serves one patch-parallel call. Every method is a collective: all ranks of the group call it
    in the same order (the units do). Collectives on CPU tensors are waited on by polling, watching the error
    key of this call in the group's store (module docstring); `fail` posts this rank's error there.
    """

    def __init__(self, group=None, what: str = "patch parallel call"):
        self.group, self.what = group, what
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._store = _error_store(group)
        call = _CALLS.get(id(group), 0)
        _CALLS[id(group)] = call + 1  # every rank makes the same calls, so the keys agree
        self._key = f"sdvae_fast/patch_parallel/{call}/error"

    # -- collectives that watch for a failing rank ----------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._store is not None and self._store.check([self._key]):
            raise PatchParallelError(self._store.get(self._key).decode())

    def _wait(self, work, poll: bool) -> None:
        """Wait for an async collective; with `poll`, on the host, looking at the error key every
        `_STORE_POLL_S` and giving up after `TIMEOUT_S`; else stream-ordered (`work.wait()`, CUDA)."""
        if poll:
            deadline = time.monotonic() + TIMEOUT_S
            next_look, delay = time.monotonic(), 0.0
            while not work.is_completed():
                now = time.monotonic()
                if now >= next_look:
                    self._raise_if_failed()
                    next_look = now + _STORE_POLL_S
                if now > deadline:
                    raise PatchParallelError(
                        f"{self.what}: rank {self.rank} waited {TIMEOUT_S:.0f} s for a collective that never "
                        f"completed (a rank died or stopped calling)")
                time.sleep(delay)
                delay = min(2 * delay + 1e-5, 1e-3)
        work.wait()

    def _all_gather(self, t: Tensor) -> List[Tensor]:
        """Every rank's `t` (same shape on all ranks), in rank order, in t's memory format (channels_last halo
        rows stay channels_last, so the conv reads the extended band without another copy)."""
        channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
        t = t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._wait(dist.all_gather(out, t, group=self.group, async_op=True), poll=not t.is_cuda)
        return out

    def _sizes(self, n: int, device) -> List[int]:
        """Every rank's `n`, in rank order (one small all_gather)."""
        return [int(s) for s in self._all_gather(torch.tensor([n], dtype=torch.int64, device=device))]

    def fail(self, error: BaseException) -> PatchParallelError:
        """Post this rank's error for the others (the first posted wins) and return the error to raise."""
        message = f"{self.what} failed on rank {self.rank}: {type(error).__name__}: {error}"
        if self._store is not None:
            message = self._store.compare_set(self._key, "", message).decode()
        return PatchParallelError(message)

    # -- the hooks ------------------------------------------------------------------------------------------------

    def _halo(self, x: Tensor, top: int, bottom: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(the `top` rows above this band, the `bottom` rows below it) from the neighbouring ranks; None at the
        image border. Needs every band at least max(top, bottom) rows tall (the band rule guarantees it)."""
        k = max(top, bottom, 1)
        if x.shape[2] < k:
            raise RuntimeError(f"rank {self.rank}: a band of {x.shape[2]} rows is thinner than the halo of {k} rows")
        edges = self._all_gather(torch.cat([x[:, :, :k], x[:, :, -k:]], dim=2))  # world x (N, C, 2k, W)
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

    def gather_tokens(self, kv: Tensor) -> Tensor:
        """Keys and values of every band's tokens, (N, T_r, 2*inner) on rank r -> (N, sum T_r, 2*inner) on all,
        in image order (bands padded to the largest, all-gathered, trimmed)."""
        sizes = self._sizes(kv.shape[1], kv.device)
        return _concat_padded(self._all_gather(_padded(kv, max(sizes), 1)), sizes, 1)

    def merge_stats(self, partials: Tuple[Tensor, Tensor, Tensor], eps: float) -> Stats:
        """GroupNorm (mean, rstd) of the whole image: every rank's (count, mean, M2) all-gathered (one collective)
        and merged with Chan's formula in rank order (the same bits on every rank)."""
        stacked = self._all_gather(torch.stack(tuple(partials)))  # world x (3, N, G): count, mean, M2
        return ops.merge_group_norm_partials([tuple(p) for p in stacked], eps)

    def end_stage(self, y: Tensor, check_finite: bool) -> bool:
        """After a stage: one all-reduce (MAX) of this band's overflow flag (0 unless `check_finite` and y has a
        non-finite value), polled on the host: True when every rank's band is finite."""
        flag = torch.zeros(1, dtype=torch.int32, device=y.device)
        if check_finite:
            flag[0] = (~torch.isfinite(y).all()).to(torch.int32)
        self._wait(dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), poll=True)
        return int(flag.item()) == 0

    def gather_rows(self, band: Tensor) -> Tensor:
        """`gather_rows` of this call (watching for a failing rank)."""
        heights = self._sizes(band.shape[2], band.device)
        return _concat_padded(self._all_gather(_padded(band, max(heights), 2)), heights, 2)


# ---------------------------------------------------------------------------------------------------------------
# The calls: validate together, then run the band
# ---------------------------------------------------------------------------------------------------------------


def _local_problem(modules, z: Tensor, stages) -> Optional[str]:
    """What this rank finds wrong before any collective (None when nothing): the message every rank will raise."""
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or not z.is_floating_point():
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        return f"the input must be a 4-D float tensor (N, C, H, W), got {got}"
    weight = next(modules[0].parameters())
    if weight.dtype != z.dtype or weight.device != z.device:
        return (f"the input is {z.dtype} on {z.device} but the VAE's parameters are {weight.dtype} on "
                f"{weight.device}")
    fallbacks = [f"{unit.name} ({unit.reason})" for stage in stages for unit in stage if unit.reason is not None]
    if fallbacks:
        return ("every unit must run on the fused ops to be split by rows, but these run their module's own "
                "forward: " + "; ".join(fallbacks))
    return None


def agree(check: Callable[[], object], group, what: str):
    """Run `check()` (a caller's own input validation) on every rank and raise the same error everywhere if it
    failed on any rank, before anything else is collective: one `all_gather_object` of each rank's outcome.

    Returns:
        check()'s result on this rank.
    Raises:
        ValueError (on every rank, naming the ranks and their messages) when `check` raised TypeError or
        ValueError on any rank; other exceptions propagate on the rank that raised them.
    """
    result, problem = None, None
    try:
        result = check()
    except (TypeError, ValueError) as error:
        problem = str(error)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, problem, group=group)
    problems = [f"rank {r}: {p}" for r, p in enumerate(everyone) if p is not None]
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
    return result


def _agree(modules, z: Tensor, stages, group, what: str) -> None:
    """One collective before any other: every rank's own validation result and a checksum of its input (shape,
    sum and sum of squares in fp64) are all-gathered, and if any rank found a problem or the inputs differ,
    every rank raises the same ValueError (naming the ranks), so no rank is left waiting in a collective."""
    problem = _local_problem(modules, z, stages)
    checksum = None
    if problem is None:
        z64 = z.detach().to(torch.float64).contiguous()  # one summation order whatever the memory format
        checksum = (tuple(z.shape), z64.sum().item(), z64.square().sum().item())
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (problem, checksum), group=group)
    problems = [f"rank {r}: {p}" for r, (p, _) in enumerate(everyone) if p is not None]
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
    differ = [r for r, (_, c) in enumerate(everyone) if c != everyone[0][1]]
    if differ:
        shapes = [c[0] for _, c in everyone]
        raise ValueError(f"{what}: every rank must pass the same input, but ranks {differ} hold an input that "
                         f"differs from rank 0's (shapes by rank: {shapes}; sum and sum of squares compared). "
                         f"Pipelines give every rank the same latents only when seeded alike: pass "
                         f"generator=torch.Generator().manual_seed(seed) with one seed on every rank")


def _check_group(modules, z: Tensor, stages, group, what: str) -> Tuple[int, int]:
    """(world size, rank) after the checks every patch-parallel call makes before its first collective."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs an initialised torch.distributed process group: call "
                           f"torch.distributed.init_process_group('nccl' or 'gloo') first (torchrun only sets the "
                           f"environment it reads)")
    _agree(modules, z, stages, group, what)
    return dist.get_world_size(group), dist.get_rank(group)


def _run_band(stages, band: Tensor, group, what: str, gather: bool) -> Tensor:
    """Run the stages on this rank's band (and gather the bands when asked); any failure raises the same
    `PatchParallelError` on every rank."""
    from sdvae_fast import fast

    hooks = RowParallelHooks(group, what)
    try:
        with torch.no_grad():
            ctx = RunContext(emit_stats=fast.EMIT_GN_STATS, parallel=hooks)
            y = fast.run_stages(stages, band.contiguous(), ctx).contiguous()
            return hooks.gather_rows(y) if gather else y
    except PatchParallelError:
        raise
    except Exception as error:
        raise hooks.fail(error) from error


def _decoder_modules(vae):
    """(decoder, post_quant_conv or None) of a VAE, or (decoder, None) for a Decoder itself."""
    if hasattr(vae, "decoder"):
        return vae.decoder, getattr(vae, "post_quant_conv", None)
    return vae, None


def decode_patch_parallel(vae, z: Tensor, group=None, *, gather: bool = True):
    """`vae.decode(z).sample` split by rows over the ranks of `group`, exactly (module docstring).

    Args:
        vae: a VAE with diffusers' AutoencoderKL structure (ours or a live diffusers one), or a Decoder alone.
        z: the same unscaled latents (N, latent_channels, h, w) on every rank, the VAE's dtype (fp32/bf16/fp16)
            and device (CPU for gloo, this rank's GPU for NCCL).
        group: a `torch.distributed` process group (default: the world).
        gather: return the full images on every rank (True), or only this rank's band.
    Returns:
        images (N, out_channels, f*h, f*w) with f the VAE's upsampling factor, or with `gather=False` a tuple
        (band (N, out_channels, f*(end - start), f*w), first image row of the band).
    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError (the same on every rank, before any other collective): ranks hold different inputs; a rank's
            input is not a float 4-D tensor in the VAE's dtype and device; a unit runs its module's forward
            (not split by rows); more ranks than latent rows.
        PatchParallelError (the same on every rank): a rank failed during the call, or a collective waited
            `TIMEOUT_S` seconds; the process group must then be re-created.
    """
    from sdvae_fast import fast

    what = "patch parallel decode"
    decoder, post_quant_conv = _decoder_modules(vae)
    stages = fast.decoder_units(decoder, post_quant_conv)
    world, rank = _check_group((decoder, post_quant_conv), z, stages, group, what)
    start, end = row_bands(z.shape[2], world)[rank]
    band = _run_band(stages, z[:, :, start:end], group, what, gather)
    if gather:
        return band
    factor = band.shape[2] // (end - start)
    return band, start * factor


def encode_patch_parallel(vae, x: Tensor, group=None, *, gather: bool = True):
    """`quant_conv(encoder(x))` (the posterior's moments) split by rows over the ranks of `group`, exactly.

    The bands are rows of the deepest encoder map (diffusers' size arithmetic: each stride-2 downsample with
    (0, 1, 0, 1) padding halves the rows rounding down, 468 -> 234 -> 117 -> 58); rank r encodes the image rows
    [start * F, end * F) with F = 2 ** (levels - 1), the last rank also the remainder rows at the bottom.

    Args:
        vae: a VAE with diffusers' AutoencoderKL structure.
        x: the same images (N, in_channels, H, W) on every rank, the VAE's dtype (fp32/bf16/fp16) and device.
        group, gather: as for `decode_patch_parallel`.
    Returns:
        moments (N, 2*latent_channels, h, w), or with `gather=False` (this rank's band of them, its first row).
    Raises:
        As `decode_patch_parallel` (the row count checked is the deepest map's).
    """
    from sdvae_fast import fast

    what = "patch parallel encode"
    quant_conv = getattr(vae, "quant_conv", None)
    stages = fast.encoder_units(vae.encoder, quant_conv)
    world, rank = _check_group((vae.encoder, quant_conv), x, stages, group, what)
    factor = 2 ** (len(vae.encoder.down_blocks) - 1)
    start, end = row_bands(x.shape[2] // factor, world)[rank]
    stop = x.shape[2] if rank == world - 1 else end * factor
    band = _run_band(stages, x[:, :, start * factor:stop], group, what, gather)
    return band if gather else (band, start)


__all__: Sequence[str] = ("PatchParallelError", "TIMEOUT_S", "agree", "row_bands", "gather_rows",
                          "RowParallelHooks", "decode_patch_parallel", "encode_patch_parallel")
