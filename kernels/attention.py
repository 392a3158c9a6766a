"""Flash-style attention for head dims up to 512: `softmax(q k^T * scale) v` with O(N*D) memory.

The VAE's mid-block attention has one head of dimension 512 (docs/design.md, section 1); PyTorch's flash and cuDNN
backends and FlashAttention-2/3 refuse that head dim, and a materialised N x N score matrix at a 4096^2 image
(N = 262144 tokens) would need 128 GiB. This kernel streams K/V tiles past a block of query rows with the
online softmax of FlashAttention (Dao et al., 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention
with IO-Awareness", algorithm 1): per row a running max `m` and running sum `l` in fp32, the accumulator rescaled
by `exp(m_old - m_new)` whenever the max grows, and one division by `l` at the end. Scores are computed in
base 2 (`exp2`, with log2(e) folded into the scale), which is the same softmax.

Work split (the head-dim-512 problem). A [BLOCK_M, 512] fp32 output accumulator is 128 KiB at BLOCK_M = 64:
more than one program's registers. The grid therefore has a third axis over *output columns*: each program owns
BLOCK_M query rows and BLOCK_DV of the D value/output columns, and recomputes the full QK^T scores of its rows
(the QK^T reduction over D runs in BLOCK_DK chunks). With D / BLOCK_DV = S splits the kernel does (S + 1) / 2
times the FLOPs of one pass (S = 2: 1.5x), in exchange for an accumulator that fits registers. The same kernel
gives the unsplit variant (BLOCK_DV = D, the usual flash kernel for D <= 128) from its constexprs, and when
BLOCK_DK >= D the query tile is loaded once instead of once per K/V step.

Alternative not implemented here: keep the [BLOCK_M, 512] accumulator in shared memory (227 KiB per block on
an H100/H200: 128 KiB for BLOCK_M = 64 in fp32 leaves ~100 KiB for K/V stages) and do each K/V step's P V product
in column slices, rescaling the slice as it is read back. Triton gives no explicit control over where a tensor
lives, so this needs a hand-written (CUDA/CUTLASS or Gluon) kernel. What would decide between the two on a GPU:
the measured time of split S = 2 and S = 4 against the unsplit BLOCK_DV = 512 config at N = 4096..65536, the
achieved tensor-core rate of each, and whether the extra QK^T work of the split (1.5x at S = 2) costs more than
the shared-memory round trips of the accumulator (2 x 128 KiB per K/V step). `bench/bench_attention.py` times
the variants this kernel can form (autotuned, S = 2, S = 4, unsplit).

Register use, from compiling for sm_90 without a GPU (triton 3.9, `cuobjdump -res-usage`, bf16, strides
divisible by 16): D = 512 with (BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV, warps) = (64, 64, 64, 256, 8) uses 233
registers and no spill, (64, 32, 64, 256, 8) 203; (128, 64, 64, 128, 8) spills 40 bytes, the unsplit
(64, 64, 64, 512, 8) 168 bytes, (128, 64, 64, 256, 8) 432 bytes; D = 64 at (64, 64) with 4 warps uses 133.
Shared memory measured the same way is num_stages * BLOCK_N * (D + BLOCK_DV) * 2 + BLOCK_M * BLOCK_DK * 2
bytes for 16-bit inputs (the whole K tile is staged): `_smem_bytes` uses that formula.

Head dims of 3 * 2^j (FLUX.2's small decoder has 384) are not padded to the next power of two, which at 384 would
waste a quarter of the P V work: a program holds DV_CHUNKS = 3 accumulators of BLOCK_DV columns each, updated from
the same P tile (`head_dim_block`). Measured as above (triton 3.9, bf16): D = 384 unsplit (64, 64, 64, 3 x 128,
8 warps, 1 stage) 240 registers, (64, 32, 64, 3 x 128, 8, 2) 209, split S = 2 (64, 64, 64, 3 x 64, 8, 2) 207;
D = 96 (64, 64, 32, 3 x 32, 4, 2) 162; none spills. With one stage the compile needs less shared memory than the
formula (65536 bytes against 106496 for the first D = 384 config): the estimate is an upper bound there.

Memory layout: q, k, v, out are (B, H, N, D) with arbitrary strides (the mid-block passes strided views into one
channels_last qkv tensor). The scalar base pointer of each program (batch, head, first row, first column) is
computed in int64, so B*N*D and batch strides may exceed 2^31 (N = 262144, D = 512 reaches it at B >= 16, and
strided views into a 3C-channel tensor sooner); offsets *inside* a tile stay int32, which needs per-row and
per-column strides below 2^21 elements: the launcher copies any tensor with larger ones (never in practice).
Keeping tile offsets int32 saved 30-100 registers per thread in the sm_90 compile above.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, SUPPORTED_DTYPES, check_tensor, launch, prune_configs, require_kernels
from ._jit import round_to_bf16

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 512


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    num_heads, n_q, n_kv, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DV_CHUNKS: tl.constexpr = 1,
):
    """One program: BLOCK_M query rows x DV_CHUNKS * BLOCK_DV output columns of one (batch, head).

    Grid: (cdiv(n_q, BLOCK_M), B * num_heads, cdiv(HEAD_DIM, DV_CHUNKS * BLOCK_DV)). `qk_scale` is
    scale * log2(e). BLOCK_DK and BLOCK_DV are powers of two; DV_CHUNKS is 1 or 3: with 3, a program's columns
    are three BLOCK_DV-wide accumulators, so a head dim of 3 * 2^k (384) is covered without padding it to the
    next power of two. Columns past HEAD_DIM are masked. DOT_FP32 and ROUND_BF16 are the interpreter
    workarounds (docs/design.md, section 9): fp32 dot operands, and round-to-nearest before bf16 casts.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_dv = tl.program_id(2)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    row0 = pid_m.to(tl.int64) * BLOCK_M  # first query row of this program
    col0 = pid_dv.to(tl.int64) * (DV_CHUNKS * BLOCK_DV)  # first output column of this program

    # int64 only in the scalar base pointers (batch, head, row and column block); offsets inside a tile are
    # int32 (the launcher keeps per-row and per-column strides below 2^21 elements, so they cannot overflow).
    q_base = Q + batch * stride_qb + head * stride_qh + row0 * stride_qn
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh + col0 * stride_vd
    o_base = O + batch * stride_ob + head * stride_oh + row0 * stride_on + col0 * stride_od

    offs_m = tl.arange(0, BLOCK_M)  # query rows within the block
    offs_n = tl.arange(0, BLOCK_N)  # key rows within the current K/V tile
    offs_dk = tl.arange(0, BLOCK_DK)  # head-dim chunk of the QK^T reduction
    offs_dv = tl.arange(0, BLOCK_DV)  # output columns within this program's slice
    m_mask = (pid_m * BLOCK_M + offs_m) < n_q
    # Column masks are constant true (folded away) when the block divides the head dim.
    if HEAD_DIM % BLOCK_DK == 0:
        dk_mask = tl.full([BLOCK_DK], 1, tl.int1)
    else:
        dk_mask = offs_dk < HEAD_DIM
    if HEAD_DIM % (DV_CHUNKS * BLOCK_DV) == 0:
        dv_mask = tl.full([BLOCK_DV], 1, tl.int1)
        dv_mask1 = dv_mask
        dv_mask2 = dv_mask
    else:
        dv_mask = (pid_dv * (DV_CHUNKS * BLOCK_DV) + offs_dv) < HEAD_DIM
        dv_mask1 = (pid_dv * (DV_CHUNKS * BLOCK_DV) + BLOCK_DV + offs_dv) < HEAD_DIM
        dv_mask2 = (pid_dv * (DV_CHUNKS * BLOCK_DV) + 2 * BLOCK_DV + offs_dv) < HEAD_DIM

    q_ptrs = q_base + (offs_m[:, None] * stride_qn + offs_dk[None, :] * stride_qd)  # (BLOCK_M, BLOCK_DK)
    kt_ptrs = k_base + (offs_n[None, :] * stride_kn + offs_dk[:, None] * stride_kd)  # K^T tile (BLOCK_DK, BLOCK_N)
    v_ptrs = v_base + (offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd)  # (BLOCK_N, BLOCK_DV)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 scaled scores)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if DV_CHUNKS == 3:
        acc1 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # columns BLOCK_DV .. 2 BLOCK_DV of this program
        acc2 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # columns 2 BLOCK_DV .. 3 BLOCK_DV

    if BLOCK_DK >= HEAD_DIM:
        # The whole query tile fits: load it once for all K/V steps.
        q = tl.load(q_ptrs, mask=m_mask[:, None] & dk_mask[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)

    for start_n in range(0, n_kv, BLOCK_N):
        n_mask = (start_n + offs_n) < n_kv
        if BLOCK_DK >= HEAD_DIM:
            kt = tl.load(kt_ptrs, mask=n_mask[None, :] & dk_mask[:, None], other=0.0)
            if DOT_FP32:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        else:
            # QK^T reduced over the head dim in BLOCK_DK chunks; q chunks are re-read (from cache) each step.
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for d0 in tl.static_range(0, HEAD_DIM, BLOCK_DK):
                if HEAD_DIM % BLOCK_DK == 0:
                    q = tl.load(q_ptrs + d0 * stride_qd, mask=m_mask[:, None], other=0.0)
                    kt = tl.load(kt_ptrs + d0 * stride_kd, mask=n_mask[None, :], other=0.0)
                else:
                    d_mask = (d0 + offs_dk) < HEAD_DIM
                    q = tl.load(q_ptrs + d0 * stride_qd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
                    kt = tl.load(kt_ptrs + d0 * stride_kd, mask=n_mask[None, :] & d_mask[:, None], other=0.0)
                if DOT_FP32:
                    q = q.to(tl.float32)
                    kt = kt.to(tl.float32)
                s = tl.dot(q, kt, s, input_precision=INPUT_PRECISION)
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Guard: a row with no valid key so far has max -inf; subtracting it would give NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        if ROUND_BF16:
            p = round_to_bf16(p)
        p = p.to(V.dtype.element_ty)  # P enters the PV product in the input dtype, as in FlashAttention
        if DOT_FP32:
            p = p.to(tl.float32)
        acc = _pv_step(acc, alpha, p, v_ptrs, n_mask, dv_mask, DOT_FP32, INPUT_PRECISION)
        if DV_CHUNKS == 3:
            acc1 = _pv_step(acc1, alpha, p, v_ptrs + BLOCK_DV * stride_vd, n_mask, dv_mask1, DOT_FP32,
                            INPUT_PRECISION)
            acc2 = _pv_step(acc2, alpha, p, v_ptrs + 2 * BLOCK_DV * stride_vd, n_mask, dv_mask2, DOT_FP32,
                            INPUT_PRECISION)
        m_i = m_new

        kt_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows without any key (never for n_kv >= 1) stay 0, not NaN
    o_ptrs = o_base + (offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od)
    _store_out(acc, l_safe, o_ptrs, m_mask, dv_mask, ROUND_BF16)
    if DV_CHUNKS == 3:
        _store_out(acc1, l_safe, o_ptrs + BLOCK_DV * stride_od, m_mask, dv_mask1, ROUND_BF16)
        _store_out(acc2, l_safe, o_ptrs + 2 * BLOCK_DV * stride_od, m_mask, dv_mask2, ROUND_BF16)


@triton.jit
def _pv_step(acc, alpha, p, v_ptrs, n_mask, dv_mask, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One K/V step of one accumulator chunk: `acc * alpha + p @ v` for the (BLOCK_N, BLOCK_DV) tile at v_ptrs."""
    v = tl.load(v_ptrs, mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
    if DOT_FP32:
        v = v.to(tl.float32)
    return tl.dot(p, v, acc * alpha[:, None], input_precision=INPUT_PRECISION)


@triton.jit
def _store_out(acc, l_safe, o_ptrs, m_mask, dv_mask, ROUND_BF16: tl.constexpr):
    """Normalise one accumulator chunk by the row sums and store it (masked rows and columns are not written)."""
    out = acc / l_safe[:, None]
    if ROUND_BF16:
        out = round_to_bf16(out)
    tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])


# -----------------------------------------------------------------------------------------------------------------
# Autotune configs: the one place where tile shapes are chosen.
# -----------------------------------------------------------------------------------------------------------------


def _config(block_m, block_n, block_dk, block_dv, num_warps, num_stages, dv_chunks=1) -> triton.Config:
    tiles = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DK": block_dk, "BLOCK_DV": block_dv}
    if dv_chunks != 1:  # the kernel's default; configs of power-of-two head dims keep their recorded keys
        tiles["DV_CHUNKS"] = dv_chunks
    return triton.Config(tiles, num_warps=num_warps, num_stages=num_stages)


def head_dim_block(head_dim: int) -> int:
    """The head dim the configs are chosen for: the smallest power of two 2^k or 3 * 2^(k-2) >= head_dim.

    A head dim of 3 * 2^j (48, 96, 192, 384: FLUX.2's small decoder has 384) runs as three power-of-two column
    chunks (DV_CHUNKS = 3) instead of being padded to the next power of two (a quarter of the work wasted at
    384). Chunks stay at least 16 wide (the smallest `tl.dot` tile). Raises ValueError for head_dim < 1.
    """
    if head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    power = triton.next_power_of_2(head_dim)
    three_quarters = 3 * power // 4
    return three_quarters if power >= 64 and head_dim <= three_quarters else power


def attention_configs(block_d: int) -> list[triton.Config]:
    """Autotune configs for the head dim block `block_d` (`head_dim_block`); the first is the default.

    block_d <= 128 (power of two): the usual flash tiling, one program owns all output columns and holds its
    query tile.
    block_d 256: unsplit with the query tile chunked or held, or split in two column halves.
    block_d 512: column splits S = 2 (BLOCK_DV 256) and S = 4 (BLOCK_DV 128), plus the unsplit variant
    (BLOCK_DV 512, whose accumulator spills a little) so the autotuner measures it too.
    block_d 3 * 2^j (48 .. 384): three column chunks of 2^j (DV_CHUNKS 3), QK^T reduced in chunks of 2^j (or
    64); at 384 the unsplit program (three 128-wide accumulators, QK^T computed once) and the split S = 2 (three
    64-wide chunks per program).
    The interpreter and any CPU run use the first config only; on a GPU the autotuner skips any config that
    runs out of shared memory. Register use of these configs on sm_90 is in the module docstring.
    """
    if block_d & (block_d - 1):
        chunk = block_d // 3
        if block_d <= 192:
            return [
                _config(64, 64, chunk, chunk, 8 if block_d > 96 else 4, 2, 3),
                _config(128, 64, chunk, chunk, 8, 2, 3),
                _config(64, 32, chunk, chunk, 4, 3, 3),
            ]
        return [
            _config(64, 64, 64, 128, 8, 1, 3),  # unsplit, the default
            _config(64, 32, 64, 128, 8, 2, 3),
            _config(64, 64, 64, 64, 8, 2, 3),  # S = 2
        ]
    if block_d <= 128:
        return [
            _config(64, 64, block_d, block_d, 4, 2),
            _config(128, 64, block_d, block_d, 8, 3),
            _config(128, 128, block_d, block_d, 8, 2),
            _config(64, 32, block_d, block_d, 4, 3),
        ]
    if block_d == 256:
        return [
            _config(64, 64, 64, 256, 8, 2),
            _config(64, 64, 256, 256, 8, 2),
            _config(128, 64, 64, 128, 8, 2),
        ]
    return [
        _config(64, 64, 64, 256, 8, 2),  # S = 2, the default
        _config(64, 32, 64, 256, 8, 2),
        _config(64, 64, 128, 256, 8, 2),
        _config(128, 64, 64, 128, 8, 2),  # S = 4
        _config(64, 64, 64, 512, 8, 1),  # unsplit
    ]


# Triton before 3.9 hoists every query chunk out of the K/V loop into shared memory (seen in sm_90 compiles with
# 3.6: 262144 bytes for the default D = 512 config, where 3.9 needs 204800); 3.7 and 3.8 were not checked, so
# they are assumed to do the same.
_QUERY_HOISTED = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9)


def _smem_bytes(config: triton.Config, block_d: int, elem_size: int) -> int:
    """Shared memory of `config` in bytes: staged K and V tiles per pipeline stage plus the query tile.

    Matches the sm_90 compiles noted in the module docstring (the whole [BLOCK_N, D] K tile is staged): one
    [BLOCK_M, BLOCK_DK] query chunk with triton 3.9, all D columns of it with earlier releases.
    """
    kw = config.kwargs
    kv_tiles = config.num_stages * kw["BLOCK_N"] * (block_d + kw["BLOCK_DV"] * kw.get("DV_CHUNKS", 1))
    query = kw["BLOCK_M"] * (max(block_d, kw["BLOCK_DK"]) if _QUERY_HOISTED else kw["BLOCK_DK"])
    return (kv_tiles + query) * elem_size


_AUTOTUNED: dict[int, object] = {}


def _autotuned_kernel(block_d: int):
    """The autotuned kernel for head dim block `block_d` (one autotuner per config list, built on first use).

    The key holds the sequence lengths and head dim (and, implicitly, the dtypes) but never the batch, so every
    batch size runs the same config: one sample's output is bitwise the same alone or in a batch.
    """
    if block_d not in _AUTOTUNED:

        def early_prune(configs, named_args, **kwargs):
            q = named_args["Q"]
            return prune_configs(configs, lambda c: _smem_bytes(c, block_d, q.element_size()), q.device)

        _AUTOTUNED[block_d] = triton.autotune(
            # The default config alone under the interpreter (see conv.py: Triton < 3.8 would benchmark it).
            configs=attention_configs(block_d)[:1] if INTERPRET else attention_configs(block_d),
            key=["n_q", "n_kv", "HEAD_DIM"],
            prune_configs_by={"early_config_prune": early_prune},
        )(_attention_fwd_kernel)
    return _AUTOTUNED[block_d]


# -----------------------------------------------------------------------------------------------------------------
# Launcher
# -----------------------------------------------------------------------------------------------------------------


_MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis, which enumerates (batch, head) pairs


def attention_supported(q: torch.Tensor) -> bool:
    """Whether the kernel handles q: fp16/bf16/fp32, D a multiple of 16 up to 512, B * H <= 65535."""
    d = q.shape[-1]
    batch_heads = q.shape[0] * (q.shape[1] if q.dim() == 4 else 1)
    return q.dtype in SUPPORTED_DTYPES and d % 16 == 0 and 0 < d <= MAX_HEAD_DIM and batch_heads <= _MAX_GRID_Y


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 3 else t  # (B, N, D) -> (B, 1, N, D), a view


_MAX_TILE_STRIDE = 1 << 21  # row/column strides below this keep int32 offsets inside a tile exact


def _tile_addressable(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a contiguous copy when a row (N) or column (D) stride would overflow int32 tile offsets."""
    if max(abs(t.stride(2)), abs(t.stride(3))) < _MAX_TILE_STRIDE:
        return t
    return t.contiguous()


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    *,
    out: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """Launch the flash attention kernel: `softmax(q k^T * scale) v`, online softmax in fp32.

    Args:
        q: (B, N_q, D) or (B, H, N_q, D); k, v: (B, N_kv, D) or (B, H, N_kv, D), same rank, batch, heads and
            head dim as q. Any strides (no copies are made). fp16/bf16/fp32, all the same dtype, on one device.
            D must be a multiple of 16 and at most 512.
        scale: softmax scale, default D**-0.5.
        out: optional preallocated output, same shape/dtype/device as q, any strides; every element is written
            (tests fill it with NaN to prove that).
        config: optional fixed tile config, a dict with BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV (powers of two,
            BLOCK_* >= 16) and optionally DV_CHUNKS (1 or 3 column chunks per program), num_warps,
            num_stages; bypasses the autotuner (tests and benchmarks use it to run the split and unsplit
            variants). Default: autotuned (first config off the GPU).
    Returns:
        The output, shape of q, dtype of q (a new contiguous tensor unless `out` is given).
    Raises:
        RuntimeError: the kernels cannot run on q's device (see `kernels_available`).
        ValueError / TypeError: naming the argument, on mismatched shapes, dtypes, devices, unsupported head
            dims, or an empty key sequence (softmax over no keys is undefined).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=(3, 4), layout="(B, N, D) or (B, H, N, D)")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, {t.device}")
    if k.shape != v.shape or q.dim() != k.dim() or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q, k, v must share rank, batch, heads and head dim (k and v the same shape), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not attention_supported(q):
        raise ValueError(
            f"q: the attention kernel needs dtype fp16/bf16/fp32, a head dim that is a multiple of 16 up to "
            f"{MAX_HEAD_DIM} and batch * heads <= {_MAX_GRID_Y}; got {q.dtype}, shape {tuple(q.shape)} "
            f"(use the SDPA reference instead)"
        )
    if k.shape[-2] == 0:
        raise ValueError("k, v: need at least one key (N_kv >= 1); softmax over no keys is undefined")
    require_kernels(q.device, "attention")
    head_dim = q.shape[-1]
    if scale is None:
        scale = head_dim ** -0.5
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype}")
    if q.shape[-2] == 0 or q.shape[0] == 0:
        return out

    q4, k4, v4 = (_tile_addressable(_as_4d(t)) for t in (q, k, v))  # (B, H, N, D) views
    o4 = _tile_addressable(_as_4d(out))  # a copy only for huge row/column strides: written back below
    batch, heads, n_q, _ = q4.shape
    n_kv = k4.shape[2]
    if q.dtype == torch.float32:
        # fp32 follows PyTorch's matmul setting: exact fp32 unless TF32 was allowed.
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        precision = "tf32"  # ignored for fp16/bf16 operands
    args = (
        q4, k4, v4, o4,
        *q4.stride(), *k4.stride(), *v4.stride(), *o4.stride(),
        heads, n_q, n_kv, float(scale) * _LOG2E,
    )
    consts = dict(
        HEAD_DIM=head_dim, DOT_FP32=INTERPRET, ROUND_BF16=INTERPRET and q.dtype == torch.bfloat16,
        INPUT_PRECISION=precision,
    )

    def grid(meta):
        columns = meta["BLOCK_DV"] * meta.get("DV_CHUNKS", 1)  # output columns per program
        return (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads, triton.cdiv(head_dim, columns))

    if config is None:
        launch(_autotuned_kernel(head_dim_block(head_dim)), grid, *args, **consts)
    else:
        tiles = {key: int(config[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_DK", "BLOCK_DV")}
        for key, value in tiles.items():
            if value < 16 or value & (value - 1):
                raise ValueError(f"config[{key!r}] must be a power of two >= 16, got {value}")
        tiles["DV_CHUNKS"] = int(config.get("DV_CHUNKS", 1))
        if tiles["DV_CHUNKS"] not in (1, 3):
            raise ValueError(f"config['DV_CHUNKS'] must be 1 or 3, got {tiles['DV_CHUNKS']}")
        _attention_fwd_kernel[grid(tiles)](
            *args, **consts, **tiles,
            num_warps=int(config.get("num_warps", 4)), num_stages=int(config.get("num_stages", 2)),
        )
    if o4.data_ptr() != _as_4d(out).data_ptr():
        out.copy_(o4.view(out.shape))
    return out


def attention_flops(batch_heads: int, n_q: int, n_kv: int, head_dim: int) -> float:
    """FLOPs of one attention forward (2 per multiply-add): QK^T and PV, 4 * N_q * N_kv * D per head."""
    return 4.0 * batch_heads * n_q * n_kv * head_dim


__all__ = [
    "attention_forward", "attention_supported", "attention_configs", "attention_flops", "head_dim_block",
    "MAX_HEAD_DIM",
]
