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
