"""GSC conv kernel (kernels/conv.py) through `sdvae_fast.ops.gn_silu_conv2d` and its launcher.

Runs under the Triton interpreter on CPU. Every parity check compares against a float64 PyTorch computation
(group_norm -> silu -> pad -> conv2d -> + residual) of the same low-precision inputs; fp16/bf16 results must be
within 2x PyTorch's own error in that dtype (plus a small margin), fp32 within 1e-5 relative L2.
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
from sdvae_fast.kernels._common import derived_weights

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _random_image(shape, dtype, layout="nchw", mean=0.5):
    """Fresh random (N, C, H, W) input with a non-zero mean, in NCHW, channels_last or a non-contiguous view."""
    n, c, h, w = shape
    x = torch.randn(shape) + mean + torch.linspace(-0.5, 0.5, c)[None, :, None, None]
    if layout == "channels_last":
        return x.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        wide = torch.randn(n, c + 2, h, 2 * w)  # a channel slice with a step on W
        wide[:, 1:1 + c, :, ::2] = x
        return wide.to(dtype)[:, 1:1 + c, :, ::2]
    return x.to(dtype)


def _pad4(padding):
    return [padding] * 4 if isinstance(padding, int) else list(padding)


def _gsc_eager(x, weight, bias, gamma, beta, num_groups, silu, stride, padding, residual, dtype):
    """group_norm -> silu -> pad -> conv2d -> + residual with PyTorch ops, every tensor cast to `dtype`."""
    h = x.to(dtype)
    if gamma is not None:
        h = F.group_norm(h, num_groups, gamma.to(dtype), beta.to(dtype), eps=1e-6)
        if silu:
            h = F.silu(h)
    h = F.pad(h, _pad4(padding))
    y = F.conv2d(h, weight.to(dtype), None if bias is None else bias.to(dtype), stride=stride)
    return y if residual is None else y + residual.to(dtype)


def _tolerance(dtype, torch_rel):
    """fp32: 1e-5 relative L2; fp16/bf16: 2x PyTorch's own relative error plus 1e-4."""
    return 1e-5 if dtype == torch.float32 else 2 * torch_rel + 1e-4


def run_gsc(n, c_in, c_out, hw, k, dtype, *, layout="nchw", num_groups=8, gn=True, silu=True, stride=1,
            padding=1, residual=False, residual_layout="nchw", bias=True, via="kernel"):
    """Run one GSC case on the kernel path and check it against float64 and PyTorch's own low precision.

    via="kernel": the launcher with a NaN-filled output; via="ops": the public op (and proves it took the
    kernel path: the fresh weight gets packed once).
    """
    h, w = hw
    x = _random_image((n, c_in, h, w), dtype, layout)
    weight = (torch.randn(c_out, c_in, k, k) / (c_in * k * k) ** 0.5).to(dtype)
    b = (torch.randn(c_out) * 0.3 + 0.1).to(dtype) if bias else None
    gamma = (torch.rand(c_in) + 0.5).to(dtype) if gn else None
    beta = (torch.randn(c_in) * 0.2).to(dtype) if gn else None
    pad = _pad4(padding)
    h_out = (h + pad[2] + pad[3] - k) // stride + 1
    w_out = (w + pad[0] + pad[1] - k) // stride + 1
    res = None
    if residual:
        res = _random_image((n, c_out, h_out, w_out), dtype, residual_layout)

    packs = derived_weights.builds["conv_pack"]
    if via == "ops":
        y = ops.gn_silu_conv2d(x, weight, b, norm_weight=gamma, norm_bias=beta, num_groups=num_groups,
                               eps=1e-6, silu=silu, stride=stride, padding=padding, residual=res)
    else:
        scale = shift = None
        if gn:
            mean, rstd = ops.group_norm_stats(x, num_groups, 1e-6)
            scale, shift = ops.gn_scale_shift(mean, rstd, gamma, beta)
        out = torch.full((n, c_out, h_out, w_out), float("nan"), dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        y = conv_kernels.gn_silu_conv2d(x, weight, b, scale, shift, res, silu=silu, stride=stride,
                                        padding=pad, out=out)
    assert derived_weights.builds["conv_pack"] == packs + 1, "the kernel path did not run"
    assert y.shape == (n, c_out, h_out, w_out) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)

    args = (weight, b, gamma, beta, num_groups, silu, stride, padding, res)
    expected = _gsc_eager(x, *args, torch.float64)
    torch_rel = error_report(_gsc_eager(x, *args, dtype), expected)["rel_l2"] if dtype != torch.float32 else 0
    assert_close(y, expected, rel_l2=_tolerance(dtype, torch_rel), name=f"gsc {dtype} (torch rel {torch_rel:.2e})")
    return x, y


