"""Nearest-2x upsample + 3x3 conv as four 2x2 phase convs (kernels/conv.py, `sdvae_fast.ops.upsample_conv2d`).

The fold is checked first in float64 with plain PyTorch; the kernel then runs under the Triton interpreter and is
compared with float64 `interpolate + conv2d` of the same low-precision inputs (fp16/bf16 within 2x PyTorch's own
error in that dtype plus 1e-4, fp32 within 1e-5 relative L2).
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, error_report
from sdvae_fast import ops
from sdvae_fast.kernels import conv as conv_kernels
from sdvae_fast.kernels._common import derived_weights


def _random_image(shape, dtype, layout="nchw", mean=0.5):
    """Fresh random (N, C, H, W) input with a non-zero mean, in NCHW, channels_last or a non-contiguous view."""
    n, c, h, w = shape
    x = torch.randn(shape) + mean
    if layout == "channels_last":
        return x.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        wide = torch.randn(n, c + 2, 2 * h, w)  # a channel slice with a step on H
        wide[:, 1:1 + c, ::2] = x
        return wide.to(dtype)[:, 1:1 + c, ::2]
    return x.to(dtype)


def _upsample_conv_eager(x, weight, bias, dtype):
    """PyTorch's interpolate(nearest, 2x) + conv2d(padding=1) with every tensor cast to `dtype`."""
    up = F.interpolate(x.to(dtype), scale_factor=2.0, mode="nearest")
    return F.conv2d(up, weight.to(dtype), None if bias is None else bias.to(dtype), padding=1)


def test_fold_in_float64_equals_interpolate_then_conv_at_every_pixel():
    """Four 2x2 convs with the folded weights, interleaved, equal the 3x3 conv of the upsampled input."""
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64) + 0.5
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    folded = conv_kernels.fold_upsample_weight(weight)  # (2, 2, C_out, C_in, 2, 2)
    out = torch.empty(2, 4, 10, 14, dtype=torch.float64)
    for a in (0, 1):
        for b in (0, 1):
            # Phase (a, b) reads input rows (i - 1 + a, i + a) and columns (j - 1 + b, j + b).
            padded = F.pad(x, (1 - b, b, 1 - a, a))
            out[:, :, a::2, b::2] = F.conv2d(padded, folded[a, b])  # (N, C_out, H, W)
    expected = _upsample_conv_eager(x, weight, None, torch.float64)
    assert (out - expected).abs().max().item() <= 1e-14 * expected.abs().max().item()


def test_fold_rejects_non_3x3_weights():
    with pytest.raises(ValueError, match="3, 3"):
        conv_kernels.fold_upsample_weight(torch.randn(2, 2, 5, 5))


UPSAMPLE_CASES = {
    "fp32-nchw-b3-5x7": (3, 16, 24, (5, 7), torch.float32, "nchw", True),
    "bf16-channels_last-b1-6x5": (1, 32, 16, (6, 5), torch.bfloat16, "channels_last", True),
    "fp16-noncontiguous-b3-4x9-nobias": (3, 16, 32, (4, 9), torch.float16, "noncontiguous", False),
    "bf16-1x1-input": (2, 16, 16, (1, 1), torch.bfloat16, "nchw", True),
    "sd-128to128-bf16-3x3": (1, 128, 128, (3, 3), torch.bfloat16, "channels_last", True),
    "sd-256to128-fp16-2x2": (1, 256, 128, (2, 2), torch.float16, "nchw", True),
}


