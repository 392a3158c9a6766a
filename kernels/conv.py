"""Implicit-GEMM 2-D convolution in Triton with GroupNorm + SiLU fused into its prologue (the VAE's GSC unit),
bias and residual fused into its epilogue, and a nearest-2x-upsample mode that never writes the upsampled tensor.

Math (one kernel, `_conv_kernel`). For output pixel (n, oh, ow) and output channel co,

    y[n, co, oh, ow] = bias[co] + residual[n, co, oh, ow]
                       + sum_{kh, kw, ci} W[co, ci, kh, kw] * a[n, ci, ih, iw],
    ih = oh*stride - pad_top + kh,  iw = ow*stride - pad_left + kw

with `a = silu(x * scale[n, ci] + shift[n, ci])` inside the image and `a = 0` in the padding: the conv pads the
*normalised, activated* tensor, so the padding mask is applied after the prologue. `scale = rstd * gamma` and
`shift = beta - mean * rstd * gamma` come from the GroupNorm statistics (`sdvae_fast.ops.gn_scale_shift`).
As a GEMM: M = H_out*W_out output pixels per image (one grid axis per image, so no tile spans two images),
N_gemm = C_out, K = KH*KW*C_in ordered (tap, channel). A tiles are gathered from NHWC activations (any strides,
passed at run time); B tiles come from the weight packed once into a K-major (K, C_out) matrix. Accumulation is
fp32 (`tl.dot`), the epilogue adds bias and residual in fp32 and stores in the output's dtype into an
(N, C_out, H_out, W_out) tensor of any strides (the launcher allocates channels_last).

Upsample mode (`UPSAMPLE_2X`): `conv3x3(nearest_upsample_2x(x), pad 1)` equals four 2x2 convolutions on the
low-resolution x, one per output phase (a, b) = (row parity, column parity) of output pixel (2i+a, 2j+b). The
three taps of the 3x3 kernel read upsampled rows 2i+a-1, 2i+a, 2i+a+1, i.e. input rows (i-1, i, i) for a = 0 and
(i, i, i+1) for a = 1, so the row weights fold to (w0, w1 + w2) read at rows (i-1, i) and to (w0 + w1, w2) read
at rows (i, i+1); columns likewise (`fold_upsample_weight`). This is exact at the borders too: the zero row -1 of
the upsampled tensor maps to input row -1, the zero row 2H to input row H, both padding here as well. Each
phase is a 2x2 conv with padding top = 1 - a, left = 1 - b, so K = 4*C_in instead of 9*C_in (2.25x fewer FLOPs)
and the 4x larger upsampled tensor is never stored. (Sub-pixel decomposition; the fold is checked in fp64 to
1e-14 in tests/test_upsample_conv.py.)

UNet modes (the consistency decoder, issue 13). Two sources (`TWO_SOURCES`): the conv's input is
`cat([x, x2], dim=1)` with x holding channels [0, C_in1); the K loop visits cdiv(C_in1, BLOCK_K) channel blocks of
x, then those of x2, so no block straddles the two and each step loads from one tensor (base pointer, row offsets
and channel stride chosen by one scalar comparison); the weight rows and the prologue's scale/shift are indexed by
the channel of the concatenation. `X2_SHIFT` = s reads x2 at 1/2^s of x's resolution, input pixel (ih, iw) taking
x2[ih >> s, iw >> s] (nearest upsampling by indexing; conv_in's 8x-upsampled latents). `RESIDUAL_SHIFT` = 1 reads
the residual at half the output's resolution, output pixel (oh, ow) adding residual[oh >> 1, ow >> 1] (an
upsampling ResNet's skip path). Upsample mode also takes the GroupNorm + SiLU prologue: the activation is per
pixel, so applying it to the low-resolution input before the (index-only) nearest upsampling is exact.

Emitted GroupNorm statistics (`EMIT_STATS`, `stats_groups` in the launchers): the epilogue also reduces the
stored tile (values rounded to the output dtype, exactly what a later statistics pass would read) to a (count,
mean, M2) triple per run of STATS_GS channels (a power of two dividing C/G, so a run never straddles a group or a
channel tile): per column the tile mean and the M2 centred on it, then Chan's merge of the run's columns
(`kernels._jit.chan_reduce`). `group_norm.merge_partial_stats` merges the triples of each (image, group) in a fixed
order: deterministic, no atomics, batch invariant (tiles never span two images); with `stats_partials` it also
returns the merged (count, mean, M2) of each (image, group), which partials of other image bands merge with
(`group_norm.merge_group_norm_partials`). Without a shared shift the fp32 partial means round at
|mean| scale, so rstd is accurate to about 1e-7 * |mean| / std relative (the separate statistics pass, which
subtracts a shift first, stays exact for any mean).

Supported: x fp16, bf16 or fp32 (CUDA, or CPU under TRITON_INTERPRET=1); square 1x1 or 3x3 weights, stride 1 or
2, any non-negative asymmetric padding (left, right, top, bottom); upsample mode with 3x3 weights. The weight is
cast to x's dtype when packed. `sdvae_fast.ops` falls back to the PyTorch reference for everything else (fp64,
other kernel sizes or strides, CPU without the interpreter).

Prologue (`SILU_MODE`, `EVEN_K`; kernels/gsc_prologue.py): on the GPU the SiLU is `h + h * tanh.approx(h)` with
h = x * scale/2 + shift/2, one MUFU per element instead of `tl.sigmoid`'s two plus range checks (absolute error
<= 2^-12 |y|, tested with an emulated tanh under the interpreter); the interpreter keeps the exact `tl.sigmoid`
arithmetic, so CPU results are bitwise those of before. `EVEN_K` (C_in a multiple of every BLOCK_K) drops the
channel mask. Static sm_90 counts before and after: docs/cost_model.md.

Precision: fp16/bf16 operands go to the tensor cores directly, accumulating in fp32. For fp32 inputs the dot's
`input_precision` follows PyTorch's own switch for convolutions, `torch.backends.cudnn.allow_tf32` (True by
default): "tf32" when it is on, so the kernel matches what eager fp32 convs do on the same GPU (relative L2
errors of about 1e-3 at K in the thousands), and "ieee" (exact fp32) when it is off. Under the interpreter fp32
dots are exact either way, bf16/fp16 dot operands are upcast to fp32 (`DOT_FP32`), since bf16 arithmetic is
wrong there, and bf16 outputs are rounded to nearest even explicitly before the store (`ROUND_TO_BF16`), since
the interpreter's fp32 -> bf16 conversion truncates where the GPU rounds.

Large tensors (a 4096^2 decode has activations of 2^31 and 2^32 elements): each program addresses every
activation, residual and output through an int64 scalar pointer to its tile's first pixel, and offsets within
the tile in int32, which is exact while one tile's span of a tensor stays below 2^31 elements (always for
channels_last activations). When it may not (huge channel strides), the launcher sets `WIDE_OFFSETS` and the
tile offsets are int64 too. Measured on the sm_90 compile (triton 3.9, `cuobjdump -res-usage`, bf16 3x3 GSC
with residual, 128x128x64 tiles, 8 warps): int64 tile offsets used 255 registers and spilled 1.9 KiB per thread
(1.4-7.8 KiB across CONV_CONFIGS); int32 ones fit the registers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from sdvae_fast.kernels import group_norm
from sdvae_fast.kernels._common import (
    INTERPRET,
    SUPPORTED_DTYPES,
    check_image_input,
    check_tensor,
    conv_output_size,
    prune_configs,
    derived_weights,
    launch,
    require_kernels,
)
from sdvae_fast.kernels._jit import chan_reduce, round_to_bf16
from sdvae_fast.kernels import gsc_prologue
from sdvae_fast.kernels.gsc_prologue import normalize_silu

SUPPORTED_KERNEL_SIZES = (1, 3)
SUPPORTED_STRIDES = (1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Autotune configurations: declared here only. The first is the known-good default and the one the interpreter
# runs; on the GPU the autotuner times those that suit the output width and fit the shared memory (`_prune`).
# ---------------------------------------------------------------------------------------------------------------


def _config(block_m, block_n, block_k, num_warps, num_stages):
    """One autotune candidate: tile sizes of the GEMM (BLOCK_M pixels x BLOCK_N channels, BLOCK_K per step)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                         num_warps=num_warps, num_stages=num_stages)