# Each case: (n, c_in, c_out, (h, w), k, dtype, options). Channels per group 1/2/3/10/16, batch 1 and 3,
# odd sizes, three layouts; then the unit variants the VAE uses, through the public op.
GSC_CASES = {
    "3x3-fp32-nchw-b3-13x7-cpg2-residual": (3, 16, 48, (13, 7), 3, torch.float32,
                                           dict(num_groups=8, residual=True)),
    "3x3-bf16-channels_last-b1-13x7-cpg1": (1, 16, 48, (13, 7), 3, torch.bfloat16,
                                           dict(num_groups=16, layout="channels_last")),
    "3x3-fp16-noncontiguous-b3-9x11-cpg10-residual-cl": (3, 40, 24, (9, 11), 3, torch.float16,
                                                        dict(num_groups=4, layout="noncontiguous", residual=True,
                                                             residual_layout="channels_last")),
    "3x3-bf16-nchw-b3-7x6-cpg3": (3, 48, 32, (7, 6), 3, torch.bfloat16, dict(num_groups=16)),
    "3x3-fp32-channels_last-b1-5x6-cpg16": (1, 64, 64, (5, 6), 3, torch.float32,
                                           dict(num_groups=4, layout="channels_last")),
    "3x3-fp32-gn-downsample-stride2-pad0101": (1, 16, 24, (13, 7), 3, torch.float32,
                                              dict(num_groups=4, stride=2, padding=(0, 1, 0, 1))),
    # Through the public op: the VAE's units.
    "ops-1x1-shortcut-plain-bf16-residual": (3, 48, 32, (5, 7), 1, torch.bfloat16,
                                            dict(gn=False, residual=True, via="ops")),
    "ops-1x1-shortcut-plain-fp16-nobias": (1, 32, 16, (13, 7), 1, torch.float16,
                                          dict(gn=False, bias=False, via="ops", layout="channels_last")),
    "ops-downsample-plain-bf16": (3, 32, 32, (13, 7), 3, torch.bfloat16,
                                 dict(gn=False, stride=2, padding=(0, 1, 0, 1), via="ops")),
    "ops-conv_out-to-3-channels-bf16": (1, 32, 3, (9, 8), 3, torch.bfloat16, dict(num_groups=8, via="ops")),
    "ops-qkv-1x1-gn-no-silu-fp32": (1, 32, 96, (7, 9), 1, torch.float32, dict(silu=False, via="ops")),
    "ops-qkv-1x1-gn-no-silu-bf16-b3": (3, 32, 96, (7, 9), 1, torch.bfloat16,
                                      dict(silu=False, via="ops", layout="channels_last")),
    "ops-plain-3x3-fp32-residual": (1, 16, 24, (6, 5), 3, torch.float32,
                                   dict(gn=False, residual=True, via="ops")),
    # Real SD channel counts (32 groups) at small spatial sizes.
    "sd-128to256-bf16-4x4-residual": (1, 128, 256, (4, 4), 3, torch.bfloat16, dict(num_groups=32, residual=True)),
    "sd-256to256-fp16-3x3": (1, 256, 256, (3, 3), 3, torch.float16, dict(num_groups=32)),
    "sd-512to128-bf16-2x2": (1, 512, 128, (2, 2), 3, torch.bfloat16, dict(num_groups=32, layout="channels_last")),
    "sd-512-qkv-1x1-no-silu-fp32": (1, 512, 512, (3, 3), 1, torch.float32,
                                   dict(num_groups=32, silu=False, via="ops")),
}


