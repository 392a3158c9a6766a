"""The GSC conv's prologue as a Triton helper: GroupNorm's per-channel affine map and SiLU on an A tile, with a
SiLU that costs one SFU (MUFU) instruction per element on the GPU.

Math. With y = x * scale + shift (scale = rstd * gamma, shift = beta - mean * rstd * gamma, fp32),

    silu(y) = y * sigmoid(y),  sigmoid(y) = (1 + tanh(y / 2)) / 2,  so  silu(y) = h + h * tanh(h),  h = y / 2.

h comes straight from one FMA with the halved affine terms, h = x * (scale / 2) + shift / 2, which is exactly
fl(x * scale + shift) / 2 (halving is exact in binary floating point above the subnormal range), and the SiLU is
then one tanh and one FMA. `tl.sigmoid` costs two MUFU operations (ex2, rcp) and about eight FP32/ALU range-check
instructions per element in the sm_90 SASS; `tanh.approx.f32` is a single MUFU.TANH (docs/cost_model.md).

Modes (`SILU_MODE`, a constexpr of the conv kernel):
  0  exact: y * tl.sigmoid(y), the arithmetic the kernel has always used (and what the interpreter runs, so CPU
     results and the golden outputs stay bitwise the same);
  1  GPU: h + h * tanh.approx.f32(h) through inline PTX (sm_75 and later; not available under the interpreter);
  2  mode 1's formula with an accurate tanh, 2 * sigmoid(2h) - 1 (tests of the formula under the interpreter);
  3  mode 2 with tanh scaled by (1 + EMULATED_TANH_ERROR): a worse tanh than the GPU's, so a parity test that
     passes in mode 3 covers mode 1's error (tests of the accuracy bound under the interpreter).

Accuracy of mode 1. The PTX ISA documents a maximum relative error of about 2^-11 for tanh.approx.f32
(https://docs.nvidia.com/cuda/parallel-thread-execution/index.html#floating-point-instructions-tanh). With
t = tanh(h) (1 + d), |d| <= e = 2^-11, and one fp32 FMA (unit roundoff u = 2^-24):

    |silu_1(y) - silu(y)| <= |h| |tanh(h)| e + u |silu(y)| + O(u e)  <=  2^-12 |y| + 2^-24 |silu(y)|.

For y >= 0, silu(y) >= y / 2, so the relative error is at most 2^-11: a quarter of the half-ulp rounding of the
bf16 dot operand (2^-9) and one half-ulp of fp16 (2^-11). For y < 0 the error stays below 2^-12 |y| in absolute
terms (silu itself tends to 0 there). `tests/test_gsc_prologue.py` checks the bound elementwise with the mode 3
emulation (e = 2^-10.5 > 2^-11) and the conv parity tests run mode 3 through the whole kernel.
"""
import triton
import triton.language as tl

#: Relative error of the emulated tanh of mode 3: above the PTX bound of tanh.approx.f32 (about 2^-11).
EMULATED_TANH_ERROR = 2.0 ** -10.5
#: The bound stated above for mode 1 (absolute, per unit |y|): 2^-12, from the 2^-11 relative error of the tanh.
SILU_ABS_ERROR_PER_Y = 2.0 ** -12

SILU_EXACT, SILU_TANH_APPROX, SILU_TANH_EXACT, SILU_TANH_EMULATED = 0, 1, 2, 3


@triton.jit
def _tanh(h, SILU_MODE: tl.constexpr):
    """tanh(h) for h fp32: one MUFU.TANH (mode 1) or the accurate 2 * sigmoid(2h) - 1 (modes 2 and 3, the latter
    scaled by 1 + EMULATED_TANH_ERROR)."""
    if SILU_MODE == 1:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [h], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        t = 2.0 * tl.sigmoid(2.0 * h) - 1.0
        if SILU_MODE == 3:
            t = t * (1.0 + 0.0006905339660024879)  # 1 + 2^-10.5 (EMULATED_TANH_ERROR)
        return t


@triton.jit
def normalize_silu(a, sc, sh, APPLY_SILU: tl.constexpr, SILU_MODE: tl.constexpr):
    """GroupNorm's affine map and optional SiLU of a tile: `silu(a * sc + sh)` (or `a * sc + sh`) in fp32.

    a: (M, K) tile of any float dtype; sc, sh: (K,) fp32 per-channel scale and shift. Returns (M, K) fp32.
    SILU_MODE as in the module docstring; mode 0 is bitwise the arithmetic of the original prologue.
    """
    if APPLY_SILU and SILU_MODE != 0:
        h = a.to(tl.float32) * (sc * 0.5)[None, :] + (sh * 0.5)[None, :]
        y = h * _tanh(h, SILU_MODE) + h
    else:
        y = a.to(tl.float32) * sc[None, :] + sh[None, :]
        if APPLY_SILU:
            y = y * tl.sigmoid(y)
    return y