@pytest.mark.parametrize("case", list(UPSAMPLE_CASES), ids=list(UPSAMPLE_CASES))
def test_upsample_conv_matches_float64_reference(case):
    n, c_in, c_out, (h, w), dtype, layout, has_bias = UPSAMPLE_CASES[case]
    x = _random_image((n, c_in, h, w), dtype, layout)
    weight = (torch.randn(c_out, c_in, 3, 3) / (3 * c_in ** 0.5)).to(dtype)
    bias = (torch.randn(c_out) * 0.3).to(dtype) if has_bias else None
    out = torch.full((n, c_out, 2 * h, 2 * w), float("nan"), dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    y = conv_kernels.upsample_conv2d(x, weight, bias, out=out)
    expected = _upsample_conv_eager(x, weight, bias, torch.float64)
    if dtype == torch.float32:
        tol, torch_rel = 1e-5, 0.0
    else:
        torch_rel = error_report(_upsample_conv_eager(x, weight, bias, dtype), expected)["rel_l2"]
        tol = 2 * torch_rel + 1e-4
    assert_close(y, expected, rel_l2=tol, name=f"upsample {dtype} (torch rel {torch_rel:.2e})")


def test_public_op_runs_the_kernel_with_channels_last_output():
    x = _random_image((2, 16, 5, 3), torch.bfloat16)
    weight, bias = torch.randn(8, 16, 3, 3).bfloat16() * 0.1, torch.randn(8).bfloat16()
    packs = derived_weights.builds["upsample_pack"]
    y = ops.upsample_conv2d(x, weight, bias)
    assert derived_weights.builds["upsample_pack"] == packs + 1, "the kernel path did not run"
    assert y.shape == (2, 8, 10, 6) and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    expected = _upsample_conv_eager(x, weight, bias, torch.float64)
    torch_rel = error_report(_upsample_conv_eager(x, weight, bias, torch.bfloat16), expected)["rel_l2"]
    assert_close(y, expected, rel_l2=2 * torch_rel + 1e-4, name="ops.upsample_conv2d")


def test_image_alone_equals_its_slice_of_a_batch_bitwise():
    x = _random_image((3, 16, 4, 5), torch.float16, "channels_last")
    weight = torch.randn(16, 16, 3, 3).half() * 0.1
    assert torch.equal(ops.upsample_conv2d(x, weight)[2:3], ops.upsample_conv2d(x[2:3], weight))


def test_folded_weights_are_cached_and_refolded_after_in_place_change():
    x = _random_image((1, 8, 3, 4), torch.float32)
    weight = torch.nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
    packs = derived_weights.builds["upsample_pack"]
    with torch.no_grad():
        first = ops.upsample_conv2d(x, weight)
        again = ops.upsample_conv2d(x, weight)
        assert derived_weights.builds["upsample_pack"] == packs + 1 and torch.equal(first, again)
        weight[:, :, 1, 1] += 1.0  # an in-place update of one tap
        changed = ops.upsample_conv2d(x, weight)
    assert derived_weights.builds["upsample_pack"] == packs + 2
    expected = _upsample_conv_eager(x, weight.detach(), None, torch.float64)
    assert_close(changed, expected, rel_l2=1e-5, name="refolded")


def test_float64_falls_back_to_the_reference():
    x = _random_image((1, 4, 3, 5), torch.float64)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    packs = derived_weights.builds["upsample_pack"]
    y = ops.upsample_conv2d(x, weight)
    assert derived_weights.builds["upsample_pack"] == packs
    assert_close(y, _upsample_conv_eager(x, weight, None, torch.float64), rel_l2=1e-14, name="fp64")


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 4, 3, 5)
    with pytest.raises(ValueError, match="weight must be"):
        ops.upsample_conv2d(x, torch.randn(6, 4, 5, 5))
    with pytest.raises(ValueError, match="bias must be"):
        ops.upsample_conv2d(x, torch.randn(6, 4, 3, 3), torch.randn(5))
    with pytest.raises(ValueError, match="out must have shape"):
        conv_kernels.upsample_conv2d(x, torch.randn(6, 4, 3, 3), out=torch.empty(1, 6, 3, 5))


@pytest.mark.gpu
def test_gpu_upsample_conv_at_a_decoder_shape():
    """On CUDA: 256 channels at 64x64 -> 128x128, bf16, against float64 within 2x PyTorch's bf16 error."""
    torch.manual_seed(0)
    x = (torch.randn(1, 256, 64, 64, device="cuda") + 0.5).bfloat16().contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(256, 256, 3, 3, device="cuda") / 48).bfloat16()
    bias = torch.randn(256, device="cuda").bfloat16()
    y = ops.upsample_conv2d(x, weight, bias)
    expected = _upsample_conv_eager(x, weight, bias, torch.float64)
    torch_rel = error_report(_upsample_conv_eager(x, weight, bias, torch.bfloat16), expected)["rel_l2"]
    assert_close(y, expected, rel_l2=2 * torch_rel + 1e-4, name="gpu upsample bf16")