@pytest.mark.parametrize("case", list(GSC_CASES), ids=list(GSC_CASES))
def test_gsc_matches_float64_reference(case):
    n, c_in, c_out, hw, k, dtype, options = GSC_CASES[case]
    run_gsc(n, c_in, c_out, hw, k, dtype, **options)


def test_image_alone_equals_its_slice_of_a_batch_bitwise():
    x = _random_image((3, 16, 13, 7), torch.bfloat16, "channels_last")
    weight = torch.randn(24, 16, 3, 3).bfloat16() * 0.1
    gamma, beta = torch.rand(16) + 0.5, torch.randn(16)
    res = _random_image((3, 24, 13, 7), torch.bfloat16)
    kwargs = dict(norm_weight=gamma, norm_bias=beta, num_groups=8)
    batch = ops.gn_silu_conv2d(x, weight, **kwargs, residual=res)
    alone = ops.gn_silu_conv2d(x[1:2], weight, **kwargs, residual=res[1:2])
    assert torch.equal(batch[1:2], alone)


def test_two_runs_are_bitwise_equal():
    x = _random_image((1, 32, 9, 7), torch.float16)
    weight = torch.randn(16, 32, 3, 3).half() * 0.1
    first = ops.gn_silu_conv2d(x, weight, norm_weight=torch.ones(32), num_groups=8)
    second = ops.gn_silu_conv2d(x, weight, norm_weight=torch.ones(32), num_groups=8)
    assert torch.equal(first, second)


def test_precomputed_stats_give_the_same_result():
    x = _random_image((1, 16, 7, 5), torch.float32)
    weight, gamma = torch.randn(8, 16, 3, 3) * 0.1, torch.rand(16) + 0.5
    stats = ops.group_norm_stats(x, 4)
    y_own = ops.gn_silu_conv2d(x, weight, norm_weight=gamma, num_groups=4)
    y_given = ops.gn_silu_conv2d(x, weight, norm_weight=gamma, num_groups=4, stats=stats)
    assert torch.equal(y_own, y_given)


def test_weight_cache_packs_once_and_refolds_after_in_place_change():
    x = _random_image((1, 16, 5, 6), torch.float32)
    weight = torch.nn.Parameter(torch.randn(8, 16, 3, 3) * 0.1)
    packs = derived_weights.builds["conv_pack"]
    with torch.no_grad():
        first = ops.gn_silu_conv2d(x, weight)
        again = ops.gn_silu_conv2d(x, weight)
        assert derived_weights.builds["conv_pack"] == packs + 1 and torch.equal(first, again)
        weight.mul_(-2.0)
        changed = ops.gn_silu_conv2d(x, weight)
    assert derived_weights.builds["conv_pack"] == packs + 2
    assert_close(changed, -2.0 * first, rel_l2=1e-6, name="refolded")


def test_inference_mode_weights_are_packed_without_a_version_counter():
    with torch.inference_mode():
        x = _random_image((1, 16, 5, 6), torch.float32)
        weight = torch.randn(8, 16, 3, 3) * 0.1  # an inference tensor: no version counter
        out = ops.gn_silu_conv2d(x, weight)
        again = ops.gn_silu_conv2d(x, weight)
    expected = F.conv2d(x.double(), weight.double(), padding=1)
    assert_close(out, expected, rel_l2=1e-6, name="inference-mode conv")
    assert torch.equal(out, again)


