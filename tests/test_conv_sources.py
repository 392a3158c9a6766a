"""The conv kernel's UNet modes (issue 13) through `sdvae_fast.ops.fused_conv2d` and the launchers, under the
Triton interpreter, against float64 PyTorch built from `cat`, `interpolate` and `conv2d`:

- two sources: the input is `cat([x, x2], dim=1)`, read from both tensors (ragged channel counts, a GroupNorm
  group straddling the two, whose statistics come from `ops.group_norm_stats_two_sources`);
- a second source at 1/8 resolution, nearest-upsampled by indexing (the consistency decoder's conv_in);
- the 4-phase upsample conv with GroupNorm + SiLU in its prologue (an upsampling ResNet's conv1);
- a residual at half resolution read by indexing (an upsampling ResNet's conv2);
and the sm_90 compile of those variants (wgmma, cp.async, spills). fp32 within 1e-5 relative L2, bf16 within 2x
PyTorch's own bf16 error plus 1e-4.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, error_report
from sdvae_fast import ops
from sdvae_fast.kernels import conv as conv_kernels


def _image(shape, dtype=torch.float32, layout="nchw", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) + 0.3
    if layout == "channels_last":
        return x.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        return x.to(dtype).transpose(2, 3).contiguous().transpose(2, 3)[:, :, :, :]  # W-major strides
    return x.to(dtype)


def _group_norm_terms(a, num_groups, gamma, beta):
    """(scale, shift), (N, C) float64, of GroupNorm(num_groups, gamma, beta, eps=1e-5) over the tensor a."""
    n, c = a.shape[:2]
    g = a.double().reshape(n, num_groups, -1)
    var, mean = torch.var_mean(g, dim=-1, unbiased=False)
    rstd = (var + 1e-5).rsqrt()
    scale = rstd.repeat_interleave(c // num_groups, dim=1) * gamma.double()
    return scale, beta.double() - mean.repeat_interleave(c // num_groups, dim=1) * scale


def _expected(a, weight, bias, scale, shift, *, silu=True, upsample=False, residual=None, residual_up=1, dtype):
    """act(a * scale + shift) [-> nearest 2x] -> conv2d (padding k//2) [+ up(residual)] in `dtype`."""
    h = a.to(dtype)
    if scale is not None:
        h = h * scale.to(dtype)[:, :, None, None] + shift.to(dtype)[:, :, None, None]
        if silu:
            h = F.silu(h)
    if upsample:
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
    y = F.conv2d(h, weight.to(dtype), bias.to(dtype), padding=weight.shape[-1] // 2)
    if residual is not None:
        y = y + F.interpolate(residual.to(dtype), scale_factor=float(residual_up), mode="nearest")
    return y


def _check(y, a, weight, bias, scale, shift, dtype, name, **kwargs):
    expected = _expected(a, weight, bias, scale, shift, dtype=torch.float64, **kwargs)
    if dtype == torch.float32:
        return assert_close(y, expected, rel_l2=1e-5, name=name)
    # PyTorch's own error in the low precision: its ops on the same low-precision inputs.
    torch_rel = error_report(_expected(a, weight, bias, scale.to(dtype) if scale is not None else None,
                                       shift.to(dtype) if shift is not None else None, dtype=torch.float32,
                                       **kwargs).to(dtype), expected)["rel_l2"]
    return assert_close(y, expected, rel_l2=2 * torch_rel + 1e-4, name=f"{name} (torch rel {torch_rel:.1e})")


# (N, C1, C2, H, W, k, num_groups, dtype, layout): channel counts off BLOCK_K multiples, a group straddling the
# two sources (C1 = 12, 13 channels per group), batch 1 and 3, odd sizes, three layouts.
TWO_SOURCE_CASES = {
    "3x3-fp32-b3-straddling-group": (3, 12, 14, 7, 9, 3, 2, torch.float32, "nchw"),
    "3x3-bf16-b1-channels_last": (1, 24, 40, 5, 6, 3, 8, torch.bfloat16, "channels_last"),
    "1x1-shortcut-fp32-noncontiguous": (2, 20, 12, 6, 5, 1, 4, torch.float32, "noncontiguous"),
    "3x3-fp32-block-multiples": (1, 64, 64, 3, 4, 3, 8, torch.float32, "channels_last"),
}


@pytest.mark.parametrize("case", list(TWO_SOURCE_CASES), ids=list(TWO_SOURCE_CASES))
def test_two_source_gsc_equals_the_conv_of_the_concatenation(case):
    n, c1, c2, h, w, k, groups, dtype, layout = TWO_SOURCE_CASES[case]
    x, x2 = _image((n, c1, h, w), dtype, layout, 1), _image((n, c2, h, w), dtype, "channels_last", 2)
    cat = torch.cat([x, x2], dim=1)
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(19, c1 + c2, k, k, generator=gen) / ((c1 + c2) * k * k) ** 0.5).to(dtype)
    bias = torch.randn(19, generator=gen).to(dtype)
    gamma, beta = torch.rand(c1 + c2, generator=gen) + 0.5, torch.randn(c1 + c2, generator=gen) * 0.2
    mean, rstd = ops.group_norm_stats_two_sources(x, x2, groups, 1e-5)
    scale, shift = ops.gn_scale_shift(mean, rstd, gamma, beta)
    exp_scale, exp_shift = _group_norm_terms(cat, groups, gamma, beta)
    assert_close(scale, exp_scale, rel_l2=1e-6, name="two-source GroupNorm scale")
    assert_close(shift, exp_shift, rel_l2=1e-6, name="two-source GroupNorm shift")
    out = torch.full((n, 19, h, w), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = conv_kernels.gn_silu_conv2d(x, weight, bias, scale, shift, x2=x2, padding=[k // 2] * 4, out=out)
    _check(y, cat, weight, bias, exp_scale, exp_shift, dtype, case)
    # plain (no prologue), through the registered op, emitting the output's statistics
    y, (m, r) = ops.fused_conv2d(x, weight, bias, x2=x2, emit_stats=(1, 1e-5))
    _check(y, cat, weight, bias, None, None, dtype, f"{case} plain")
    assert_close(m, y.double().mean(dim=(1, 2, 3))[:, None], rel_l2=1e-5, name="emitted mean")


def test_second_source_upsampled_8x_by_indexing_like_the_consistency_conv_in():
    """conv_in of the consistency decoder: [x_t (3 ch) | up8(z) (4 ch)] * scale + shift, no SiLU, batch 2,
    latents 1x2 (8x16 pixels), a NaN-filled output."""
    x, z = _image((2, 3, 8, 16), seed=4), _image((2, 4, 1, 2), seed=5)
    gen = torch.Generator().manual_seed(6)
    weight, bias = torch.randn(10, 7, 3, 3, generator=gen), torch.randn(10, generator=gen)
    scale, shift = torch.randn(2, 7, generator=gen), torch.randn(2, 7, generator=gen)
    a = torch.cat([x, F.interpolate(z, scale_factor=8.0, mode="nearest")], dim=1)
    out = torch.full((2, 10, 8, 16), float("nan")).contiguous(memory_format=torch.channels_last)
    y = conv_kernels.gn_silu_conv2d(x, weight, bias, scale, shift, silu=False, x2=z, x2_upsample=8, out=out)
    _check(y, a, weight, bias, scale.double(), shift.double(), torch.float32, "conv_in x2 up8", silu=False)
    alone = ops.fused_conv2d(x[1:], weight, bias, scale=scale[1:], shift=shift[1:], silu=False, x2=z[1:],
                             x2_upsample=8)
    assert torch.equal(alone, y[1:]), "an image alone differs from its slice of the batch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_upsampling_resnet_convs_prologue_before_4_phase_and_half_resolution_residual(dtype):
    """conv1: nearest-2x of silu(norm1(x)) in the 4-phase form with the prologue at low resolution; conv2: a
    GSC conv whose residual is the block's input read at (oh // 2, ow // 2). Emitted statistics of conv1."""
    n, c, h, w = 3, 12, 5, 7
    x = _image((n, c, h, w), dtype, "channels_last", 7)
    gen = torch.Generator().manual_seed(8)
    w1, b1 = (torch.randn(c, c, 3, 3, generator=gen) / (9 * c) ** 0.5).to(dtype), torch.randn(c, generator=gen)
    gamma, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.2
    scale, shift = _group_norm_terms(x, 4, gamma, beta)
    h1, (mean, _) = ops.fused_conv2d(x, w1, b1.to(dtype), scale=scale.float(), shift=shift.float(), upsample=True,
                                     emit_stats=(4, 1e-5))
    _check(h1, x, w1, b1, scale, shift, dtype, "upsample conv1 with prologue", upsample=True)
    assert_close(mean, h1.double().reshape(n, 4, -1).mean(-1), rel_l2=1e-5, name="emitted mean of conv1")
    s2, t2 = _group_norm_terms(h1, 4, gamma, beta)
    y = ops.fused_conv2d(h1, w1, b1.to(dtype), scale=s2.float(), shift=t2.float(), residual=x, residual_upsample=2)
    _check(y, h1, w1, b1, s2, t2, dtype, "conv2 + half-resolution residual", residual=x, residual_up=2)


def test_fused_conv2d_falls_back_to_the_reference_in_fp64_with_the_same_result():
    x, x2 = _image((2, 6, 4, 6), torch.float64, seed=9), _image((2, 2, 2, 3), torch.float64, seed=10)
    weight, bias = torch.randn(5, 8, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y = ops.fused_conv2d(x, weight, bias, x2=x2, x2_upsample=2)
    assert y.dtype == torch.float64
    a = torch.cat([x, F.interpolate(x2, scale_factor=2.0, mode="nearest")], dim=1)
    assert_close(y, F.conv2d(a, weight, bias, padding=1), rel_l2=1e-12, name="fp64 reference")


def test_bad_arguments_name_what_was_expected():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="x2_upsample must be a power of two"):
        ops.fused_conv2d(x, torch.randn(3, 6, 3, 3), x2=torch.randn(1, 2, 8, 8), x2_upsample=3)
    with pytest.raises(ValueError, match=r"x2 must be \(1, C2, 8/2, 8/2\)"):
        ops.fused_conv2d(x, torch.randn(3, 6, 3, 3), x2=torch.randn(1, 2, 3, 4), x2_upsample=2)
    with pytest.raises(ValueError, match=r"weight must be \(C_out, C_in=6"):
        ops.fused_conv2d(x, torch.randn(3, 4, 3, 3), x2=torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="residual must be"):
        ops.fused_conv2d(x, torch.randn(3, 4, 3, 3), residual=torch.randn(1, 3, 8, 8), residual_upsample=2)
    with pytest.raises(ValueError, match="upsample=True takes no x2"):
        ops.fused_conv2d(x, torch.randn(3, 6, 3, 3), x2=torch.randn(1, 2, 8, 8), upsample=True)
    with pytest.raises(TypeError, match="x2 must be torch.float32"):
        ops.fused_conv2d(x, torch.randn(3, 6, 3, 3), x2=torch.randn(1, 2, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible"):
        ops.group_norm_stats_two_sources(x, torch.randn(1, 3, 8, 8), 2, 1e-5)


_SM90 = textwrap.dedent("""
    import os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from sdvae_fast.kernels import conv

    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    pointers = {p: "*bf16" for p in ("x_ptr", "x2_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr")}
    pointers.update(scale_ptr="*fp32", shift_ptr="*fp32", stats_ptr="*fp32", tiles_ptr="*i32")
    aligned = set(pointers) | {"C_in", "C_in1", "C_out", "sxh", "sxw", "sx2h", "sx2w", "srh", "srw", "soh", "sow"}
    fn = conv._conv_kernel.fn
    config = conv.CONV_CONFIGS[0]
    results = {}
    # name: (KH, APPLY_GN, UPSAMPLE_2X, HAS_RESIDUAL, TWO_SOURCES, X2_SHIFT, RESIDUAL_SHIFT, EMIT_STATS)
    for name, (k, gn, up, res, two, x2s, rs, emit) in {
            "up-block conv1 (two sources)": (3, True, False, False, True, 0, 0, True),
            "up-block shortcut 1x1 (two sources)": (1, False, False, False, True, 0, 0, False),
            "conv_in (x2 up 8)": (3, True, False, False, True, 3, 0, True),
            "upsampling conv1 (4-phase + prologue)": (2, True, True, False, False, 0, 0, True),
            "upsampling conv2 (half-res residual)": (3, True, False, True, False, 0, 1, True)}.items():
        constexprs = dict(sxc=1, sx2c=1, src=1, soc=1, KH=k, KW=k, APPLY_GN=gn, APPLY_SILU=gn, HAS_BIAS=True,
                          HAS_RESIDUAL=res, UPSAMPLE_2X=up, DOT_FP32=False, INPUT_PRECISION="tf32",
                          ROUND_TO_BF16=False, EMIT_STATS=emit, STATS_GS=4, WIDE_OFFSETS=False,
                          SILU_MODE=conv.silu_mode(), EVEN_K=True, TWO_SOURCES=two, X2_SHIFT=x2s,
                          RESIDUAL_SHIFT=rs, **config.kwargs)
        names = fn.arg_names
        signature = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a in aligned}
        kernel = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                                          attrs=attrs), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        ttgir = kernel.asm["ttgir"]
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        results[name] = ("warp_group_dot" in ttgir, "async_copy_global_to_local" in ttgir,
                         int(re.search(r"STACK:(\\d+)", usage).group(1)))
    print(results)
    print("ok")
""")


def test_unet_modes_compile_for_hopper_on_wgmma_with_bounded_spills():
    """The five UNet variants, compiled for sm_90 with the default tile (128x128x64, 8 warps, 3 stages): the GEMM
    on wgmma with cp.async pipelining, and per-thread stack (spills) at most 256 bytes, except conv_in with its
    8x-upsampled second source (288 measured with triton 3.9; at most 320; its other tiles spill <= 96 bytes)."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip(f"Triton's bundled cuobjdump is missing ({cuobjdump}): spills cannot be read")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SM90], env=env, capture_output=True, text=True, timeout=900)
    print(done.stdout)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    results = eval(done.stdout.splitlines()[0])  # {name: (wgmma, cp.async, stack bytes)}
    for name, (wgmma, cp_async, stack) in results.items():
        assert wgmma and cp_async, name
        assert stack <= (320 if name.startswith("conv_in") else 256), (name, stack)
