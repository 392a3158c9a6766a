"""GPU checks at real Stable Diffusion sizes (run by bench/gpu_check.sh; skipped without CUDA by conftest).

- kernel parity in fp16 and bf16 at the shapes of a 512^2 SD decode, against float64 and within 2x PyTorch's own
  error in that dtype (the project's rule);
- the whole sd15-sized VAE on the fast path against the fp32 reference, unit by unit (`sdvae_fast.parity`);
- field case C03: a decode of latents [32, 4, 64, 64] equals 32 single-image decodes (docs/design.md, section 8:
  numerics never depend on the batch);
- field case C05: a 4096x4096 decode from latents [1, 4, 512, 512] in one pass, finite, with no constant or zero
  bands (the signature of int32 offset overflow or an unwritten tile).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, error_report

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


def _image(shape, dtype, channels_last=True):
    """Random activations with a non-zero mean, as a VAE's are."""
    x = (torch.randn(shape, device="cuda") * 1.5 + 0.3).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _gsc_eager(x, weight, bias, gamma, beta, residual, dtype):
    """GroupNorm(32) -> SiLU -> conv3x3 (+ residual) in PyTorch, computed in `dtype`."""
    h = F.silu(F.group_norm(x.to(dtype), 32, gamma.to(dtype), beta.to(dtype), eps=1e-6))
    y = F.conv2d(h, weight.to(dtype), bias.to(dtype), padding=1)
    return y if residual is None else y + residual.to(dtype)


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    """float64 references never use TF32; restore the flags afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# (C_in, C_out, side) of GSC convs in a 512^2 decode: the mid block at 64^2, the 512->256 conv at 256^2, and the
# 128-channel convs at full resolution.
GSC_SHAPES = [(512, 512, 64), (512, 256, 256), (128, 128, 512)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c_in,c_out,side", GSC_SHAPES, ids=[f"{a}to{b}at{s}" for a, b, s in GSC_SHAPES])
def test_gsc_conv_matches_float64_at_decoder_sizes(dtype, c_in, c_out, side):
    from sdvae_fast import ops

    torch.manual_seed(0)
    x = _image((1, c_in, side, side), dtype)
    weight = (torch.randn(c_out, c_in, 3, 3, device="cuda") / (3 * c_in**0.5)).to(dtype)
    bias = torch.randn(c_out, device="cuda").to(dtype)
    gamma, beta = (torch.rand(c_in, device="cuda") + 0.5).to(dtype), (torch.randn(c_in, device="cuda") * 0.2).to(dtype)
    residual = _image((1, c_out, side, side), dtype) if c_in == c_out else None
    y = ops.gn_silu_conv2d(x, weight, bias, norm_weight=gamma, norm_bias=beta, residual=residual)
    expected = _gsc_eager(x, weight, bias, gamma, beta, residual, torch.float64)
    torch_rel = error_report(_gsc_eager(x, weight, bias, gamma, beta, residual, dtype), expected)["rel_l2"]
    assert_close(y, expected, rel_l2=2 * torch_rel + 1e-4, name=f"gsc {c_in}->{c_out} at {side}^2 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_upsample_conv_matches_float64_at_the_last_upsample(dtype):
    """256 channels at 256^2 -> 512^2: the last Upsample2D of a 512^2 decode."""
    from sdvae_fast import ops

    torch.manual_seed(0)
    x = _image((1, 256, 256, 256), dtype)
    weight = (torch.randn(256, 256, 3, 3, device="cuda") / 48).to(dtype)
    bias = torch.randn(256, device="cuda").to(dtype)

    def eager(t):
        up = F.interpolate(x.to(t), scale_factor=2.0, mode="nearest")
        return F.conv2d(up, weight.to(t), bias.to(t), padding=1)

    expected = eager(torch.float64)
    torch_rel = error_report(eager(dtype), expected)["rel_l2"]
    assert_close(ops.upsample_conv2d(x, weight, bias), expected, rel_l2=2 * torch_rel + 1e-4,
                 name=f"upsample conv {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [4096, 4080], ids=["64x64", "60x68"])
def test_attention_matches_float64_at_mid_block_sizes(dtype, n):
    """One head of dim 512 over the latent tokens of a 512^2 image (and a ragged 60x68 latent)."""
    from sdvae_fast import ops

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 512, device="cuda").to(dtype) for _ in range(3))
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch_rel = error_report(F.scaled_dot_product_attention(q, k, v), expected)["rel_l2"]
    assert_close(ops.attention(q, k, v), expected, rel_l2=2 * torch_rel + 1e-4, name=f"attention N={n} {dtype}")


@pytest.fixture(scope="module")
def sd15():
    """The sd15 architecture (83.65 M parameters) with seeded weights, fp32, on CUDA."""
    from sdvae_fast import AutoencoderKL

    return AutoencoderKL.from_preset("sd15", seed=0).to("cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sd15_fast_path_passes_parity_at_512(sd15, dtype):
    """Every unit and the whole encode/decode within 2x PyTorch's error in that dtype (sdvae_fast.parity)."""
    from sdvae_fast.parity import run_parity

    report = run_parity(sd15, device=torch.device("cuda"), dtype=dtype, backend="triton", res=512, quiet=True)
    print(report.format())
    assert all(len(rows) > 2 for rows in report.rows.values()), "no unit rows: the reference hooks did not fire"
    assert report.passed, report.format()