def test_channels_not_divisible_by_groups_raises_naming_both_numbers():
    x = torch.randn(1, 50, 4, 4)
    with pytest.raises(ValueError, match=r"50.*32"):
        ops.gn_silu_conv2d(x, torch.randn(8, 50, 3, 3), norm_weight=torch.ones(50), num_groups=32)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 8, 5, 5)
    w = torch.randn(4, 8, 3, 3)
    with pytest.raises(ValueError, match="weight must be"):
        ops.gn_silu_conv2d(x, torch.randn(4, 6, 3, 3))
    with pytest.raises(ValueError, match="residual must be"):
        ops.gn_silu_conv2d(x, w, residual=torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="padding"):
        ops.gn_silu_conv2d(x, w, padding=(1, 1))
    with pytest.raises(ValueError, match="norm_weight"):
        ops.gn_silu_conv2d(x, w, norm_weight=torch.ones(6), num_groups=2)
    with pytest.raises(ValueError, match="stats"):
        ops.gn_silu_conv2d(x, w, norm_weight=torch.ones(8), num_groups=2, stats=(torch.zeros(1, 4),) * 2)
    with pytest.raises(ValueError, match="1x1 or 3x3"):
        conv_kernels.gn_silu_conv2d(x, torch.randn(4, 8, 5, 5), padding=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="stride"):
        conv_kernels.gn_silu_conv2d(x, w, stride=3)
    with pytest.raises(ValueError, match="scale and shift"):
        conv_kernels.gn_silu_conv2d(x, w, scale=torch.ones(1, 8))
    with pytest.raises(TypeError, match="float64"):
        conv_kernels.gn_silu_conv2d(x.double(), w.double())


@pytest.mark.parametrize(
    "dtype, k, stride",
    [(torch.float64, 3, 1), (torch.float32, 5, 1), (torch.float32, 3, 3)],
    ids=["fp64", "5x5-kernel", "stride3"],
)
def test_unsupported_cases_fall_back_to_the_reference(dtype, k, stride):
    x = _random_image((2, 8, 7, 6), dtype)
    weight = torch.randn(4, 8, k, k, dtype=dtype) * 0.1
    gamma = torch.rand(8, dtype=dtype) + 0.5
    packs = derived_weights.builds["conv_pack"]
    y = ops.gn_silu_conv2d(x, weight, norm_weight=gamma, num_groups=4, stride=stride, padding=k // 2)
    assert derived_weights.builds["conv_pack"] == packs
    expected = _gsc_eager(x, weight, None, gamma, torch.zeros(8, dtype=dtype), 4, True, stride, k // 2, None,
                          torch.float64)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected, rel_l2=1e-12 if dtype == torch.float64 else 1e-5, name="fallback")


