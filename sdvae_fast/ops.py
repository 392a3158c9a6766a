"""The fused ops of sdvae-fast, registered as `torch.ops.sdvae_fast.*`.

Each op is a `torch.library.custom_op` with a fake (meta) implementation, so `torch.compile` traces it without a
graph break and, with dynamic shapes, without recompiling per resolution. Inside, an op runs the Triton kernel
when `kernels_available(device)` (CUDA, or CPU under `TRITON_INTERPRET=1`) and the case is supported, and the
plain PyTorch reference otherwise (unsupported-but-valid cases fall back, correctly).

The public functions below (`group_norm_stats`, `gn_silu_conv2d`, `upsample_conv2d`, `attention`,
`vector_quantize`) validate their arguments with clear errors (the one validation on the way down: the kernel
launchers only assert what the ops guarantee), normalise them, and call the registered ops. The ops take
tensors only and know no module types: `sdvae_fast.fast.units` maps modules (ResnetBlock2D, Attention, ...) to
calls of these ops.
All image tensors are `(N, C, H, W)` logically; outputs are in channels_last memory format (NHWC in memory),
except `vector_quantize`'s, contiguous NCHW like diffusers' quantiser.
`gn_silu_conv2d_stats` and `upsample_conv2d_stats` are the same kernels with the GroupNorm statistics of the
output emitted from the epilogue (`emit_stats=(num_groups, eps)` on the public functions), so the unit that
normalises that output next can skip its statistics pass; the `*_partials` ops (`emit_partials=True`) also
return the raw per-(sample, group) (count, mean, M2), and `group_norm_partials` computes them for any tensor, so
partials of image bands (patch parallelism) merge with `merge_group_norm_partials` in a fixed order.

`fused_conv2d` is the general form of the conv ops (two sources, one upsampled by indexing, the 4-phase upsample
conv with a prologue, a half-resolution residual: the consistency decoder's UNet), and
`group_norm_stats_two_sources` the GroupNorm statistics over a concatenation that is never written.

Layout of this file: one section per op (reference, registered op, fake, public wrapper).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from sdvae_fast.kernels import attention as _attention_kernels
from sdvae_fast.kernels import conv as _conv_kernels
from sdvae_fast.kernels import group_norm as _group_norm_kernels
from sdvae_fast.kernels import vector_quantize as _vq_kernels
from sdvae_fast.kernels._common import SUPPORTED_DTYPES as _KERNEL_DTYPES
from sdvae_fast.kernels._common import conv_output_size, kernels_available

Tensor = torch.Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision inputs, fp64 for fp64: the precision the references compute in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_image(name: str, x: Tensor) -> None:
    """Raise naming `name` unless x is a 4-D (N, C, H, W) fp16/bf16/fp32/fp64 tensor (what every image op takes).

    Raises:
        TypeError: not a tensor, or not one of those dtypes. ValueError: not 4-D.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_groups(num_channels: int, num_groups: int) -> None:
    if num_groups <= 0 or num_channels % num_groups != 0:
        raise ValueError(
            f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
        )


# ---------------------------------------------------------------------------------------------------------------
# GroupNorm statistics
# ---------------------------------------------------------------------------------------------------------------




def _group_norm_stats_reference(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd), each (N, G) float32 (float64 for fp64 x), over C/G*H*W per (sample, group)."""
    n = x.shape[0]
    xg = x.to(_compute_dtype(x.dtype)).reshape(n, num_groups, -1)  # (N, G, C/G*H*W)
    var, mean = torch.var_mean(xg, dim=-1, unbiased=False)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return mean.to(out_dtype), torch.rsqrt(var + eps).to(out_dtype)


@torch.library.custom_op("sdvae_fast::group_norm_stats", mutates_args=())
def _group_norm_stats_op(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    # Triton kernel (split reduction + Chan merge) for fp16/bf16/fp32 where kernels run; the reference otherwise.
    if kernels_available(x.device) and x.dtype in _KERNEL_DTYPES and x.numel() > 0:
        return _group_norm_kernels.group_norm_stats(x, num_groups, eps)
    return _group_norm_stats_reference(x, num_groups, eps)


@_group_norm_stats_op.register_fake
def _(x, num_groups, eps):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (x.shape[0], num_groups)
    return x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)


def group_norm_stats(x: Tensor, num_groups: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) mean and reciprocal standard deviation, as `torch.nn.GroupNorm` computes them.

    fp16/bf16/fp32 inputs on CUDA (or CPU under TRITON_INTERPRET=1) run `kernels/group_norm.py`: a split
    reduction over many programs merged with Chan's parallel formula in a fixed order, deterministic and
    independent of the batch size; fp64 and CPU without the interpreter use `torch.var_mean`.

    Args:
        x: (N, C, H, W), fp16/bf16/fp32/fp64, any strides (NCHW, channels_last, sliced views).
        num_groups: G; C must be divisible by G.
        eps: added to the biased variance before the reciprocal square root.
    Returns:
        (mean, rstd), each (N, G) float32 (float64 for fp64 input), over the whole C/G*H*W of each group.
    Raises:
        ValueError: x not 4-D, or C not divisible by num_groups (the message names both numbers).
    """
    check_image("x", x)
    _check_groups(x.shape[1], num_groups)
    return torch.ops.sdvae_fast.group_norm_stats(x, int(num_groups), float(eps))


#: Raw GroupNorm statistics (count, mean, m2) of each (sample, group), each (N, G); see `group_norm_partials`.
GroupNormPartials = _group_norm_kernels.GroupNormPartials