def test_batch_of_32_decodes_equals_32_single_decodes(sd15):
    """Field case C03: the last upsample of [32, 4, 64, 64] has 2^31 elements; numerics never depend on batch."""
    vae = copy.deepcopy(sd15).to(torch.bfloat16)
    vae.set_backend("auto")
    torch.manual_seed(0)
    z = (torch.randn(32, 4, 64, 64, device="cuda") + 0.2).to(torch.bfloat16)
    with torch.no_grad():
        batched = vae.decode(z).sample
        assert batched.shape == (32, 3, 512, 512)
        for i in (0, 1, 15, 30, 31) + tuple(range(2, 30, 4)):
            single = vae.decode(z[i:i + 1]).sample
            assert torch.equal(batched[i:i + 1], single), (
                f"image {i}: batched decode differs from its single decode "
                f"(max abs {(batched[i:i + 1].float() - single.float()).abs().max().item():.3e})")


def test_4096_decode_in_one_pass_is_finite_without_bands(sd15):
    """Field case C05: latents [1, 4, 512, 512]; 2^31-element activations and 262144 attention tokens."""
    vae = copy.deepcopy(sd15).to(torch.bfloat16)
    vae.set_backend("auto")
    torch.manual_seed(0)
    z = (torch.randn(1, 4, 512, 512, device="cuda") + 0.2).to(torch.bfloat16)
    with torch.no_grad():
        image = vae.decode(z).sample.float()  # (1, 3, 4096, 4096)
    assert image.shape == (1, 3, 4096, 4096)
    assert torch.isfinite(image).all(), "non-finite pixels in the 4096^2 decode"
    # One band per latent row and column (8 pixels): none may be constant (zero spread) or all zero.
    rows = image.unflatten(2, (512, 8))  # (1, 3, 512, 8, 4096)
    row_spread = rows.amax(dim=(1, 3, 4)) - rows.amin(dim=(1, 3, 4))  # (1, 512)
    cols = image.unflatten(3, (512, 8))  # (1, 3, 4096, 512, 8)
    col_spread = cols.amax(dim=(1, 2, 4)) - cols.amin(dim=(1, 2, 4))  # (1, 512)
    bad_rows = (row_spread[0] < 1e-3).nonzero().flatten().tolist()
    bad_cols = (col_spread[0] < 1e-3).nonzero().flatten().tolist()
    assert not bad_rows and not bad_cols, f"constant bands at latent rows {bad_rows[:10]} / columns {bad_cols[:10]}"
    # The last rows come from the last latents, not from a wrapped-around offset into the first ones.
    assert not torch.equal(image[..., -8:, :], image[..., :8, :])