def test_cpu_without_interpreter_falls_back_to_the_reference():
    """A fresh interpreter-less process: every op runs the PyTorch reference on CPU and gets it right."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from sdvae_fast import ops
        from sdvae_fast.kernels._common import derived_weights
        torch.manual_seed(0)
        x = torch.randn(2, 8, 5, 6) + 0.5
        w = torch.randn(4, 8, 3, 3) * 0.1
        mean, rstd = ops.group_norm_stats(x, 4)
        ref = F.group_norm(x.double(), 4, eps=1e-6)
        y = ops.gn_silu_conv2d(x, w, norm_weight=torch.ones(8), num_groups=4)
        y_ref = F.conv2d(F.silu(ref), w.double(), padding=1)
        u = ops.upsample_conv2d(x, w)
        u_ref = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), w.double(), padding=1)
        assert len(derived_weights) == 0
        assert (y.double() - y_ref).abs().max() < 1e-5, "gn_silu_conv2d"
        assert (u.double() - u_ref).abs().max() < 1e-5, "upsample_conv2d"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# int64 offsets: tensors whose element offsets pass 2^31, made cheaply as views of sparse memory-mapped files
# ---------------------------------------------------------------------------------------------------------------


def _huge_view(directory, name, shape, strides, dtype):
    """An as_strided view of a sparse file large enough for `strides`: only the pages touched use memory."""
    numel = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
    path = os.path.join(directory, name)
    try:
        with open(path, "wb") as f:
            f.truncate(numel * torch.empty((), dtype=dtype).element_size())
        if os.stat(path).st_blocks * 512 > (1 << 20):
            pytest.skip("the temp filesystem cannot make sparse files (a 2^31-element test tensor needs one)")
        storage = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    except (OSError, RuntimeError) as error:
        pytest.skip(f"the temp filesystem cannot map a sparse {numel}-element file: {error}")
    return torch.as_strided(storage, shape, strides)


def test_offsets_beyond_2_31_elements_in_stats_conv_residual_and_output(tmp_path):
    """Channel and batch strides of 2^29..3*2^30 elements: int32 offsets would wrap and read the wrong data."""
    x = _huge_view(tmp_path, "x", (2, 8, 3, 5), (15, 1 << 29, 5, 1), torch.float16)  # c*stride up to 3.8e9
    res = _huge_view(tmp_path, "res", (2, 16, 3, 5), (3 << 30, 1, 80, 16), torch.float16)  # n*stride = 3.2e9
    out = _huge_view(tmp_path, "out", (2, 16, 3, 5), (15, (1 << 28) + 3, 5, 1), torch.float16)
    x_small = _random_image((2, 8, 3, 5), torch.float16)
    res_small = _random_image((2, 16, 3, 5), torch.float16)
    x.copy_(x_small)
    res.copy_(res_small)
    out.fill_(float("nan"))
    weight = torch.randn(16, 8, 3, 3).half() * 0.2

    stats = ops.group_norm_stats(x, 4)
    stats_small = ops.group_norm_stats(x_small, 4)
    assert torch.equal(stats[0], stats_small[0]) and torch.equal(stats[1], stats_small[1])
    scale, shift = ops.gn_scale_shift(*stats, torch.ones(8), torch.zeros(8))
    conv_kernels.gn_silu_conv2d(x, weight, None, scale, shift, res, out=out)
    expected = conv_kernels.gn_silu_conv2d(x_small, weight, None, scale, shift, res_small)
    assert torch.equal(out.clone(), expected)


def test_upsample_output_beyond_2_31_elements(tmp_path):
    """The 4096^2 decode's last upsample writes 2^32 elements per image: offsets that large, written exactly."""
    x = _huge_view(tmp_path, "x", (1, 4, 3, 5), (15, 3 << 30, 5, 1), torch.bfloat16)
    out = _huge_view(tmp_path, "out", (1, 8, 6, 10), (60, 1 << 29, 10, 1), torch.bfloat16)  # up to 3.8e9
    x_small = _random_image((1, 4, 3, 5), torch.bfloat16)
    x.copy_(x_small)
    out.fill_(float("nan"))
    weight, bias = torch.randn(8, 4, 3, 3).bfloat16(), torch.randn(8).bfloat16()
    conv_kernels.upsample_conv2d(x, weight, bias, out=out)
    assert torch.equal(out.clone(), conv_kernels.upsample_conv2d(x_small, weight, bias))


@pytest.mark.parametrize("mode", ["gsc", "upsample"])
def test_channels_last_tensors_beyond_2_31_elements_use_int32_tile_offsets_correctly(tmp_path, mode):
    """Rows 2^26 elements apart, channels contiguous: offsets pass 2^31 from the image start but not within a tile,
    so the kernel runs with int32 tile offsets from int64 tile bases (`WIDE_OFFSETS` off) and must be exact."""
    row = 1 << 26
    h, w = (40, 256) if mode == "gsc" else (20, 128)
    ho, wo = (h, w) if mode == "gsc" else (2 * h, 2 * w)
    x = _huge_view(tmp_path, "x", (1, 8, h, w), (h * row, 1, row, 8), torch.bfloat16)
    out = _huge_view(tmp_path, "out", (1, 16, ho, wo), (ho * row, 1, row, 16), torch.bfloat16)
    upsample = mode == "upsample"
    assert (ho - 1) * row > 2**31
    assert not conv_kernels._needs_wide_offsets(x, None, out, w, 1, 2 if upsample else 3, upsample)
    x_small = _random_image((1, 8, h, w), torch.bfloat16, "channels_last")
    x.copy_(x_small)
    out.fill_(float("nan"))
    weight, bias = torch.randn(16, 8, 3, 3).bfloat16() * 0.2, torch.randn(16).bfloat16()
    if mode == "gsc":
        scale, shift = torch.rand(1, 8) + 0.5, torch.randn(1, 8) * 0.1
        conv_kernels.gn_silu_conv2d(x, weight, bias, scale, shift, out=out)
        expected = conv_kernels.gn_silu_conv2d(x_small, weight, bias, scale, shift)
    else:
        conv_kernels.upsample_conv2d(x, weight, bias, out=out)
        expected = conv_kernels.upsample_conv2d(x_small, weight, bias)
    assert torch.equal(out.clone(), expected)