# Each fits the sm_90 register file: for the heaviest variant (3x3 GSC + residual + emitted statistics, bf16) the
# first spills 160 bytes per thread with triton 3.9 (224 with 3.6), the 128x128x32 one 128 (136), the rest at most
# 32, most none (tests/test_conv.py checks <= 256). Larger tiles (128x256, 256x128, 128x128 on 4 warps) spilled
# 1-3 KiB per thread and were dropped. (128x256x64, the static cost model's best tile for C_out >= 256 with the tanh
# prologue, spills 184 bytes when compiled with the JIT's own specialisation of a VAE launch, but 2.6 KiB in the
# less aligned specialisation tests/test_conv.py checks: docs/cost_model.md.)
CONV_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(64, 128, 64, 8, 3),
    _config(128, 128, 32, 8, 4),
    _config(64, 256, 64, 8, 3),
    _config(64, 64, 64, 4, 3),
    _config(128, 16, 64, 8, 3),  # narrow outputs: conv_out to 3 channels, quant convs
    _config(64, 32, 64, 4, 3),
]
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in CONV_CONFIGS)
_MAX_BLOCK_M = max(c.kwargs["BLOCK_M"] for c in CONV_CONFIGS)
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in CONV_CONFIGS)
_MAX_BLOCK_K = max(c.kwargs["BLOCK_K"] for c in CONV_CONFIGS)
assert all(_MAX_BLOCK_K % c.kwargs["BLOCK_K"] == 0 for c in CONV_CONFIGS)  # EVEN_K holds for every config

#: Tests set this to a `gsc_prologue` SiLU mode (2: the GPU's tanh formula with an accurate tanh, 3: with a tanh
#: worse than the GPU's) to run the GPU arithmetic under the interpreter; None: `silu_mode()` decides.
SILU_MODE_OVERRIDE: Optional[int] = None


def silu_mode() -> int:
    """The prologue's SiLU (`kernels/gsc_prologue.py`): one MUFU.TANH per element on the GPU (mode 1), the exact
    `tl.sigmoid` arithmetic under the interpreter (mode 0, which cannot run inline PTX), or the tests' override."""
    if SILU_MODE_OVERRIDE is not None:
        return SILU_MODE_OVERRIDE
    return gsc_prologue.SILU_EXACT if INTERPRET else gsc_prologue.SILU_TANH_APPROX