def _group_norm_partials_reference(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, m2), each (N, G) float32 (float64 for fp64 x): m2 = biased variance * count."""
    n = x.shape[0]
    xg = x.to(_compute_dtype(x.dtype)).reshape(n, num_groups, -1)  # (N, G, C/G*H*W)
    var, mean = torch.var_mean(xg, dim=-1, unbiased=False)
    count = torch.full_like(mean, xg.shape[-1])
    return count, mean, var * count


@torch.library.custom_op("sdvae_fast::group_norm_partials", mutates_args=())
def _group_norm_partials_op(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    # The statistics kernels' merged raw triples where kernels run; torch.var_mean otherwise.
    if kernels_available(x.device) and x.dtype in _KERNEL_DTYPES and x.numel() > 0:
        return tuple(_group_norm_kernels.group_norm_partials(x, num_groups))
    return _group_norm_partials_reference(x, num_groups)


@_group_norm_partials_op.register_fake
def _(x, num_groups):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return tuple(x.new_empty((x.shape[0], num_groups), dtype=dtype) for _ in range(3))


def group_norm_partials(x: Tensor, num_groups: int) -> GroupNormPartials:
    """Raw GroupNorm statistics of each (sample, group): (count, mean, M2), before the variance becomes an rstd.

    For patch parallelism: each rank computes the partials of its band of the image, and
    `merge_group_norm_partials` merges the bands' partials into the whole image's (mean, rstd). The kernel path
    (fp16/bf16/fp32 on CUDA, or CPU under TRITON_INTERPRET=1) runs the same kernels as `group_norm_stats`;
    fp64 and CPU without the interpreter use `torch.var_mean`.

    Args:
        x: (N, C, H, W), fp16/bf16/fp32/fp64, any strides.
        num_groups: G; C must be divisible by G.
    Returns:
        `GroupNormPartials(count, mean, m2)`, each (N, G) float32 (float64 for fp64 input): count = C/G*H*W,
        mean the group's mean, m2 the sum of squared deviations from it (biased variance = m2 / count).
    Raises:
        ValueError: x not 4-D, or C not divisible by num_groups (the message names both numbers).
        TypeError: x not a floating-point tensor.
    """
    check_image("x", x)
    _check_groups(x.shape[1], num_groups)
    return GroupNormPartials(*torch.ops.sdvae_fast.group_norm_partials(x, int(num_groups)))


def merge_group_norm_partials(partials: Sequence[GroupNormPartials], eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(mean, rstd) of each (sample, group) from the partials of disjoint parts of the groups (image bands).

    Deterministic: the partials are merged left to right in the given order, `((p0 + p1) + p2) + ...`, each
    step Chan, Golub and LeVeque's pairwise update (1979), in plain torch arithmetic (no atomics, any device),
    so the bits depend only on the list. Pass the bands in image order on every rank to get the same bits
    everywhere. A single partial gives its own mean and `rstd = 1 / sqrt(m2 / count + eps)`.

    Args:
        partials: a non-empty sequence of `GroupNormPartials` (from `group_norm_partials` or from the convs'
            `emit_partials=True`), or (count, mean, m2) triples; every tensor (N, G), all float32 or all
            float64, on one device.
        eps: added to the biased variance before the reciprocal square root.
    Returns:
        (mean, rstd), each (N, G) in the partials' dtype.
    Raises:
        ValueError: an empty sequence, or tensors of differing shapes or not 2-D.
        TypeError: non-tensors, other dtypes, or mixed dtypes or devices.
    """
    return _group_norm_kernels.merge_group_norm_partials(partials, float(eps))


# ---------------------------------------------------------------------------------------------------------------
# GroupNorm + SiLU + conv (+ bias + residual): the GSC unit
# ---------------------------------------------------------------------------------------------------------------


def _gn_silu_conv2d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    silu: bool,
    stride: int,
    padding: Sequence[int],
) -> Tensor:
    """conv2d(pad(act(x * scale + shift)), weight, bias, stride) + residual, in fp32 (fp64 for fp64 x).

    `scale`/`shift` are (N, C) per-(sample, channel) affine terms of the normalisation (None: no normalisation);
    `padding` is (left, right, top, bottom), zeros added to the *normalised* tensor.
    """
    cdt = _compute_dtype(x.dtype)
    h = x.to(cdt)
    if scale is not None:
        h = h * scale.to(cdt)[:, :, None, None] + shift.to(cdt)[:, :, None, None]
        if silu:
            h = F.silu(h)
    h = F.pad(h, tuple(padding))
    y = F.conv2d(h, weight.to(cdt), None if bias is None else bias.to(cdt), stride=stride)
    if residual is not None:
        y = y + residual.to(cdt)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


def _conv_kernel_runs(x: Tensor, weight: Tensor, stride: int) -> bool:
    """Whether the conv ops take the Triton kernel: a device with kernels, fp16/bf16/fp32, 1x1/3x3, stride 1/2."""
    return (kernels_available(x.device) and x.dtype in _KERNEL_DTYPES
            and _conv_kernels.conv_supported(x, weight, stride) and x.numel() > 0)


@torch.library.custom_op("sdvae_fast::gn_silu_conv2d", mutates_args=())
def _gn_silu_conv2d_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    silu: bool,
    stride: int,
    padding: list[int],
) -> Tensor:
    # Triton implicit GEMM for fp16/bf16/fp32, 1x1/3x3, stride 1/2 where kernels run; the reference otherwise.
    if _conv_kernel_runs(x, weight, stride):
        return _conv_kernels.gn_silu_conv2d(
            x, weight, bias, scale, shift, residual, silu=silu, stride=stride, padding=padding
        )
    return _gn_silu_conv2d_reference(x, weight, bias, scale, shift, residual, silu, stride, padding)


@_gn_silu_conv2d_op.register_fake
def _gn_silu_conv2d_fake(x, weight, bias, scale, shift, residual, silu, stride, padding):
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    ho = conv_output_size(h, kh, padding[2], padding[3], stride)
    wo = conv_output_size(w, kw, padding[0], padding[1], stride)
    return x.new_empty((n, weight.shape[0], ho, wo)).contiguous(memory_format=torch.channels_last)