def test_autotune_candidates_follow_the_output_width():
    """Narrow tiles only for conv_out-like widths, wide ones otherwise, 256-wide only where C_out reaches 256."""
    widths = {c_out: {c.kwargs["BLOCK_N"] for c in conv_kernels.configs_for_width(conv_kernels.CONV_CONFIGS, c_out)}
              for c_out in (3, 32, 128, 512)}
    assert widths[3] == widths[32] == {16, 32}
    assert widths[128] == {64, 128} and widths[512] == {64, 128, 256}
    assert all(len(conv_kernels.configs_for_width(conv_kernels.CONV_CONFIGS, c)) <= 5 for c in (3, 128, 512))


def test_huge_channel_strides_switch_to_int64_tile_offsets():
    """NCHW at 4096^2 (channel stride 2^24, 256 channels): a tile's span passes 2^31, so WIDE_OFFSETS is set."""
    x = torch.empty_strided((1, 256, 4096, 4096), (1 << 32, 1 << 24, 4096, 1), device="meta")
    assert conv_kernels._needs_wide_offsets(x, None, None, 4096, 1, 3, False)
    nhwc = torch.empty_strided((1, 256, 4096, 4096), (1 << 32, 1, 1 << 20, 256), device="meta")
    assert not conv_kernels._needs_wide_offsets(nhwc, None, nhwc, 4096, 1, 3, False)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile and the GPU-only precision check