def _smem_bytes(config: triton.Config, elem_bytes: int) -> int:
    """Shared memory of one program: num_stages buffers of an A and a B tile and of the fp32 scale/shift."""
    kw = config.kwargs
    tiles = (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elem_bytes
    return config.num_stages * (tiles + 2 * kw["BLOCK_K"] * 4)


_NARROW_BLOCK_N = 32  # configs with BLOCK_N up to this serve outputs of at most this many channels, and only them


def configs_for_width(configs, c_out: int) -> list:
    """The candidates worth timing for C_out output channels: the narrow tiles for C_out <= 32 (conv_out to 3
    channels, the quant convs), otherwise the wide ones whose BLOCK_N does not pass max(128, C_out). Fewer
    candidates keep a fresh machine's autotuning (one compile per config and kernel variant) short."""
    if c_out <= _NARROW_BLOCK_N:
        return [c for c in configs if c.kwargs["BLOCK_N"] <= _NARROW_BLOCK_N]
    return [c for c in configs if _NARROW_BLOCK_N < c.kwargs["BLOCK_N"] <= max(128, c_out)]


def _prune(configs, named_args, **kwargs):
    """early_config_prune hook: the configs for this output width that fit the device's shared memory (only the
    first config when interpreting)."""
    x = named_args["x_ptr"]
    candidates = configs_for_width(configs, named_args["C_out"]) or configs
    return prune_configs(candidates, lambda c: _smem_bytes(c, x.element_size()), x.device)


@triton.jit
def _index(x, WIDE_OFFSETS: tl.constexpr):
    """Index vectors enter offset arithmetic as int64 when WIDE_OFFSETS, else as they are (int32)."""
    if WIDE_OFFSETS:
        return x.to(tl.int64)
    else:
        return x


@triton.autotune(
    # The interpreter gets the default config alone: Triton < 3.8 benchmarks even when pruning leaves one
    # config, which needs a GPU driver ("0 active drivers" on CPU).
    configs=CONV_CONFIGS[:1] if INTERPRET else CONV_CONFIGS,
    # Per-sample sizes and the mode only (never the batch), so an image runs the same tiles alone or in a batch.
    key=["C_in", "H", "W", "C_out", "H_out", "W_out", "stride", "KH", "APPLY_GN", "UPSAMPLE_2X", "C_in1",
         "TWO_SOURCES", "X2_SHIFT"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, stats_ptr, tiles_ptr,
    C_in, H, W, C_out, H_out, W_out, M,
    sxn, sxc, sxh, sxw,
    srn, src, srh, srw,
    son, soc, soh, sow,
    stride, pad_left, pad_top,
    KH: tl.constexpr, KW: tl.constexpr,
    APPLY_GN: tl.constexpr, APPLY_SILU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    UPSAMPLE_2X: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr, EMIT_STATS: tl.constexpr, STATS_GS: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SILU_MODE: tl.constexpr = 0, EVEN_K: tl.constexpr = False,
    x2_ptr=None, C_in1=0, sx2n=0, sx2c=0, sx2h=0, sx2w=0,
    TWO_SOURCES: tl.constexpr = False, X2_SHIFT: tl.constexpr = 0, RESIDUAL_SHIFT: tl.constexpr = 0,
):
    """Grid (tiles_m * tiles_n [* 4 phases], N). H_out, W_out: the GEMM's output grid per image and phase;
    M = H_out * W_out.

    w_ptr: packed weight, (KH*KW*C_in, C_out) row-major, K ordered (kh, kw, ci); in upsample mode four such
    matrices, one per phase. scale/shift: (N, C_in) fp32 contiguous. Program order puts the output-channel
    tiles (and the phases) of one pixel tile next to each other, so its input rows are re-read from L2.

    Addressing: each tensor's tile base (image, first pixel of the tile) is an int64 scalar pointer; offsets
    inside the tile are int32 (`WIDE_OFFSETS` False), or int64 when the launcher found that a tile's span of some
    tensor can pass 2^31 elements (`_needs_wide_offsets`: huge channel strides, never for our channels_last
    activations). Wide tile offsets cost about 2 KiB of register spills per thread on sm_90.

    EMIT_STATS: also write GroupNorm partials of the stored output, one (count, mean, M2) triple per (image,
    run of STATS_GS channels, row tile), to stats_ptr as (N, C_out/STATS_GS, T, 3) fp32 with T the number of row
    tiles (tiles_m, times 4 phases in upsample mode), and T itself to tiles_ptr (int32, one element).
    """
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(C_out, BLOCK_N)
    pid_n = pid % tiles_n
    rest = pid // tiles_n
    if UPSAMPLE_2X:
        phase = rest % 4
        pid_m = rest // 4
        phase_a = phase // 2  # output row parity
        phase_b = phase % 2  # output column parity
        top = 1 - phase_a
        left = 1 - phase_b
        w_base = w_ptr + phase * (KH * KW * C_in) * C_out
    else:
        pid_m = rest
        top = pad_top
        left = pad_left
        w_base = w_ptr

    # Output pixels of this tile (per image and phase, < 2^31) and their position relative to its first pixel.
    m0 = pid_m * BLOCK_M
    oh0 = m0 // W_out
    ow0 = m0 % W_out
    offs_m = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) output pixel oh*W_out + ow
    m_mask = offs_m < M
    oh = offs_m // W_out
    ow = offs_m % W_out
    d_oh = _index(oh - oh0, WIDE_OFFSETS)  # (BLOCK_M,) rows after the tile's first row (can reach BLOCK_M)
    d_ow = _index(ow - ow0, WIDE_OFFSETS)  # (BLOCK_M,) columns from the tile's first column (can be < 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output channel
    n_mask = offs_n < C_out
    lane_k = tl.arange(0, BLOCK_K)

    # Input tile base: image n, row ih0, column iw0 (may sit in the padding). Tap (kh, kw) of output pixel
    # (oh, ow) reads input pixel (ih0 + r_h + kh, iw0 + r_w + kw); the padding mask compares with scalar bounds.
    ih0 = oh0 * stride - top
    iw0 = ow0 * stride - left
    x_tile = x_ptr + n * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
    r_h = d_oh * stride  # (BLOCK_M,)
    r_w = d_ow * stride
    r_off = r_h * sxh + r_w * sxw  # (BLOCK_M,) offset of tap (0, 0) from x_tile
    scale_img = scale_ptr + n * C_in
    shift_img = shift_ptr + n * C_in
    if TWO_SOURCES:
        # Channels [0, C_in1) come from x, [C_in1, C_in) from x2 (the concatenation is never written). Channel
        # blocks never straddle the two: cdiv(C_in1, BLOCK_K) blocks of x, then those of x2, so each K step
        # reads one source through a selected base pointer, row offsets and channel stride.
        c_blocks1 = tl.cdiv(C_in1, BLOCK_K)
        c_blocks = c_blocks1 + tl.cdiv(C_in - C_in1, BLOCK_K)
        if X2_SHIFT == 0:
            # x2 has x's resolution: a tile base and row offsets of its own.
            x2_base = x2_ptr + n * sx2n + ih0.to(tl.int64) * sx2h + iw0.to(tl.int64) * sx2w
            r_off2 = r_h * sx2h + r_w * sx2w  # (BLOCK_M,)
        else:
            # x2 at 1/2^X2_SHIFT of x's resolution, nearest-upsampled by indexing: input pixel (ih, iw) reads
            # x2[ih >> X2_SHIFT, iw >> X2_SHIFT]; offsets from the image's first pixel (x2 is small).
            x2_base = x2_ptr + n * sx2n
    else:
        c_blocks = tl.cdiv(C_in, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat K loop over (tap, channel block), so the GPU pipelines across taps as well.
    for t in range(0, KH * KW * c_blocks):
        tap = t // c_blocks
        block = t % c_blocks
        kh = tap // KW
        kw = tap % KW
        pix_ok = (m_mask & (r_h + kh >= -ih0) & (r_h + kh < H - ih0)
                  & (r_w + kw >= -iw0) & (r_w + kw < W - iw0))
        if TWO_SOURCES:
            first = block < c_blocks1
            c_local = tl.where(first, block, block - c_blocks1) * BLOCK_K + lane_k  # (BLOCK_K,) source channel
            ci = c_local + tl.where(first, 0, C_in1)  # (BLOCK_K,) channel of the concatenation
            if EVEN_K:
                k_mask = tl.full([BLOCK_K], 1, tl.int1)  # both sources' channels are multiples of BLOCK_K
            else:
                k_mask = ci < tl.where(first, C_in1, C_in)
            if X2_SHIFT == 0:
                rows2 = r_off2 + (kh * sx2h + kw * sx2w)
            else:
                rows2 = (((ih0 + r_h + kh) >> X2_SHIFT) * sx2h
                         + ((iw0 + r_w + kw) >> X2_SHIFT) * sx2w)  # (BLOCK_M,) masked where in the padding
            src_tile = tl.where(first, x_tile, x2_base)
            rows = tl.where(first, r_off + (kh * sxh + kw * sxw), rows2)  # (BLOCK_M,)
            c_stride = tl.where(first, sxc, sx2c)
        else:
            ci = block * BLOCK_K + lane_k  # (BLOCK_K,) input channel
            c_local = ci
            if EVEN_K:
                k_mask = tl.full([BLOCK_K], 1, tl.int1)  # C_in is a multiple of BLOCK_K: no ragged channel block
            else:
                k_mask = ci < C_in
            src_tile = x_tile
            rows = r_off + (kh * sxh + kw * sxw)
            c_stride = sxc
        a_mask = pix_ok[:, None] & k_mask[None, :]
        a_offs = rows[:, None] + (_index(c_local, WIDE_OFFSETS) * c_stride)[None, :]
        a = tl.load(src_tile + a_offs, mask=a_mask, other=0.0)  # (BLOCK_M, BLOCK_K)
        if APPLY_GN:
            sc = tl.load(scale_img + ci, mask=k_mask, other=0.0)
            sh = tl.load(shift_img + ci, mask=k_mask, other=0.0)
            a = normalize_silu(a, sc, sh, APPLY_SILU, SILU_MODE)  # fp32; SILU_MODE: kernels/gsc_prologue.py
            # Padded taps are zeros of the normalised tensor: mask after the prologue.
            a = tl.where(a_mask, a, 0.0)
        k_rows = tap * C_in + ci  # (BLOCK_K,) row of the packed weight (the weight has < 2^31 elements)
        b = tl.load(w_base + k_rows[:, None] * C_out + offs_n[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            a = a.to(w_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # Epilogue in fp32: + bias, + residual, then a store that casts to the output's dtype.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if UPSAMPLE_2X:
        # Output pixel (2*oh + a, 2*ow + b): the tile starts at (2*oh0 + a, 2*ow0 + b) and steps by 2.
        out_h0 = oh0 * 2 + phase_a
        out_w0 = ow0 * 2 + phase_b
        d_out_h = d_oh * 2
        d_out_w = d_ow * 2
    else:
        out_h0 = oh0
        out_w0 = ow0
        d_out_h = d_oh
        d_out_w = d_ow
    mask = m_mask[:, None] & n_mask[None, :]
    c_out_idx = _index(offs_n, WIDE_OFFSETS)
    if HAS_RESIDUAL:
        # RESIDUAL_SHIFT: the residual is at 1/2^RESIDUAL_SHIFT of the output's resolution, nearest-upsampled
        # by indexing (an upsampling ResNet's skip path): output pixel (oh, ow) reads (oh >> s, ow >> s).
        res_h0 = out_h0 >> RESIDUAL_SHIFT
        res_w0 = out_w0 >> RESIDUAL_SHIFT
        d_res_h = ((out_h0 + d_out_h) >> RESIDUAL_SHIFT) - res_h0  # (BLOCK_M,)
        d_res_w = ((out_w0 + d_out_w) >> RESIDUAL_SHIFT) - res_w0
        r_tile = res_ptr + n * srn + res_h0.to(tl.int64) * srh + res_w0.to(tl.int64) * srw
        r_offs = (d_res_h * srh + d_res_w * srw)[:, None] + (c_out_idx * src)[None, :]  # (BLOCK_M, BLOCK_N)
        acc += tl.load(r_tile + r_offs, mask=mask, other=0.0).to(tl.float32)
    if ROUND_TO_BF16:
        # The interpreter truncates fp32 -> bf16 on store (the GPU rounds to nearest even).
        acc = round_to_bf16(acc)
    o_tile = out_ptr + n * son + out_h0.to(tl.int64) * soh + out_w0.to(tl.int64) * sow
    o_offs = (d_out_h * soh + d_out_w * sow)[:, None] + (c_out_idx * soc)[None, :]  # (BLOCK_M, BLOCK_N)
    tl.store(o_tile + o_offs, acc, mask=mask)

    if EMIT_STATS:
        # GroupNorm partials of the tile as stored (rounded to the output dtype), so the next unit's statistics
        # need no pass over the tensor. Per column: mean and centred M2 over the tile's valid rows; then the
        # STATS_GS columns of each run merge with Chan's update in a pairwise tree (`chan_reduce`).
        # Only the row mask: columns past C_out hold zeros and their runs are not stored.
        v = tl.where(m_mask[:, None], acc.to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)
        rows = tl.minimum(M - m0, BLOCK_M).to(tl.float32)
        col_mean = tl.sum(v, axis=0) / rows  # (BLOCK_N,)
        d = tl.where(m_mask[:, None], v - col_mean[None, :], 0.0)
        col_m2 = tl.sum(d * d, axis=0)  # (BLOCK_N,)
        col_mean = tl.reshape(col_mean, (BLOCK_N // STATS_GS, STATS_GS))  # (runs, STATS_GS)
        col_m2 = tl.reshape(col_m2, (BLOCK_N // STATS_GS, STATS_GS))  # (runs, STATS_GS)
        run_count, run_mean, run_m2 = chan_reduce(tl.zeros_like(col_mean) + rows, col_mean, col_m2)  # (runs,)
        runs = C_out // STATS_GS
        num_tiles = tl.num_programs(0) // tiles_n  # T: tiles_m (x 4 phases)
        run = pid_n * (BLOCK_N // STATS_GS) + tl.arange(0, BLOCK_N // STATS_GS).to(tl.int64)  # (runs,)
        s_offs = ((n * runs + run) * num_tiles + rest) * 3
        run_mask = run < runs
        tl.store(stats_ptr + s_offs, run_count, mask=run_mask)
        tl.store(stats_ptr + s_offs + 1, run_mean, mask=run_mask)
        tl.store(stats_ptr + s_offs + 2, run_m2, mask=run_mask)
        # T for the merge kernel, from program (0, 0): a predicated store (a branch here made ptxas spill).
        tl.store(tiles_ptr, num_tiles.to(tl.int32), mask=pid + n == 0)


# ---------------------------------------------------------------------------------------------------------------
# Weight packing, cached per weight tensor
# ---------------------------------------------------------------------------------------------------------------


def pack_conv_weight_reference(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, KH, KW) -> (KH*KW*C_in, C_out), K ordered (kh, kw, ci): the kernel's B matrix."""
    c_out = weight.shape[0]
    return weight.permute(2, 3, 1, 0).reshape(-1, c_out)  # (KH*KW*C_in, C_out)


def fold_upsample_weight(weight: torch.Tensor) -> torch.Tensor:
    """Fold a 3x3 kernel applied after nearest-2x upsampling into four 2x2 kernels on the input.

    Args:
        weight: (C_out, C_in, 3, 3), any float dtype (the sums are taken in that dtype; fold in fp64/fp32 and
            cast after for low-precision weights).
    Returns:
        (2, 2, C_out, C_in, 2, 2): [a, b] is the 2x2 kernel of output phase (row parity a, column parity b),
        read at input rows (i - 1 + a, i + a) and columns (j - 1 + b, j + b) for output pixel (2i+a, 2j+b).
        Row weights fold to (w0, w1 + w2) for a = 0 and (w0 + w1, w2) for a = 1; columns likewise.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be (C_out, C_in, 3, 3), got shape {tuple(weight.shape)}")
    w0, w1, w2 = weight[:, :, 0], weight[:, :, 1], weight[:, :, 2]  # rows, each (C_out, C_in, 3)
    rows = (torch.stack((w0, w1 + w2), dim=2), torch.stack((w0 + w1, w2), dim=2))  # each (C_out, C_in, 2, 3)
    phases = []
    for r in rows:
        c0, c1, c2 = r[..., 0], r[..., 1], r[..., 2]  # columns, each (C_out, C_in, 2)
        phases.append(torch.stack((torch.stack((c0, c1 + c2), dim=3), torch.stack((c0 + c1, c2), dim=3))))
    return torch.stack(phases)  # (2, 2, C_out, C_in, 2, 2)


def _pack_weight(weight: torch.Tensor, dtype: torch.dtype, upsample: bool) -> torch.Tensor:
    """`weight` packed for the GEMM: (KH*KW*C_in, C_out), or for the upsample phases (4, 4*C_in, C_out).

    Cached in the shared `derived_weights` (kernels/_common.py): packed once per weight tensor, version and dtype.
    """
    def build():
        w = weight.detach()
        if not upsample:
            return pack_conv_weight_reference(w).to(dtype).contiguous()
        # Fold in fp64 (exact sums of two weights) and round once to the kernel's dtype.
        folded = fold_upsample_weight(w.to(torch.float64))  # (2, 2, C_out, C_in, 2, 2)
        packed = folded.permute(0, 1, 4, 5, 3, 2).reshape(4, -1, w.shape[0])  # (phase, 2*2*C_in, C_out)
        return packed.to(dtype).contiguous()

    return derived_weights.get((weight,), ("upsample_pack" if upsample else "conv_pack", dtype), build)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: fp32 follows torch.backends.cudnn.allow_tf32 (see the module docstring)."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _check_tensor(name: str, t, shape: tuple, device) -> None:
    """Raise naming `name` unless t is a floating-point tensor of `shape` on `device` (the shared checker)."""
    check_tensor(name, t, floating=True, shape=shape, device=device)


def _output(out: Optional[torch.Tensor], shape: tuple, x: torch.Tensor) -> torch.Tensor:
    """A new channels_last output of `shape` in x's dtype, or the caller's `out` after checking it matches."""
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    _check_tensor("out", out, shape, x.device)
    if out.dtype != x.dtype:
        raise TypeError(f"out must be {x.dtype} like x, got {out.dtype}")
    return out


def _check_stats_groups(c_out: int, stats_groups: int, stats_partials: bool = False) -> None:
    """Raise naming both numbers unless stats_groups is 0 (no statistics) or divides C_out; stats_partials needs
    statistics."""
    if not isinstance(stats_groups, int) or stats_groups < 0 or (stats_groups and c_out % stats_groups):
        raise ValueError(f"C_out ({c_out}) must be divisible by stats_groups ({stats_groups}), or stats_groups 0")
    if stats_partials and not stats_groups:
        raise ValueError("stats_partials needs stats_groups > 0 (partials of the emitted statistics)")


def _prepare_input(x: torch.Tensor) -> torch.Tensor:
    """On CUDA, gather NCHW or other channel-strided inputs into channels_last once (coalesced A loads)."""
    if (x.is_cuda or x.is_meta) and x.stride(1) != 1:  # meta: a warmup recording of a CUDA run
        return x.contiguous(memory_format=torch.channels_last)
    return x


def stats_run_size(channels_per_group: int) -> int:
    """STATS_GS: channels per partial-statistics run, the largest power of two dividing `channels_per_group` up to
    the narrowest BLOCK_N of CONV_CONFIGS, so runs never straddle a group or an output-channel tile."""
    run = 1
    while channels_per_group % (2 * run) == 0 and 2 * run <= _MIN_BLOCK_N:
        run *= 2
    return run


def _needs_wide_offsets(x, residual, out, w_out: int, stride: int, kh: int, upsample: bool, x2=None,
                        x2_shift: int = 0) -> bool:
    """Whether some tile's offsets relative to its int64 base may pass int32 (then the kernel uses int64 ones).

    A tile of at most `_MAX_BLOCK_M` output pixels spans `_MAX_BLOCK_M // W_out + 2` output rows (per phase),
    hence about `stride` times that plus the taps in input rows (doubled in output rows in upsample mode), any
    column of its tensor and any channel. Channels_last activations stay far below 2^31 (a 4096^2 image with
    256 channels: about 2^29); huge channel strides (NCHW at 4096^2) do not.
    """
    rows = _MAX_BLOCK_M // w_out + 2

    def span(t, t_rows):
        _, c, h, w = t.shape
        _, sc, sh, sw = (abs(s) for s in t.stride())
        return min(h + 2, t_rows) * sh + (w + 2) * sw + c * sc

    spans = [span(x, rows * stride + kh)]
    spans += [span(t, rows * (2 if upsample else 1)) for t in (residual, out) if t is not None]
    if x2 is not None:
        # The same rows as x's at x's resolution; offsets from the image's first pixel when upsampled by index.
        spans.append(span(x2, x2.shape[2] if x2_shift else rows * stride + kh))
    return max(spans) >= 2**31


def _launch(*, x, packed, out, h_out, w_out, kernel_size, bias=None, scale=None, shift=None, residual=None,
            silu=False, stride=1, pad_left=0, pad_top=0, upsample=False, stats_groups=0, stats_eps=1e-6,
            stats_partials=False, x2=None, x2_shift=0, residual_shift=0):
    """Launch `_conv_kernel` on validated arguments; unused pointers get a placeholder tensor (never read).

    Keyword-only. x: the (prepared) input; packed: the packed weight, (K, C_out) or (4, K, C_out) in upsample
    mode; out: the output tensor; h_out, w_out: the GEMM's output grid per image (and phase); kernel_size: KH =
    KW of the packed weight (2 for the upsample phases); scale/shift: fp32 (N, C_in) or None (no
    normalisation); pad_left/pad_top: the padding (set per phase inside the kernel in upsample mode);
    x2: the second source (channels C_in1.. of the concatenation, x holding the first C_in1) or None, read at
    1/2^x2_shift of x's resolution; residual_shift: the residual is at 1/2^residual_shift of the output's.
    Returns out, or (out, mean, rstd) of out's GroupNorm statistics when `stats_groups` > 0, with the merged
    raw `GroupNormPartials` appended when `stats_partials`.
    """
    kh = kw = kernel_size
    n, c_in, h, w = x.shape
    c_in1 = c_in
    if x2 is not None:
        c_in += x2.shape[1]
    c_out = packed.shape[-1]
    res = residual if residual is not None else out  # placeholder pointer, never read
    gs = 1
    partials = tiles = packed  # placeholders, never touched unless EMIT_STATS
    if stats_groups:
        gs = stats_run_size(c_out // stats_groups)
        # Sized for the most row tiles any config makes; the kernel writes T of them and T itself to `tiles`.
        max_tiles = triton.cdiv(h_out * w_out, _MIN_BLOCK_M) * (4 if upsample else 1)
        partials = torch.empty(n * (c_out // gs) * max_tiles * 3, device=x.device, dtype=torch.float32)
        tiles = torch.empty(1, device=x.device, dtype=torch.int32)

    x2s = x2.stride() if x2 is not None else (0, 0, 0, 0)

    def grid(meta):
        tiles = triton.cdiv(h_out * w_out, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"])
        return (tiles * (4 if upsample else 1), n)

    launch(
        _conv_kernel, grid,
        x, packed,
        bias if bias is not None else packed,
        scale if scale is not None else packed,
        shift if shift is not None else packed,
        res, out, partials, tiles,
        c_in, h, w, c_out, h_out, w_out, h_out * w_out,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        res.stride(0), res.stride(1), res.stride(2), res.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        stride, pad_left, pad_top,
        KH=kh, KW=kw,
        APPLY_GN=scale is not None, APPLY_SILU=bool(silu) and scale is not None,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        UPSAMPLE_2X=upsample, DOT_FP32=INTERPRET, INPUT_PRECISION=_input_precision(x.dtype),
        ROUND_TO_BF16=INTERPRET and out.dtype == torch.bfloat16, EMIT_STATS=bool(stats_groups), STATS_GS=gs,
        WIDE_OFFSETS=_needs_wide_offsets(x, residual, out, w_out, stride, kh, upsample, x2, x2_shift),
        SILU_MODE=silu_mode(), EVEN_K=c_in % _MAX_BLOCK_K == 0 and c_in1 % _MAX_BLOCK_K == 0,
        x2_ptr=x2 if x2 is not None else x, C_in1=c_in1,
        sx2n=x2s[0], sx2c=x2s[1], sx2h=x2s[2], sx2w=x2s[3],
        TWO_SOURCES=x2 is not None, X2_SHIFT=x2_shift, RESIDUAL_SHIFT=residual_shift,
    )
    if not stats_groups:
        return out
    merged = group_norm.merge_partial_stats(partials, tiles, n, stats_groups, c_out // stats_groups // gs,
                                            stats_eps, return_partials=stats_partials)
    return (out, *merged)


def conv_supported(x: torch.Tensor, weight: torch.Tensor, stride: int) -> bool:
    """Whether `gn_silu_conv2d` below handles this case (dtype, square 1x1/3x3 kernel, stride 1 or 2)."""
    return (x.dtype in SUPPORTED_DTYPES and weight.dim() == 4 and weight.shape[2] == weight.shape[3]
            and weight.shape[2] in SUPPORTED_KERNEL_SIZES and stride in SUPPORTED_STRIDES)


def gn_silu_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    *,
    silu: bool = True,
    stride: int = 1,
    padding: Sequence[int] = (1, 1, 1, 1),
    out: Optional[torch.Tensor] = None,
    stats_groups: int = 0,
    stats_eps: float = 1e-6,
    stats_partials: bool = False,
    x2: Optional[torch.Tensor] = None,
    x2_upsample: int = 1,
    residual_upsample: int = 1,
):
    """Launch `conv2d(pad(silu(x * scale + shift)), weight, bias, stride) + residual` as one implicit GEMM.

    Two-source mode (`x2` given): the conv's input is the channel concatenation `cat([x, up(x2)], dim=1)`, read
    from both tensors in the prologue and never written; `up` is nearest upsampling by `x2_upsample` (a power of
    two, 1 for none), done by indexing. scale/shift then cover the concatenation's channels.

    Args:
        x: (N, C_in, H, W) fp16/bf16/fp32, any strides; CUDA, or CPU under TRITON_INTERPRET=1. In two-source
            mode the first C_in1 channels of the conv's input.
        weight: (C_out, C_in, k, k) with k in {1, 3} (C_in = C_in1 + C_in2 in two-source mode); packed (cast to
            x's dtype) once and cached.
        bias: (C_out,) or None, any float dtype (added in fp32).
        scale, shift: (N, C_in) per-(sample, channel) normalisation terms (`sdvae_fast.ops.gn_scale_shift`),
            both or neither; None gives a plain conv (no normalisation and no SiLU).
        residual: (N, C_out, H_out / r, W_out / r) with r = `residual_upsample` (1, or 2 for an upsampling
            ResNet's skip path, read at (oh // 2, ow // 2)), any strides and float dtype, added in fp32; or None.
        silu: apply SiLU after the normalisation (ignored without scale/shift).
        stride: 1 or 2.
        padding: (left, right, top, bottom) zeros around the normalised tensor.
        out: optional preallocated (N, C_out, H_out, W_out) output of x's dtype (any strides); tests pass a
            NaN-filled one to prove every element is written.
        stats_groups, stats_eps: when stats_groups > 0, the epilogue also emits the GroupNorm statistics of the
            output (as stored) over stats_groups groups, for the unit that normalises it next.
        stats_partials: with stats_groups > 0, also return the merged raw statistics (count, mean, M2) of each
            (sample, group) (`group_norm.GroupNormPartials`), which merge across image bands.
        x2: (N, C_in2, H / x2_upsample, W / x2_upsample) in x's dtype and device, any strides, or None.
        x2_upsample: 1, 2, 4, 8, ...: x2's nearest-upsampling factor (two-source mode only).
        residual_upsample: 1 or 2 (then H_out and W_out must be even).
    Returns:
        (N, C_out, H_out, W_out) in x's dtype, channels_last unless `out` was given; with stats_groups > 0 the
        tuple (out, mean, rstd), mean and rstd (N, stats_groups) float32; with stats_partials the tuple
        (out, mean, rstd, partials), each field of partials (N, stats_groups) float32.
    Raises:
        TypeError / ValueError naming the argument for unsupported dtypes, kernel sizes, strides, shapes,
        devices, a C_out not divisible by stats_groups, or stats_partials without stats_groups, an x2 whose
        size times x2_upsample is not x's, an upsampling factor that is not a power of two; RuntimeError
        when the kernels cannot run on x's device.
    """
    check_image_input(x)
    n, c_in, h, w = x.shape
    x2_shift = _check_second_source(x, x2, x2_upsample)
    if x2 is not None:
        c_in += x2.shape[1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != c_in:
        raise ValueError(f"weight must be (C_out, C_in={c_in}, k, k), got {getattr(weight, 'shape', weight)}")
    kh, kw = weight.shape[2], weight.shape[3]
    if kh != kw or kh not in SUPPORTED_KERNEL_SIZES:
        raise ValueError(f"weight must be 1x1 or 3x3 for the Triton kernel, got {kh}x{kw}")
    if stride not in SUPPORTED_STRIDES:
        raise ValueError(f"stride must be 1 or 2 for the Triton kernel, got {stride}")
    padding = [int(p) for p in padding]
    if len(padding) != 4 or min(padding) < 0:
        raise ValueError(f"padding must be 4 non-negative ints (left, right, top, bottom), got {padding}")
    pad_left, pad_right, pad_top, pad_bottom = padding
    h_out = conv_output_size(h, kh, pad_top, pad_bottom, stride)
    w_out = conv_output_size(w, kw, pad_left, pad_right, stride)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"x of spatial size {h}x{w} is too small for a {kh}x{kw} conv with padding {padding}")
    c_out = weight.shape[0]
    _check_tensor("weight", weight, weight.shape, x.device)
    _check_stats_groups(c_out, stats_groups, stats_partials)
    if bias is not None:
        _check_tensor("bias", bias, (c_out,), x.device)
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (or both None)")
    if scale is not None:
        _check_tensor("scale", scale, (n, c_in), x.device)
        _check_tensor("shift", shift, (n, c_in), x.device)
        scale = scale.to(torch.float32).contiguous()
        shift = shift.to(torch.float32).contiguous()
    if residual_upsample not in (1, 2):
        raise ValueError(f"residual_upsample must be 1 or 2, got {residual_upsample!r}")
    if residual is not None:
        if h_out % residual_upsample or w_out % residual_upsample:
            raise ValueError(f"residual_upsample={residual_upsample} needs an even output size, got {h_out}x{w_out}")
        _check_tensor("residual", residual, (n, c_out, h_out // residual_upsample, w_out // residual_upsample),
                      x.device)
    out = _output(out, (n, c_out, h_out, w_out), x)
    require_kernels(x.device, "gn_silu_conv2d")
    packed = _pack_weight(weight, x.dtype, upsample=False)
    return _launch(x=_prepare_input(x), packed=packed, out=out, h_out=h_out, w_out=w_out, kernel_size=kh,
                   bias=bias, scale=scale, shift=shift, residual=residual, silu=silu, stride=stride,
                   pad_left=pad_left, pad_top=pad_top, stats_groups=stats_groups, stats_eps=stats_eps,
                   stats_partials=stats_partials, x2=None if x2 is None else _prepare_input(x2), x2_shift=x2_shift,
                   residual_shift=residual_upsample.bit_length() - 1 if residual is not None else 0)


def _check_second_source(x: torch.Tensor, x2: Optional[torch.Tensor], x2_upsample: int) -> int:
    """Validate two-source mode's x2 against x; return log2(x2_upsample) (0 without x2)."""
    if x2 is None:
        if x2_upsample != 1:
            raise ValueError(f"x2_upsample={x2_upsample} needs a second source x2")
        return 0
    if not isinstance(x2_upsample, int) or x2_upsample < 1 or x2_upsample & (x2_upsample - 1):
        raise ValueError(f"x2_upsample must be a power of two (1, 2, 4, ...), got {x2_upsample!r}")
    n, _, h, w = x.shape
    if not isinstance(x2, torch.Tensor) or x2.dim() != 4:
        raise ValueError(f"x2 must be a 4-D (N, C_in2, h, w) tensor, got {getattr(x2, 'shape', x2)}")
    if x2.shape[0] != n or x2.shape[2] * x2_upsample != h or x2.shape[3] * x2_upsample != w:
        raise ValueError(f"x2 must be ({n}, C_in2, {h} / {x2_upsample}, {w} / {x2_upsample}) to upsample onto x "
                         f"{tuple(x.shape)}, got {tuple(x2.shape)}")
    if x2.dtype != x.dtype or x2.device != x.device:
        raise TypeError(f"x2 must be {x.dtype} on {x.device} like x, got {x2.dtype} on {x2.device}")
    return x2_upsample.bit_length() - 1


def upsample_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    stats_groups: int = 0,
    stats_eps: float = 1e-6,
    stats_partials: bool = False,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    silu: bool = True,
):
    """Launch `conv2d(interpolate(act(x), scale_factor=2, mode="nearest"), weight, bias, padding=1)` as four
    2x2 phase convolutions on x (weights folded once by `fold_upsample_weight` and cached), with
    `act(x) = silu(x * scale + shift)` (an upsampling ResNet's norm1 + SiLU: per-pixel, so it commutes with the
    nearest upsampling and runs on the low-resolution pixels in the prologue) or the identity.

    Args:
        x: (N, C_in, H, W) fp16/bf16/fp32, any strides; CUDA, or CPU under TRITON_INTERPRET=1.
        weight: (C_out, C_in, 3, 3).
        bias: (C_out,) or None.
        scale, shift: (N, C_in) per-(sample, channel) normalisation terms, both or neither.
        silu: apply SiLU after the normalisation (ignored without scale/shift).
        out: optional preallocated (N, C_out, 2H, 2W) output of x's dtype (any strides).
        stats_groups, stats_eps, stats_partials: as in `gn_silu_conv2d`: also emit the output's GroupNorm
            statistics (and their raw partials).
    Returns:
        (N, C_out, 2H, 2W) in x's dtype, channels_last unless `out` was given; with stats_groups > 0 the tuple
        (out, mean, rstd), mean and rstd (N, stats_groups) float32; with stats_partials also the partials.
    Raises:
        TypeError / ValueError naming the argument; RuntimeError when the kernels cannot run on x's device.
    """
    check_image_input(x)
    n, c_in, h, w = x.shape
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape[1:]) != (c_in, 3, 3):
        raise ValueError(f"weight must be (C_out, {c_in}, 3, 3), got {getattr(weight, 'shape', weight)}")
    c_out = weight.shape[0]
    _check_tensor("weight", weight, weight.shape, x.device)
    _check_stats_groups(c_out, stats_groups, stats_partials)
    if bias is not None:
        _check_tensor("bias", bias, (c_out,), x.device)
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (or both None)")
    if scale is not None:
        _check_tensor("scale", scale, (n, c_in), x.device)
        _check_tensor("shift", shift, (n, c_in), x.device)
        scale = scale.to(torch.float32).contiguous()
        shift = shift.to(torch.float32).contiguous()
    out = _output(out, (n, c_out, 2 * h, 2 * w), x)
    require_kernels(x.device, "upsample_conv2d")
    packed = _pack_weight(weight, x.dtype, upsample=True)
    # Each phase is a 2x2 conv over the H x W input grid; its padding is set per phase inside the kernel.
    return _launch(x=_prepare_input(x), packed=packed, out=out, h_out=h, w_out=w, kernel_size=2, bias=bias,
                   scale=scale, shift=shift, silu=silu, upsample=True, stats_groups=stats_groups,
                   stats_eps=stats_eps, stats_partials=stats_partials)
