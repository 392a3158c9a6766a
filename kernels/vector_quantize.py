"""Vector quantisation in one launch: nearest codebook row per latent pixel, found by a GEMM with the argmin in
its epilogue, and that row gathered in the same program (VQ autoencoders: latent diffusion's VQ-f4/VQ-f8, MoVQ).

Math. For a latent pixel z (D values) and codebook rows e_j (K rows of D), the squared Euclidean distance is

    ||z - e_j||^2 = ||z||^2 - 2 z . e_j + ||e_j||^2 .

||z||^2 is the same for every j, so the nearest row is `argmin_j (||e_j||^2 - 2 z . e_j)`: one (pixels x D) by
(D x K) product per tile plus a per-row norm, all in fp32 (`tl.dot` with `input_precision="ieee"`, never TF32;
fp16/bf16 inputs are widened before the product). Dropping ||z||^2 changes no comparison and avoids the
cancellation of adding a large constant. Each program owns BLOCK_M pixels of one image and walks the codebook in
BLOCK_N-row tiles; the distances of a tile live in registers only: the tile's minimum and its lowest column
reaching it replace the running best only when strictly smaller, so the result is the lowest index among exact
ties, as `torch.argmin` returns. The (pixels x K) distance matrix is never written.

Output. The program then gathers row `best` of the codebook and writes, like diffusers' VectorQuantizer
(`z_q = z + (z_q - z).detach()`, source: diffusers/models/autoencoders/vae.py), `z + (e_best - z)` with each of
the two operations rounded to the output dtype: bitwise diffusers' values in fp32 (and in fp16/bf16, whose
PyTorch ops also compute in fp32 and round once). Indices are int64.

Which index diffusers returns. diffusers takes `argmin(torch.cdist(z, E))`; cdist evaluates the same expansion
(with ||z||^2, a clamp at 0 and a square root) or the direct differences, so its argmin equals this kernel's
whenever the best and second-best distances differ by more than fp32 rounding; on exact ties both take the
lowest index (tests/test_vector_quantize.py checks integer inputs with constructed ties, and random inputs away
from near-ties). A NaN in a pixel makes every comparison false: that pixel gets index 0.

Layout: z is (N, D, H, W) with any strides (NCHW, channels_last, views); the codebook (K, D) any strides; the
output (N, D, H, W) contiguous NCHW (what diffusers returns), indices (N, H, W) contiguous. Offsets are int64
(latents are small; this kernel is not bandwidth bound). Grid: (cdiv(H*W, BLOCK_M), N): no tile spans two
images, nothing reduces across the batch, no atomics.

Registers, compiled for sm_90 without a GPU (triton's bundled ptxas, `kernel_report.compile_for_sm90`, CONFIG
below, 4 warps, K = 16384): 168 registers and no spill for fp32 and bf16 at D = 4 and D = 256 (148 for bf16 at
D = 256); 8 KiB (D = 4) to 32 KiB (D = 256) of shared memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, SUPPORTED_DTYPES, check_tensor, require_kernels
from ._jit import round_to_bf16

#: The one tile configuration (pixels per program, codebook rows per step, D chunk cap, warps). The kernel is
#: small next to the decoder (K x D x pixels multiply-adds: 16384 x 4 x 16384 ~ 1 GFLOP for MoVQ at 1024^2).
CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "MAX_BLOCK_D": 64, "num_warps": 4}


@triton.jit
def _vector_quantize_kernel(
    Z, E, OUT, IDX,
    stride_zn, stride_zd, stride_zh, stride_zw,
    stride_ek, stride_ed,
    num_pixels, width, dim, num_codes,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """One program: BLOCK_M pixels of image `program_id(1)`; argmin over all codebook rows, gather, store.

    `num_pixels` = H * W, `width` = W, `dim` = D, `num_codes` = K. BLOCK_D is a power of two >= 16; the D axis
    is walked in BLOCK_D chunks. ROUND_BF16 rounds before bf16 stores (the interpreter truncates otherwise).
    """
    pid_m = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < num_pixels
    pix = offs_m.to(tl.int64)
    z_pix = n * stride_zn + (pix // width) * stride_zh + (pix % width) * stride_zw  # (BLOCK_M,) int64
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_M,), tl.int64)
    for n0 in range(0, num_codes, BLOCK_N):
        codes = n0 + offs_n
        n_mask = codes < num_codes
        dots = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        norms = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < dim
            z = tl.load(Z + z_pix[:, None] + d[None, :].to(tl.int64) * stride_zd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
            e = tl.load(E + codes[:, None].to(tl.int64) * stride_ek + d[None, :].to(tl.int64) * stride_ed,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            dots = tl.dot(z, tl.trans(e), dots, input_precision="ieee")
            norms += tl.sum(e * e, axis=1)
        dist = norms[None, :] - 2.0 * dots  # ||e||^2 - 2 z.e, (BLOCK_M, BLOCK_N)
        dist = tl.where(n_mask[None, :], dist, float("inf"))
        tile_min = tl.min(dist, axis=1)
        tile_idx = tl.min(tl.where(dist == tile_min[:, None], codes[None, :], num_codes), axis=1)
        better = tile_min < best  # strict: an earlier tile keeps exact ties (lowest index)
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_idx.to(tl.int64), best_idx)

    tl.store(IDX + n * num_pixels + pix, best_idx, mask=m_mask)
    out_pix = n * dim * num_pixels + pix  # contiguous NCHW output: (n, d, p) at (n * D + d) * H*W + p
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + offs_d
        mask = m_mask[:, None] & (d < dim)[None, :]
        zf = tl.load(Z + z_pix[:, None] + d[None, :].to(tl.int64) * stride_zd, mask=mask, other=0.0).to(tl.float32)
        ef = tl.load(E + best_idx[:, None] * stride_ek + d[None, :].to(tl.int64) * stride_ed,
                     mask=mask, other=0.0).to(tl.float32)
        diff = ef - zf
        if ROUND_BF16:
            diff = round_to_bf16(diff)
        diff = diff.to(OUT.dtype.element_ty).to(tl.float32)  # (e - z) rounded to the output dtype
        out = zf + diff
        if ROUND_BF16:
            out = round_to_bf16(out)
        tl.store(OUT + out_pix[:, None] + d[None, :].to(tl.int64) * num_pixels, out.to(OUT.dtype.element_ty),
                 mask=mask)


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor, *, out: torch.Tensor = None,
                    indices: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the quantiser: nearest codebook row per pixel (lowest index on exact ties), gathered.

    Args:
        z: latents (N, D, H, W), fp16/bf16/fp32, any strides.
        codebook: (K, D), z's dtype and device, any strides, K >= 1.
        out: optional preallocated (N, D, H, W) contiguous output in z's dtype (tests fill it with NaN).
        indices: optional preallocated (N, H, W) contiguous int64 output.
    Returns:
        (z_q, indices): z_q (N, D, H, W) contiguous NCHW in z's dtype with `z + (e - z)` per element (see the
        module docstring), indices (N, H, W) int64.
    Raises:
        RuntimeError: the kernels cannot run on z's device.
        TypeError / ValueError: naming the argument, on wrong ranks, dtypes, devices or widths.
    """
    check_tensor("z", z, ndim=4, layout="4-D (N, D, H, W)", dtypes=SUPPORTED_DTYPES)
    check_tensor("codebook", codebook, ndim=2, layout="2-D (K, D)", dtypes=(z.dtype,), device=z.device,
                 nonempty=True)
    n, dim, height, width = z.shape
    if codebook.shape[1] != dim:
        raise ValueError(f"codebook must be (K, {dim}) to match z's D={dim}, got shape {tuple(codebook.shape)}")
    require_kernels(z.device, "vector_quantize")
    if out is None:
        out = torch.empty((n, dim, height, width), dtype=z.dtype, device=z.device)
    check_tensor("out", out, shape=z.shape, dtypes=(z.dtype,), device=z.device)
    if indices is None:
        indices = torch.empty((n, height, width), dtype=torch.int64, device=z.device)
    check_tensor("indices", indices, shape=(n, height, width), dtypes=(torch.int64,), device=z.device)
    if not (out.is_contiguous() and indices.is_contiguous()):
        raise ValueError("out and indices must be contiguous")
    num_pixels = height * width
    if z.numel() == 0:
        return out, indices
    block_d = max(16, min(triton.next_power_of_2(dim), CONFIG["MAX_BLOCK_D"]))
    grid = (triton.cdiv(num_pixels, CONFIG["BLOCK_M"]), n)
    _vector_quantize_kernel[grid](
        z, codebook, out, indices,
        *z.stride(), *codebook.stride(),
        num_pixels, width, dim, codebook.shape[0],
        BLOCK_M=CONFIG["BLOCK_M"], BLOCK_N=CONFIG["BLOCK_N"], BLOCK_D=block_d,
        ROUND_BF16=INTERPRET and z.dtype == torch.bfloat16, num_warps=CONFIG["num_warps"],
    )
    return out, indices


__all__ = ["vector_quantize", "CONFIG"]