# ---------------------------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_traces_the_ops():
    """custom_op + fake: a function calling all three ops compiles without graph breaks and runs the kernels."""
    def decoder_piece(x, w1, gamma, beta, w2, shortcut):
        h = ops.gn_silu_conv2d(x, w1, norm_weight=gamma, norm_bias=beta, num_groups=4, residual=shortcut)
        return ops.upsample_conv2d(h, w2)

    args = (_random_image((1, 8, 5, 4), torch.float32), torch.randn(8, 8, 3, 3) * 0.1, torch.rand(8) + 0.5,
            torch.randn(8), torch.randn(8, 8, 3, 3) * 0.1, torch.randn(1, 8, 5, 4))
    compiled = torch.compile(decoder_piece, fullgraph=True)  # inductor, as users run it
    assert_close(compiled(*args), decoder_piece(*args), rel_l2=1e-6, name="compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_gsc_at_a_decoder_shape(dtype):
    """On CUDA: 256->256 at 64x64. fp32 uses TF32 like eager convs (documented tolerance 5e-3 rel L2)."""
    torch.manual_seed(0)
    x = (torch.randn(2, 256, 64, 64, device="cuda") + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(256, 256, 3, 3, device="cuda") / 48).to(dtype)
    gamma, beta = torch.rand(256, device="cuda") + 0.5, torch.randn(256, device="cuda") * 0.2
    res = torch.randn(2, 256, 64, 64, device="cuda").to(dtype)
    y = ops.gn_silu_conv2d(x, w, norm_weight=gamma, norm_bias=beta, residual=res)
    args = (w, None, gamma, beta, 32, True, 1, 1, res)
    expected = _gsc_eager(x, *args, torch.float64)
    torch_rel = error_report(_gsc_eager(x, *args, dtype), expected)["rel_l2"]
    tol = 5e-3 if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else _tolerance(dtype, torch_rel)
    assert_close(y, expected, rel_l2=tol, name=f"gpu gsc {dtype}")


# What both sm_90 compile tests run in a fresh interpreter-less process: helpers to compile a kernel for sm_90 with
# Triton's bundled ptxas, as the JIT would for channels_last bf16 inputs, and to read its stack (spill) bytes.
_SM90_PRELUDE = textwrap.dedent("""
        import os, re, subprocess, tempfile
        import triton
        from triton.backends.compiler import GPUTarget
        from sdvae_fast.kernels import conv, group_norm

        CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

        def build(fn, pointers, constexprs, aligned, **options):
            names = fn.arg_names
            signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
            source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

        def stack_bytes(kernel):
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
            return int(re.search(r"STACK:(\\d+)", usage).group(1))

        pointers = {p: "*bf16" for p in ("x_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr")}
        pointers.update(scale_ptr="*fp32", shift_ptr="*fp32", stats_ptr="*fp32", tiles_ptr="*i32")
        aligned = set(pointers) | {"C_in", "C_out", "sxh", "sxw", "srh", "srw", "soh", "sow"}

        def build_conv(config, k, gn, up, emit, wide=False):
            constexprs = dict(sxc=1, src=1, soc=1, KH=k, KW=k, APPLY_GN=gn, APPLY_SILU=gn, HAS_BIAS=True,
                              HAS_RESIDUAL=not up, UPSAMPLE_2X=up, DOT_FP32=False, INPUT_PRECISION="tf32",
                              ROUND_TO_BF16=False, EMIT_STATS=emit, STATS_GS=4, WIDE_OFFSETS=wide,
                              SILU_MODE=conv.silu_mode(), EVEN_K=True, TWO_SOURCES=False, X2_SHIFT=0,
                              RESIDUAL_SHIFT=0, sx2c=1, **config.kwargs)  # the GPU's prologue; one source
            return build(conv._conv_kernel.fn, pointers, constexprs, aligned, num_warps=config.num_warps,
                         num_stages=config.num_stages)

""")


def _run_sm90(body: str) -> str:
    """Run `_SM90_PRELUDE + body` without the interpreter; skip when ptxas is missing; return its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SM90_PRELUDE + textwrap.dedent(body)], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing on this machine")
    print(done.stdout)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    return done.stdout


def test_kernels_compile_for_hopper_with_tensor_core_pipelines():
    """Without a GPU: compile the GSC (with and without emitted statistics, int32 and int64 tile offsets),
    upsample and GroupNorm kernels for sm_90; the GEMM must run on wgmma with cp.async pipelining."""
    _run_sm90("""
        for k, gn, up, emit, wide in ((3, True, False, False, False), (3, True, False, True, False),
                                      (2, False, True, True, False), (3, True, False, False, True)):
            ttgir = build_conv(conv.CONV_CONFIGS[0], k, gn, up, emit, wide).asm["ttgir"]
            assert "warp_group_dot" in ttgir and "async_copy_global_to_local" in ttgir, (k, gn, up, emit, wide)
        build(group_norm._gn_partial_kernel, {"x_ptr": "*bf16", "part_ptr": "*fp32"}, dict(BLOCK_P=256, BLOCK_C=16),
              {"x_ptr", "part_ptr"}, num_warps=4)
        merge_pointers = {p: "*fp32" for p in ("part_ptr", "mean_ptr", "rstd_ptr", "count_out_ptr", "mean_out_ptr",
                                                "m2_out_ptr")}
        merge_pointers["tiles_ptr"] = "*i32"
        for store in (False, True):
            build(group_norm._gn_merge_partials_kernel, {**merge_pointers, "eps": "fp32"},
                  dict(BLOCK_S=1024, STORE_PARTIALS=store), set(merge_pointers), num_warps=4)
        print("ok")
    """)


def test_no_conv_config_spills_more_than_256_bytes_on_hopper():
    """Every CONV_CONFIGS entry, compiled for sm_90 as the heaviest variant (3x3 GSC with residual and emitted
    statistics), keeps its per-thread stack (`cuobjdump -res-usage`: spills) at 256 bytes or less."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip(f"Triton's bundled cuobjdump is missing ({cuobjdump}): spills cannot be read")
    _run_sm90("""
        spills = {str(c): stack_bytes(build_conv(c, 3, True, False, True)) for c in conv.CONV_CONFIGS}
        print(spills)
        assert max(spills.values()) <= 256, spills
        print("ok")
    """)