def _output_stats(y: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """What a fallback `*_stats` op returns with its output: the GroupNorm statistics op run on the output."""
    return torch.ops.sdvae_fast.group_norm_stats(y, num_groups, eps)


def _stats_fake(y: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Fake (mean, rstd) of an output y: (N, G), float64 for fp64 y and float32 otherwise."""
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    return y.new_empty((y.shape[0], num_groups), dtype=dtype), y.new_empty((y.shape[0], num_groups), dtype=dtype)


@torch.library.custom_op("sdvae_fast::gn_silu_conv2d_stats", mutates_args=())
def _gn_silu_conv2d_stats_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    silu: bool,
    stride: int,
    padding: list[int],
    stats_groups: int,
    stats_eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    # The same kernel with EMIT_STATS: the output and its GroupNorm statistics from the epilogue's partials.
    if _conv_kernel_runs(x, weight, stride):
        return _conv_kernels.gn_silu_conv2d(
            x, weight, bias, scale, shift, residual, silu=silu, stride=stride, padding=padding,
            stats_groups=stats_groups, stats_eps=stats_eps,
        )
    y = _gn_silu_conv2d_reference(x, weight, bias, scale, shift, residual, silu, stride, padding)
    return (y, *_output_stats(y, stats_groups, stats_eps))


@_gn_silu_conv2d_stats_op.register_fake
def _(x, weight, bias, scale, shift, residual, silu, stride, padding, stats_groups, stats_eps):
    y = _gn_silu_conv2d_fake(x, weight, bias, scale, shift, residual, silu, stride, padding)
    return y, *_stats_fake(x, stats_groups)


def _partials_fake(y: Tensor, num_groups: int) -> tuple[Tensor, ...]:
    """Fake (mean, rstd, count, mean, m2) of an output y: each (N, G), float64 for fp64 y and float32 otherwise."""
    mean, rstd = _stats_fake(y, num_groups)
    return mean, rstd, *(mean.new_empty(mean.shape) for _ in range(3))


def _output_partials(y: Tensor, num_groups: int, eps: float) -> tuple[Tensor, ...]:
    """What a fallback `*_partials` op returns with its output: (mean, rstd, count, mean, m2) of the output."""
    return (*_output_stats(y, num_groups, eps), *torch.ops.sdvae_fast.group_norm_partials(y, num_groups))


@torch.library.custom_op("sdvae_fast::gn_silu_conv2d_partials", mutates_args=())
def _gn_silu_conv2d_partials_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    silu: bool,
    stride: int,
    padding: list[int],
    stats_groups: int,
    stats_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # The EMIT_STATS kernel also returning the merged raw (count, mean, M2) of each (sample, group).
    if _conv_kernel_runs(x, weight, stride):
        y, mean, rstd, partials = _conv_kernels.gn_silu_conv2d(
            x, weight, bias, scale, shift, residual, silu=silu, stride=stride, padding=padding,
            stats_groups=stats_groups, stats_eps=stats_eps, stats_partials=True,
        )
        return (y, mean, rstd, *partials)
    y = _gn_silu_conv2d_reference(x, weight, bias, scale, shift, residual, silu, stride, padding)
    return (y, *_output_partials(y, stats_groups, stats_eps))


@_gn_silu_conv2d_partials_op.register_fake
def _(x, weight, bias, scale, shift, residual, silu, stride, padding, stats_groups, stats_eps):
    y = _gn_silu_conv2d_fake(x, weight, bias, scale, shift, residual, silu, stride, padding)
    return y, *_partials_fake(x, stats_groups)


def gn_scale_shift(
    mean: Tensor, rstd: Tensor, norm_weight: Tensor, norm_bias: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold GroupNorm statistics and affine parameters into per-(sample, channel) scale and shift.

    `group_norm(x)[n, c] = x[n, c] * scale[n, c] + shift[n, c]` with `scale = rstd[n, g] * gamma[c]` and
    `shift = beta[c] - mean[n, g] * scale[n, c]`, g = c // (C/G).
    Args:
        mean, rstd: (N, G) float32/float64.
        norm_weight, norm_bias: (C,) gamma and beta.
    Returns:
        (scale, shift), each (N, C) in the dtype of `mean`.
    """
    n, g = mean.shape
    c = norm_weight.shape[0]
    gamma = norm_weight.to(mean.dtype).view(1, g, c // g)  # (1, G, C/G)
    beta = norm_bias.to(mean.dtype).view(1, g, c // g)
    scale = rstd[:, :, None] * gamma  # (N, G, C/G)
    shift = beta - mean[:, :, None] * scale
    return scale.reshape(n, c), shift.reshape(n, c)


def _normalize_padding(padding: Union[int, Sequence[int]]) -> list[int]:
    if isinstance(padding, int):
        return [padding] * 4
    padding = [int(p) for p in padding]
    if len(padding) != 4 or min(padding) < 0:
        raise ValueError(f"padding must be an int or 4 non-negative ints (left, right, top, bottom), got {padding}")
    return padding


def gn_silu_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    num_groups: int = 32,
    eps: float = 1e-6,
    silu: bool = True,
    stride: int = 1,
    padding: Union[int, Sequence[int]] = 1,
    residual: Optional[Tensor] = None,
    stats: Optional[tuple[Tensor, Tensor]] = None,
    emit_stats: Optional[tuple[int, float]] = None,
    emit_partials: bool = False,
):
    """The VAE's GSC unit in one pass: `conv2d(silu(group_norm(x)), weight, bias, stride, padding) + residual`.

    Args:
        x: (N, C_in, H, W), fp16/bf16/fp32/fp64, any strides.
        weight: (C_out, C_in, kh, kw) with kh == kw in {1, 3} on the kernel path (others fall back).
        bias: (C_out,) or None.
        norm_weight, norm_bias: GroupNorm gamma/beta, (C_in,). `norm_weight=None` gives a plain conv (no
            normalisation and no SiLU).
        num_groups, eps: GroupNorm parameters (eps is added to the biased variance).
        silu: apply SiLU after the normalisation.
        stride: 1 or 2.
        padding: int, or (left, right, top, bottom); Downsample2D is `padding=(0, 1, 0, 1), stride=2`.
        residual: (N, C_out, H_out, W_out) added in the epilogue, or None.
        stats: precomputed (mean, rstd), each (N, G) float32, or None to compute them.
        emit_stats: (num_groups, eps) of the GroupNorm that normalises the *output* next: the epilogue then
            also reduces the output tile by tile into partial (count, mean, M2) triples, merged by one small
            kernel, so that unit can pass them as `stats=` and skip its read of the tensor. None: no statistics.
        emit_partials: with `emit_stats`, also return the merged raw statistics of the output
            (`GroupNormPartials`), which `merge_group_norm_partials` merges with other image bands' partials.
    Returns:
        (N, C_out, H_out, W_out) in x's dtype, channels_last memory format; with `emit_stats` the pair
        (output, (mean, rstd)), mean and rstd (N, num_groups) float32 (float64 for fp64 x); with
        `emit_partials` too, the triple (output, (mean, rstd), partials), each field of partials (N, num_groups)
        in the dtype of mean.
    Raises:
        ValueError / TypeError naming the argument on wrong ranks, channel counts, groups or shapes, or
        `emit_partials` without `emit_stats`.

    Runs `kernels/conv.py` (one implicit GEMM with the normalisation and SiLU in its prologue, bias and
    residual in its epilogue, fp32 accumulation; weights packed once per weight tensor and version) for
    fp16/bf16/fp32 with 1x1 or 3x3 kernels and stride 1 or 2 on CUDA (or CPU under TRITON_INTERPRET=1); the
    PyTorch reference otherwise (fp64, 5x5, CPU without the interpreter), with the same result.
    fp32 on a GPU follows `torch.backends.cudnn.allow_tf32` like eager convs (TF32 by default).
    """
    check_image("x", x)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(stride, int) or isinstance(stride, bool):
        raise TypeError(f"stride must be an int, got {stride!r}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must be (C_out, C_in={x.shape[1]}, kh, kw), got shape {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    pad = _normalize_padding(padding)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    scale = shift = None
    if norm_weight is not None:
        _check_groups(x.shape[1], num_groups)
        if norm_bias is None:
            norm_bias = torch.zeros_like(norm_weight)
        for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (x.shape[1],):
                raise ValueError(f"{name} must be a ({x.shape[1]},) tensor, got {getattr(t, 'shape', t)}")
        if stats is None:
            stats = group_norm_stats(x, num_groups, eps)
        mean, rstd = stats
        if tuple(mean.shape) != (x.shape[0], num_groups) or tuple(rstd.shape) != (x.shape[0], num_groups):
            raise ValueError(
                f"stats must be two ({x.shape[0]}, {num_groups}) tensors, got {tuple(mean.shape)} and {tuple(rstd.shape)}"
            )
        scale, shift = gn_scale_shift(mean, rstd, norm_weight, norm_bias)
    n, _, h, w = x.shape
    ho = conv_output_size(h, weight.shape[2], pad[2], pad[3], stride)
    wo = conv_output_size(w, weight.shape[3], pad[0], pad[1], stride)
    if ho < 1 or wo < 1:
        raise ValueError(f"x of spatial size {h}x{w} is too small for a {weight.shape[2]}x{weight.shape[3]} conv")
    if residual is not None and tuple(residual.shape) != (n, weight.shape[0], ho, wo):
        raise ValueError(
            f"residual must be {(n, weight.shape[0], ho, wo)}, got shape {tuple(residual.shape)}"
        )
    if emit_stats is None:
        _check_emit_partials(emit_partials)
        return torch.ops.sdvae_fast.gn_silu_conv2d(x, weight, bias, scale, shift, residual, bool(silu), int(stride),
                                                   pad)
    groups, stats_eps = _check_emit_stats(emit_stats, weight.shape[0])
    if emit_partials:
        y, mean, rstd, *partials = torch.ops.sdvae_fast.gn_silu_conv2d_partials(
            x, weight, bias, scale, shift, residual, bool(silu), int(stride), pad, groups, stats_eps
        )
        return y, (mean, rstd), GroupNormPartials(*partials)
    y, mean, rstd = torch.ops.sdvae_fast.gn_silu_conv2d_stats(
        x, weight, bias, scale, shift, residual, bool(silu), int(stride), pad, groups, stats_eps
    )
    return y, (mean, rstd)


def _check_emit_partials(emit_partials) -> None:
    """Raise unless `emit_partials` is False: the raw partials come with emitted statistics only."""
    if emit_partials:
        raise ValueError("emit_partials=True needs emit_stats=(num_groups, eps): partials of the emitted statistics")


def _check_emit_stats(emit_stats, out_channels: int) -> tuple[int, float]:
    """Validate `emit_stats=(num_groups, eps)` for an output of `out_channels` channels."""
    if not isinstance(emit_stats, (tuple, list)) or len(emit_stats) != 2:
        raise TypeError(f"emit_stats must be a (num_groups, eps) pair, got {emit_stats!r}")
    groups, eps = int(emit_stats[0]), float(emit_stats[1])
    if groups <= 0 or out_channels % groups:
        raise ValueError(
            f"emit_stats: output channels ({out_channels}) must be divisible by num_groups ({groups})"
        )
    return groups, eps


# ---------------------------------------------------------------------------------------------------------------
# Nearest-2x upsample + 3x3 conv
# ---------------------------------------------------------------------------------------------------------------


def _upsample_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """conv2d(interpolate(x, 2, nearest), weight, bias, padding=1) in fp32 (fp64 for fp64 x), channels_last."""
    cdt = _compute_dtype(x.dtype)
    h = F.interpolate(x.to(cdt), scale_factor=2.0, mode="nearest")
    y = F.conv2d(h, weight.to(cdt), None if bias is None else bias.to(cdt), padding=1)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("sdvae_fast::upsample_conv2d", mutates_args=())
def _upsample_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    # Four 2x2 phase convs on the low-resolution input (kernels/conv.py) for fp16/bf16/fp32; the reference otherwise.
    if kernels_available(x.device) and x.dtype in _KERNEL_DTYPES and x.numel() > 0:
        return _conv_kernels.upsample_conv2d(x, weight, bias)
    return _upsample_conv2d_reference(x, weight, bias)


@_upsample_conv2d_op.register_fake
def _upsample_conv2d_fake(x, weight, bias):
    n, _, h, w = x.shape
    return x.new_empty((n, weight.shape[0], 2 * h, 2 * w)).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("sdvae_fast::upsample_conv2d_stats", mutates_args=())
def _upsample_conv2d_stats_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stats_groups: int, stats_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # The upsample kernel with EMIT_STATS (partials per phase tile); the reference and the statistics op otherwise.
    if kernels_available(x.device) and x.dtype in _KERNEL_DTYPES and x.numel() > 0:
        return _conv_kernels.upsample_conv2d(x, weight, bias, stats_groups=stats_groups, stats_eps=stats_eps)
    y = _upsample_conv2d_reference(x, weight, bias)
    return (y, *_output_stats(y, stats_groups, stats_eps))


@_upsample_conv2d_stats_op.register_fake
def _(x, weight, bias, stats_groups, stats_eps):
    y = _upsample_conv2d_fake(x, weight, bias)
    return y, *_stats_fake(x, stats_groups)


@torch.library.custom_op("sdvae_fast::upsample_conv2d_partials", mutates_args=())
def _upsample_conv2d_partials_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stats_groups: int, stats_eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # The upsample kernel with EMIT_STATS, also returning the merged raw (count, mean, M2) of each (sample, group).
    if kernels_available(x.device) and x.dtype in _KERNEL_DTYPES and x.numel() > 0:
        y, mean, rstd, partials = _conv_kernels.upsample_conv2d(
            x, weight, bias, stats_groups=stats_groups, stats_eps=stats_eps, stats_partials=True
        )
        return (y, mean, rstd, *partials)
    y = _upsample_conv2d_reference(x, weight, bias)
    return (y, *_output_partials(y, stats_groups, stats_eps))


@_upsample_conv2d_partials_op.register_fake
def _(x, weight, bias, stats_groups, stats_eps):
    return _upsample_conv2d_fake(x, weight, bias), *_partials_fake(x, stats_groups)


def upsample_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    emit_stats: Optional[tuple[int, float]] = None,
    emit_partials: bool = False,
):
    """`conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)` without the 4x tensor.

    Args:
        x: (N, C_in, H, W), fp16/bf16/fp32/fp64, any strides.
        weight: (C_out, C_in, 3, 3).
        bias: (C_out,) or None.
        emit_stats: (num_groups, eps) of the GroupNorm applied to the output next, as in `gn_silu_conv2d`.
        emit_partials: with `emit_stats`, also return the raw `GroupNormPartials`, as in `gn_silu_conv2d`.
    Returns:
        (N, C_out, 2H, 2W) in x's dtype, channels_last memory format; with `emit_stats` the pair
        (output, (mean, rstd)), each (N, num_groups) float32 (float64 for fp64 x); with `emit_partials` too,
        the triple (output, (mean, rstd), partials).
    Raises:
        ValueError naming the argument on wrong ranks or shapes, or `emit_partials` without `emit_stats`.
    """
    check_image("x", x)
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"weight must be (C_out, {x.shape[1]}, 3, 3), got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    if emit_stats is None:
        _check_emit_partials(emit_partials)
        return torch.ops.sdvae_fast.upsample_conv2d(x, weight, bias)
    groups, stats_eps = _check_emit_stats(emit_stats, weight.shape[0])
    if emit_partials:
        y, mean, rstd, *partials = torch.ops.sdvae_fast.upsample_conv2d_partials(x, weight, bias, groups, stats_eps)
        return y, (mean, rstd), GroupNormPartials(*partials)
    y, mean, rstd = torch.ops.sdvae_fast.upsample_conv2d_stats(x, weight, bias, groups, stats_eps)
    return y, (mean, rstd)


# ---------------------------------------------------------------------------------------------------------------
# The general conv: two sources, an upsampled second source, a prologue before the upsampling, a half-resolution
# residual (the consistency decoder's UNet; docs/design.md, "The consistency decoder")
# ---------------------------------------------------------------------------------------------------------------


def _conv_input_reference(x: Tensor, x2: Optional[Tensor], x2_upsample: int) -> Tensor:
    """The conv input the general op reads: `cat([x, nearest_up(x2, x2_upsample)], dim=1)`, or x."""
    if x2 is None:
        return x
    if x2_upsample > 1:
        x2 = F.interpolate(x2, scale_factor=float(x2_upsample), mode="nearest")
    return torch.cat([x, x2.to(x.dtype)], dim=1)


def _fused_conv2d_reference(x, x2, weight, bias, scale, shift, residual, silu, stride, padding, upsample,
                            x2_upsample, residual_upsample) -> Tensor:
    """`fused_conv2d` in fp32 (fp64 for fp64 x), built from the plain references: channels_last in x's dtype."""
    cdt = _compute_dtype(x.dtype)
    h = _conv_input_reference(x, x2, x2_upsample).to(cdt)
    if scale is not None:
        h = h * scale.to(cdt)[:, :, None, None] + shift.to(cdt)[:, :, None, None]
        if silu:
            h = F.silu(h)
    if upsample:
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
    y = F.conv2d(F.pad(h, tuple(padding)), weight.to(cdt), None if bias is None else bias.to(cdt), stride=stride)
    if residual is not None:
        r = residual.to(cdt)
        if residual_upsample > 1:
            r = F.interpolate(r, scale_factor=float(residual_upsample), mode="nearest")
        y = y + r
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


def _fused_output_shape(x: Tensor, weight: Tensor, stride: int, padding: Sequence[int], upsample: bool) -> tuple:
    n, _, h, w = x.shape
    if upsample:
        return n, weight.shape[0], 2 * h, 2 * w
    return (n, weight.shape[0], conv_output_size(h, weight.shape[2], padding[2], padding[3], stride),
            conv_output_size(w, weight.shape[3], padding[0], padding[1], stride))


@torch.library.custom_op("sdvae_fast::fused_conv2d", mutates_args=())
def _fused_conv2d_op(
    x: Tensor,
    x2: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    silu: bool,
    stride: int,
    padding: list[int],
    upsample: bool,
    x2_upsample: int,
    residual_upsample: int,
    stats_groups: int,
    stats_eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    # kernels/conv.py's `_conv_kernel` with TWO_SOURCES / X2_SHIFT / RESIDUAL_SHIFT, or UPSAMPLE_2X with the
    # prologue; the reference otherwise. Statistics (N, stats_groups) are empty (N, 0) when stats_groups is 0.
    if upsample:  # the 4-phase kernel: any 3x3 weight
        runs = kernels_available(x.device) and x.dtype in _KERNEL_DTYPES and x.numel() > 0
    else:
        runs = _conv_kernel_runs(x, weight, stride)
    if runs and upsample:
        result = _conv_kernels.upsample_conv2d(x, weight, bias, scale=scale, shift=shift, silu=silu,
                                               stats_groups=stats_groups, stats_eps=stats_eps)
    elif runs:
        result = _conv_kernels.gn_silu_conv2d(
            x, weight, bias, scale, shift, residual, silu=silu, stride=stride, padding=padding,
            stats_groups=stats_groups, stats_eps=stats_eps, x2=x2, x2_upsample=x2_upsample,
            residual_upsample=residual_upsample)
    else:
        result = _fused_conv2d_reference(x, x2, weight, bias, scale, shift, residual, silu, stride, padding,
                                         upsample, x2_upsample, residual_upsample)
        if stats_groups:
            result = (result, *_output_stats(result, stats_groups, stats_eps))
    if stats_groups:
        return tuple(result)
    empty = result.new_empty((x.shape[0], 0), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return result, empty, empty.clone()


@_fused_conv2d_op.register_fake
def _(x, x2, weight, bias, scale, shift, residual, silu, stride, padding, upsample, x2_upsample,
      residual_upsample, stats_groups, stats_eps):
    y = x.new_empty(_fused_output_shape(x, weight, stride, padding, upsample))
    return y.contiguous(memory_format=torch.channels_last), *_stats_fake(x, stats_groups)


def fused_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    silu: bool = True,
    x2: Optional[Tensor] = None,
    x2_upsample: int = 1,
    upsample: bool = False,
    stride: int = 1,
    padding: Union[int, Sequence[int], None] = None,
    residual: Optional[Tensor] = None,
    residual_upsample: int = 1,
    emit_stats: Optional[tuple[int, float]] = None,
):
    """The general form of the GSC conv, one implicit GEMM: with `a = cat([x, up(x2)], dim=1)` (or x alone),

        y = conv2d(pad(U(act(a))), weight, bias, stride) + up(residual)
        act(a) = silu(a * scale + shift)  (or a * scale + shift when silu is False, or a without scale/shift)

    where U is nearest-2x upsampling when `upsample` (the 4-phase form, 3x3 weights, padding 1, stride 1) and
    up(t) nearest upsampling by `x2_upsample` / `residual_upsample`, all done by indexing inside the kernel:
    neither the concatenation, nor an upsampled tensor, nor the activation is written. The per-(sample, channel)
    scale/shift are GroupNorm folded with anything else per channel (`gn_scale_shift`, a time embedding's scale
    and shift, the consistency decoder's input normalisation); `group_norm_stats_two_sources` gives GroupNorm
    statistics over a two-source concatenation.

    Args:
        x: (N, C1, H, W), fp16/bf16/fp32/fp64, any strides.
        weight: (C_out, C1 + C2, k, k); k in {1, 3} on the kernel path (3 in upsample mode).
        bias: (C_out,) or None.
        scale, shift: (N, C1 + C2) any float dtype, both or neither.
        silu: apply SiLU after scale/shift.
        x2: (N, C2, H / x2_upsample, W / x2_upsample) in x's dtype, or None. Not with `upsample`.
        x2_upsample: a power of two, x2's nearest-upsampling factor.
        upsample: nearest-2x upsampling between the prologue and the 3x3 conv (output (N, C_out, 2H, 2W)).
        stride: 1 or 2. padding: int or (left, right, top, bottom); default k // 2 (1 in upsample mode).
        residual: (N, C_out, H_out / r, W_out / r) with r = residual_upsample (1 or 2), or None. Not with
            `upsample`.
        emit_stats: (num_groups, eps) of the GroupNorm applied to the output next, or None.
    Returns:
        (N, C_out, H_out, W_out) in x's dtype, channels_last; with `emit_stats` the pair (output, (mean, rstd)),
        each (N, num_groups) float32 (float64 for fp64 x).
    Raises:
        ValueError / TypeError naming the argument: wrong ranks, channel counts, shapes, upsampling factors,
        dtypes, or a combination the kernel has no mode for (x2 or residual with upsample).
    """
    check_image("x", x)
    if x2 is not None:
        check_image("x2", x2)
        if x2.dtype != x.dtype or x2.device != x.device:
            raise TypeError(f"x2 must be {x.dtype} on {x.device} like x, got {x2.dtype} on {x2.device}")
    for name, factor, allowed in (("x2_upsample", x2_upsample, None), ("residual_upsample", residual_upsample, (1, 2))):
        if (not isinstance(factor, int) or isinstance(factor, bool) or factor < 1 or factor & (factor - 1)
                or (allowed is not None and factor not in allowed)):
            raise ValueError(f"{name} must be {'1 or 2' if allowed else 'a power of two'}, got {factor!r}")
    if upsample and (x2 is not None or residual is not None or stride != 1):
        raise ValueError("upsample=True takes no x2, no residual and stride 1 (no kernel mode combines them)")
    c_in = x.shape[1] + (x2.shape[1] if x2 is not None else 0)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != c_in:
        raise ValueError(f"weight must be (C_out, C_in={c_in}, k, k), got {getattr(weight, 'shape', weight)}")
    if upsample and tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"upsample=True needs a 3x3 weight, got {tuple(weight.shape)}")
    n, _, h, w = x.shape
    if x2 is not None and (x2.shape[0] != n or x2.shape[2] * x2_upsample != h or x2.shape[3] * x2_upsample != w):
        raise ValueError(f"x2 must be ({n}, C2, {h}/{x2_upsample}, {w}/{x2_upsample}), got {tuple(x2.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (or both None)")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and tuple(t.shape) != (n, c_in):
            raise ValueError(f"{name} must be ({n}, {c_in}), got shape {tuple(t.shape)}")
    pad = _normalize_padding(weight.shape[-1] // 2 if padding is None else padding)
    shape = _fused_output_shape(x, weight, stride, pad, upsample)
    if min(shape[2:]) < 1:
        raise ValueError(f"x of spatial size {h}x{w} is too small for a {weight.shape[2]}x{weight.shape[3]} conv")
    if residual is not None:
        r = residual_upsample
        expected = (n, shape[1], shape[2] // r, shape[3] // r)
        if shape[2] % r or shape[3] % r or tuple(residual.shape) != expected:
            raise ValueError(f"residual must be {expected} (output {tuple(shape)} / residual_upsample {r}), "
                             f"got shape {tuple(residual.shape)}")
    groups, stats_eps = _check_emit_stats(emit_stats, weight.shape[0]) if emit_stats is not None else (0, 1e-6)
    y, mean, rstd = torch.ops.sdvae_fast.fused_conv2d(
        x, x2, weight, bias, scale, shift, residual, bool(silu), int(stride), pad, bool(upsample), int(x2_upsample),
        int(residual_upsample), groups, stats_eps)
    return y if emit_stats is None else (y, (mean, rstd))


def group_norm_stats_two_sources(x: Tensor, x2: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """GroupNorm (mean, rstd) of `cat([x, x2], dim=1)` without the concatenation; groups may straddle the two.

    With g = C/G channels per group and r = gcd(g, C1), every run of r channels lies in one group and one
    source: the statistics kernels give (count, mean, M2) per run of each source (`group_norm_partials` with
    C1/r and C2/r "groups"), and each group's g/r runs merge left to right with Chan's update
    (`merge_group_norm_partials`): a fixed order, no atomics, batch invariant.

    Args:
        x: (N, C1, H, W) and x2: (N, C2, H, W), fp16/bf16/fp32/fp64, any strides, one dtype and device.
        num_groups: G; C1 + C2 must be divisible by G. eps: added to the biased variance.
    Returns:
        (mean, rstd), each (N, G) float32 (float64 for fp64 input).
    Raises:
        ValueError / TypeError naming the argument on wrong ranks, shapes, dtypes or group counts.
    """
    import math

    check_image("x", x)
    check_image("x2", x2)
    if x2.shape[0] != x.shape[0] or x2.shape[2:] != x.shape[2:] or x2.dtype != x.dtype:
        raise ValueError(f"x2 must be (N={x.shape[0]}, C2, {x.shape[2]}, {x.shape[3]}) {x.dtype} like x, "
                         f"got {tuple(x2.shape)} {x2.dtype}")
    c1, c = x.shape[1], x.shape[1] + x2.shape[1]
    _check_groups(c, num_groups)
    run = math.gcd(c // num_groups, c1)
    first, second = group_norm_partials(x, c1 // run), group_norm_partials(x2, x2.shape[1] // run)
    n, per_group = x.shape[0], c // num_groups // run
    fields = []
    for a, b in zip(first, second):  # count, mean, m2 of every run: (N, C1/r) then (N, C2/r)
        both = a.new_empty((n, c // run))  # (N, C/r), runs in channel order; no cat op in the trace
        both[:, : c1 // run] = a
        both[:, c1 // run:] = b
        fields.append(both.view(n, num_groups, per_group))  # (N, G, g/r)
    runs = [tuple(t[:, :, j] for t in fields) for j in range(per_group)]  # each (N, G)
    return merge_group_norm_partials(runs, eps)


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------




def _attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v in fp32 (fp64 for fp64 q) via SDPA; (..., N_q, D) contiguous, in q's dtype."""
    cdt = _compute_dtype(q.dtype)
    out = F.scaled_dot_product_attention(q.to(cdt), k.to(cdt), v.to(cdt), scale=scale)
    return out.to(q.dtype).contiguous()


@torch.library.custom_op("sdvae_fast::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    # The flash kernel for head dims that are multiples of 16 up to 512 in fp16/bf16/fp32; SDPA otherwise
    # (fp64, head dim 4, no keys, or no kernel backend on this device).
    if kernels_available(q.device) and _attention_kernels.attention_supported(q) and k.shape[-2] > 0:
        return _attention_kernels.attention_forward(q, k, v, scale)
    return _attention_reference(q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v with online softmax in fp32 and O(N*D) memory (no N x N tensor).

    Runs the flash kernel of `kernels/attention.py` (FlashAttention's online softmax, output columns split
    across programs for head dims above 128) when the device has kernels and the head dim is a multiple of 16
    up to 512 in fp16/bf16/fp32; otherwise PyTorch's `scaled_dot_product_attention` in fp32 (fp64 for fp64),
    which gives the same result (head dim 4, say, falls back without error).

    Args:
        q: (B, N_q, D) or (B, H, N_q, D).
        k, v: (B, N_kv, D) or (B, H, N_kv, D), same shape as each other, same rank, batch, heads and head dim
            as q. Any strides: views into a larger tensor (e.g. the channels_last qkv projection) are read in
            place. fp16/bf16/fp32/fp64, all one dtype, on one device.
        scale: softmax scale, default D**-0.5.
    Returns:
        Same shape and dtype as q, contiguous.
    Raises:
        TypeError: an argument is not a tensor, or dtypes/devices differ or are not floating point.
        ValueError: naming the argument, on wrong ranks or mismatched shapes.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be (B, N, D) or (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES or t.dtype != q.dtype or t.device != q.device:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64 with q's dtype and device "
                f"({q.dtype}, {q.device}), got {t.dtype} on {t.device}"
            )
    if k.shape != v.shape or q.dim() != k.dim() or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q, k, v must share rank, batch, heads and head dim (k and v the same shape), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.sdvae_fast.attention(q, k, v, float(scale))


# ---------------------------------------------------------------------------------------------------------------
# Vector quantisation (VQ autoencoders)
# ---------------------------------------------------------------------------------------------------------------

#: Pixels per chunk of the PyTorch reference, which materialises (chunk x K) distances only.
_VQ_REFERENCE_CHUNK = 4096


def _vector_quantize_reference(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's arithmetic in PyTorch (fp32, fp64 for fp64): `argmin_j ||e_j||^2 - 2 z.e_j` per pixel in
    chunks of pixels (first index on exact ties, as `torch.argmin`), then `z + (e - z)` in z's dtype.
    Returns (z_q (N, D, H, W) contiguous, indices (N, H, W) int64)."""
    n, dim, height, width = z.shape
    cdt = _compute_dtype(z.dtype)
    flat = z.permute(0, 2, 3, 1).reshape(-1, dim)  # (N*H*W, D)
    e = codebook.to(cdt)
    norms = (e * e).sum(dim=1)  # (K,)
    indices = torch.empty(flat.shape[0], dtype=torch.int64, device=z.device)
    for start in range(0, flat.shape[0], _VQ_REFERENCE_CHUNK):
        rows = flat[start:start + _VQ_REFERENCE_CHUNK].to(cdt)
        indices[start:start + rows.shape[0]] = torch.argmin(norms[None, :] - 2.0 * (rows @ e.T), dim=1)
    chosen = codebook[indices].to(z.dtype)  # (N*H*W, D)
    z_q = flat + (chosen - flat)
    return (z_q.view(n, height, width, dim).permute(0, 3, 1, 2).contiguous(),
            indices.view(n, height, width))


@torch.library.custom_op("sdvae_fast::vector_quantize", mutates_args=())
def _vector_quantize_op(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    # One Triton launch (GEMM distances, argmin epilogue, gather) where kernels run; the reference otherwise
    # (fp64, or no kernel backend on this device).
    if kernels_available(z.device) and z.dtype in _KERNEL_DTYPES:
        return _vq_kernels.vector_quantize(z, codebook)
    return _vector_quantize_reference(z, codebook)


@_vector_quantize_op.register_fake
def _(z, codebook):
    n, _, height, width = z.shape
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty((n, height, width), dtype=torch.int64))


def vector_quantize(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest codebook row per latent pixel and the quantised latents, as diffusers' VectorQuantizer computes
    them (`argmin(cdist(z, E))`, then `z + (E[idx] - z)`), without the (pixels x K) distance matrix.

    Runs `kernels/vector_quantize.py` (one launch: fp32 distances `||e||^2 - 2 z.e` as a GEMM, the argmin in
    its epilogue, the row gathered in the same program) on CUDA or under the interpreter for fp16/bf16/fp32;
    the same arithmetic in PyTorch otherwise. Indices equal diffusers' wherever the best and second-best
    distances differ by more than fp32 rounding; the lowest index on exact ties.

    Args:
        z: latents (N, D, H, W), fp16/bf16/fp32/fp64, any strides.
        codebook: (K, D) codebook (`quantize.embedding.weight`), z's dtype and device, K >= 1.
    Returns:
        (z_q, indices): z_q (N, D, H, W) contiguous NCHW in z's dtype; indices (N, H, W) int64.
    Raises:
        TypeError: z or codebook is not a float tensor, or their dtypes differ.
        ValueError: z is not 4-D, codebook is not 2-D or empty, its width is not D, or the devices differ.
    """
    check_image("z", z)
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if codebook.dim() != 2 or codebook.shape[0] == 0:
        raise ValueError(f"codebook must be 2-D (K, D) with K >= 1, got shape {tuple(codebook.shape)}")
    if codebook.shape[1] != z.shape[1]:
        raise ValueError(f"codebook must be (K, {z.shape[1]}) to match z's {z.shape[1]} channels, got shape "
                         f"{tuple(codebook.shape)}")
    if codebook.dtype != z.dtype:
        raise TypeError(f"codebook must have z's dtype {z.dtype}, got {codebook.dtype}")
    if codebook.device != z.device:
        raise ValueError(f"codebook must be on z's device {z.device}, got {codebook.device}")
    return torch.ops.sdvae_fast.vector_quantize(z, codebook)
