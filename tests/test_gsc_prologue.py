"""The GSC prologue helper (kernels/gsc_prologue.py) under the Triton interpreter: mode 0 is bitwise the original
prologue, the tanh formula (mode 2) matches float64 SiLU to fp32 accuracy, and the emulated worst-case tanh
(mode 3, relative error 2^-10.5, above tanh.approx.f32's 2^-11) stays inside the stated bound. Mode 1 (inline PTX)
only runs on a GPU; tests/test_kernel_report.py checks its sm_90 SASS (one MUFU.TANH per element)."""
import math

import pytest
import torch
import triton
import triton.language as tl

from sdvae_fast.kernels import gsc_prologue as gp


@triton.jit
def _apply(x_ptr, sc_ptr, sh_ptr, out_ptr, M, K: tl.constexpr, BLOCK_M: tl.constexpr, APPLY_SILU: tl.constexpr,
           SILU_MODE: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, K)
    mask = (rm < M)[:, None]
    offs = rm[:, None] * K + rk[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = gp.normalize_silu(x, tl.load(sc_ptr + rk), tl.load(sh_ptr + rk), APPLY_SILU, SILU_MODE)
    tl.store(out_ptr + offs, y, mask=mask)


@triton.jit
def _original(x_ptr, sc_ptr, sh_ptr, out_ptr, M, K: tl.constexpr, BLOCK_M: tl.constexpr):
    """The conv kernel's prologue as it was written before the helper (the reference for bitwise mode 0)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, K)
    mask = (rm < M)[:, None]
    offs = rm[:, None] * K + rk[None, :]
    a = tl.load(x_ptr + offs, mask=mask, other=0.0)
    a = a.to(tl.float32) * tl.load(sc_ptr + rk)[None, :] + tl.load(sh_ptr + rk)[None, :]
    a = a * tl.sigmoid(a)
    tl.store(out_ptr + offs, a, mask=mask)


def _inputs(dtype, m=200, k=16, seed=0):
    """x spread so that y = x * sc + sh covers about [-20, 20], plus exact zeros and tiny values."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 6).to(dtype)
    x[0] = 0.0
    x[1] = 1e-30 if dtype == torch.float32 else 1e-4
    sc = torch.rand(k, generator=g) + 0.5
    sh = torch.randn(k, generator=g) * 0.5
    return x, sc, sh


def _run(kernel, x, sc, sh, **constexprs):
    m, k = x.shape
    out = torch.empty(m, k, dtype=torch.float32)
    kernel[(triton.cdiv(m, 64),)](x, sc, sh, out, m, K=k, BLOCK_M=64, **constexprs)
    return out


def _silu64(x, sc, sh):
    y = x.double() * sc.double() + sh.double()
    return y, y * torch.sigmoid(y)


def test_emulated_error_constant_matches_the_kernel_literal():
    assert gp.EMULATED_TANH_ERROR == 2.0 ** -10.5
    assert 0.0006905339660024879 == 2.0 ** -10.5  # the literal in _tanh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mode0_is_bitwise_the_original_prologue(dtype):
    x, sc, sh = _inputs(dtype)
    assert torch.equal(_run(_apply, x, sc, sh, APPLY_SILU=True, SILU_MODE=0), _run(_original, x, sc, sh))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tanh_formula_matches_float64_silu(dtype):
    x, sc, sh = _inputs(dtype)
    y, ref = _silu64(x, sc, sh)
    got = _run(_apply, x, sc, sh, APPLY_SILU=True, SILU_MODE=2).double()
    # fp32 formula error: about 1e-7 absolute in 2 * sigmoid(2h) - 1, so a few ulp of |y| (the exact-sigmoid
    # prologue of mode 0 is off by up to 5e-7 |y| on these inputs too).
    assert ((got - ref).abs() <= 1e-6 * y.abs() + 1e-7 * ref.abs() + 1e-30).all()
    assert got[0].abs().max() == 0 or (got[0] - ref[0]).abs().max() < 1e-7  # y = shift at x = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_tanh_error_stays_inside_the_stated_bound(dtype):
    """Mode 3 (tanh off by 2^-10.5 relative): |silu - ref| <= 2^-10.5 / 2 * |y| + fp32 rounding; the documented
    mode 1 bound is the same with 2^-11."""
    x, sc, sh = _inputs(dtype, m=400, seed=1)
    y, ref = _silu64(x, sc, sh)
    got = _run(_apply, x, sc, sh, APPLY_SILU=True, SILU_MODE=3).double()
    err = (got - ref).abs()
    bound = gp.EMULATED_TANH_ERROR / 2 * y.abs() + 1e-6 * y.abs() + 2.0 ** -22 * ref.abs() + 1e-30
    assert (err <= bound).all(), float((err / bound).max())
    # The emulation is active: the error reaches a good part of the bound somewhere.
    assert float((err / (y.abs() + 1e-30)).max()) > gp.EMULATED_TANH_ERROR / 4
    # For y >= 0 the relative error is at most 2 * (2^-10.5 / 2) = 2^-10.5 (mode 1: 2^-11).
    pos = y > 1e-3
    assert float((err[pos] / ref[pos].abs()).max()) <= gp.EMULATED_TANH_ERROR + 2e-6


def test_without_silu_every_mode_is_the_affine_map():
    x, sc, sh = _inputs(torch.bfloat16)
    base = _run(_apply, x, sc, sh, APPLY_SILU=False, SILU_MODE=0)
    for mode in (2, 3):
        assert torch.equal(_run(_apply, x, sc, sh, APPLY_SILU=False, SILU_MODE=mode), base)
    y, _ = _silu64(x, sc, sh)
    assert math.isclose(float((base.double() - y).abs().max()), 0.0, abs_tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The helper inside the conv kernel: the GPU's tanh formula through the whole GSC kernel under the interpreter
# (mode 2: accurate tanh; mode 3: a tanh worse than tanh.approx.f32), against float64.
# ---------------------------------------------------------------------------------------------------------------

from test_conv import run_gsc  # noqa: E402
from test_emitted_stats import _check_stats, _run_case  # noqa: E402

from sdvae_fast.kernels import conv as conv_kernels  # noqa: E402

# (n, c_in, c_out, (h, w), k, dtype, options): ragged tiles (13x7, 9x11 outputs; C_out 24/48 under BLOCK_N),
# channels per group 1, 3, 10, 16, residual, stride 2, 1x1 without SiLU, C_in a multiple of 64 (EVEN_K) and not.
MODE_CASES = {
    "fp32-13x7-cpg2-residual": (2, 16, 48, (13, 7), 3, torch.float32, dict(num_groups=8, residual=True)),
    "bf16-13x7-cpg1-channels_last": (1, 16, 48, (13, 7), 3, torch.bfloat16,
                                     dict(num_groups=16, layout="channels_last")),
    "fp16-9x11-cpg10-residual": (2, 40, 24, (9, 11), 3, torch.float16,
                                 dict(num_groups=4, layout="noncontiguous", residual=True)),
    "bf16-7x6-cpg3": (1, 48, 32, (7, 6), 3, torch.bfloat16, dict(num_groups=16)),
    "fp16-5x6-cpg16": (1, 64, 64, (5, 6), 3, torch.float16, dict(num_groups=4, layout="channels_last")),
    "fp32-stride2-pad0101": (1, 16, 24, (13, 7), 3, torch.float32, dict(num_groups=4, stride=2,
                                                                         padding=(0, 1, 0, 1))),
    "bf16-sd-128to256-even-k-residual": (1, 128, 256, (4, 4), 3, torch.bfloat16,
                                         dict(num_groups=32, residual=True)),
    "fp16-sd-256to256-even-k": (1, 256, 256, (3, 3), 3, torch.float16, dict(num_groups=32)),
    "bf16-qkv-1x1-no-silu": (1, 64, 96, (7, 9), 1, torch.bfloat16, dict(silu=False, via="ops")),
}


@pytest.mark.parametrize("mode", [gp.SILU_TANH_EXACT, gp.SILU_TANH_EMULATED])
@pytest.mark.parametrize("case", list(MODE_CASES), ids=list(MODE_CASES))
def test_conv_with_the_tanh_silu_matches_float64(case, mode, monkeypatch):
    """fp32 within 1e-5 relative (mode 2; mode 3's deliberate 2^-10.5 tanh error is for 16-bit types only),
    bf16/fp16 within 2x PyTorch's own error in that dtype (run_gsc's check)."""
    n, c_in, c_out, hw, k, dtype, options = MODE_CASES[case]
    if dtype == torch.float32 and mode == gp.SILU_TANH_EMULATED:
        pytest.skip("the emulated tanh error (2^-10.5) is meant for the 16-bit operands")
    monkeypatch.setattr(conv_kernels, "SILU_MODE_OVERRIDE", mode)
    run_gsc(n, c_in, c_out, hw, k, dtype, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emitted_stats_with_the_tanh_silu(dtype, monkeypatch):
    """The statistics a GSC conv emits describe its output as stored, whatever the prologue's SiLU."""
    monkeypatch.setattr(conv_kernels, "SILU_MODE_OVERRIDE", gp.SILU_TANH_EMULATED)
    y, stats = _run_case(2, 24, 32, (9, 7), "gsc", 8, dtype)
    _check_stats(y, stats, 8, f"gsc tanh {dtype}")


def test_prologue_modes_leave_the_upsample_conv_bitwise_unchanged(monkeypatch):
    """The upsample conv has no prologue: every SiLU mode gives the same bits."""
    base = _run_case(1, 16, 16, (5, 6), "up", 4, torch.bfloat16, emit=False)
    monkeypatch.setattr(conv_kernels, "SILU_MODE_OVERRIDE", gp.SILU_TANH_EMULATED)
    assert torch.equal(_run_case(1, 16, 16, (5, 6), "up", 4, torch.bfloat16, emit=False), base)


def test_interpreter_runs_the_exact_prologue_by_default():
    """Under the interpreter the kernel keeps `tl.sigmoid` (mode 0): CPU results and golden outputs unchanged."""
    assert conv_kernels.SILU_MODE_OVERRIDE is None and conv_kernels.silu_mode() == gp.SILU_EXACT
