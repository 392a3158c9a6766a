"""The fast path end to end (sdvae_fast.fast) against diffusers' AutoencoderKL with identical weights.

Runs the Triton kernels on CPU under the interpreter (backend "triton", TRITON_INTERPRET=1 from conftest). The
interpreter costs seconds per launch, so the VAE is narrow (widths 32/32/64/64, 8 groups, one ResNet per level)
but full depth (four levels, mid-block attention), latents are at most 3x5, and each expensive forward runs once
in a module-scoped fixture shared by the assertions that need it.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from sdvae_fast import fast
from tests.helpers import assert_close

# The upsample op, with or without the GroupNorm statistics of its output (fast.EMIT_GN_STATS).
UPSAMPLE_OPS = {"sdvae_fast::upsample_conv2d", "sdvae_fast::upsample_conv2d_stats"}
# aten ops that must not run anywhere in a fast forward (the kernels replace them).
EAGER_OPS = ("aten::group_norm", "aten::native_group_norm", "aten::upsample_nearest2d",
             "aten::scaled_dot_product_attention", "aten::convolution")


def make_diffusers_vae(seed: int = 0, dtype=torch.float32) -> DiffusersAutoencoderKL:
    """A narrow, full-depth diffusers AutoencoderKL in eval mode with randomised (non-default) norms and biases."""
    torch.manual_seed(seed)
    vae = DiffusersAutoencoderKL(
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1 + 0.05)
            elif p.dim() == 1:  # GroupNorm gamma
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return vae if dtype == torch.float32 else vae.to(dtype)


def run_profiled(fn, *args):
    """fn(*args) under the CPU profiler; returns (result, set of op names seen)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, {e.name for e in prof.events()}


@pytest.fixture(scope="module")
def vae():
    return make_diffusers_vae()


def latents_batch3():
    """3 latents of odd size 1x3 with non-zero mean, channels_last."""
    torch.manual_seed(1)
    return (torch.randn(3, 4, 1, 3) + 0.5).contiguous(memory_format=torch.channels_last)


def images_batch3():
    """3 images of odd height 25 (25 -> 12 -> 6 -> 3 latent rows, as diffusers' Downsample2D pads) by 8."""
    torch.manual_seed(2)
    return torch.rand(3, 3, 25, 8) * 2 - 0.8


@pytest.fixture(scope="module")
def decode_batch3(vae):
    """(fast, diffusers) decode of latents_batch3()."""
    z = latents_batch3()
    with torch.no_grad():
        return fast.decode_sample(vae, z), vae.decode(z).sample


@pytest.fixture(scope="module")
def encode_batch3(vae):
    """(fast, diffusers) moments of images_batch3() (quant_conv folded into conv_out on the fast path)."""
    x = images_batch3()
    with torch.no_grad():
        return fast.encode_moments(vae, x), vae._encode(x)


@pytest.fixture(scope="module")
def decode_single(vae):
    """Fast decode of the second latent of latents_batch3() alone, under the profiler: (output, op names)."""
    with torch.no_grad():
        return run_profiled(fast.decode_sample, vae, latents_batch3()[1:2])


@pytest.fixture(scope="module")
def encode_single(vae):
    """Fast encode of the second image of images_batch3() alone, under the profiler: (output, op names)."""
    with torch.no_grad():
        return run_profiled(fast.encode_moments, vae, images_batch3()[1:2])


def test_decode_matches_diffusers_fp32_batch3_odd_channels_last_latents(decode_batch3):
    actual, expected = decode_batch3
    assert actual.shape == (3, 3, 8, 24) and actual.is_contiguous()
    assert_close(actual, expected, rel_l2=1e-4, name="decode fp32")


def test_encode_matches_diffusers_fp32_batch3_odd_images(encode_batch3):
    actual, expected = encode_batch3
    assert actual.shape == (3, 8, 3, 1) and actual.is_contiguous()
    assert_close(actual, expected, rel_l2=1e-4, name="encode fp32")


def test_one_image_decodes_and_encodes_bitwise_as_in_its_batch(decode_batch3, encode_batch3, decode_single,
                                                                encode_single):
    """Determinism across the batch (docs/design.md, section 8): no reduction or tiling choice depends on N."""
    assert torch.equal(decode_single[0], decode_batch3[0][1:2])
    assert torch.equal(encode_single[0], encode_batch3[0][1:2])


@pytest.mark.parametrize("which", ["decode", "encode"])
def test_fast_path_profile_has_no_eager_norm_upsample_attention_or_conv(which, decode_single, encode_single):
    _, names = decode_single if which == "decode" else encode_single
    assert "sdvae_fast::gn_silu_conv2d" in names and "sdvae_fast::attention" in names, "not the fast path"
    if which == "decode":
        assert UPSAMPLE_OPS & names
    assert not names.intersection(EAGER_OPS), sorted(names.intersection(EAGER_OPS))


def test_bf16_encode_matches_diffusers_bf16():
    """bf16 parity of the encoder (the bf16 decode is checked after a `.to()` cast in test_patch.py)."""
    vae16 = make_diffusers_vae(dtype=torch.bfloat16)
    torch.manual_seed(3)
    x = (torch.rand(1, 3, 16, 24) * 2 - 0.8).to(torch.bfloat16)
    with torch.no_grad():
        assert_close(fast.encode_moments(vae16, x), vae16._encode(x), rel_l2=5e-2, name="encode bf16")


def overflowing_fp16_vae():
    """(fp16 VAE whose mid block overflows fp16, the same weights in fp32, latents (1, 4, 2, 3) in fp16)."""
    vae16 = make_diffusers_vae(seed=4, dtype=torch.float16)
    with torch.no_grad():
        # The largest weight becomes 30000 (still an fp16 number); the conv's outputs then exceed 65504.
        conv2 = vae16.decoder.mid_block.resnets[1].conv2
        conv2.weight.mul_(30000.0 / conv2.weight.abs().max().item())
    vae32 = make_diffusers_vae(seed=4)
    vae32.load_state_dict({k: v.float() for k, v in vae16.state_dict().items()})
    torch.manual_seed(5)
    return vae16, vae32, (torch.randn(1, 4, 2, 3) + 0.5).half()


# The interpreter's fp16 stores warn on the overflow that the policy then repairs.
FP16_OVERFLOW_WARNINGS = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
                          pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@FP16_OVERFLOW_WARNINGS[0]
@FP16_OVERFLOW_WARNINGS[1]
def test_fp16_overflow_stays_finite_and_close_to_fp32():
    """Weights scaled so the mid block overflows fp16: eager fp16 gives inf/NaN, the fast path stays finite."""
    vae16, vae32, z = overflowing_fp16_vae()
    with torch.no_grad():
        eager16 = vae16.decode(z).sample
        expected = vae32.decode(z.float()).sample
        actual = fast.decode_sample(vae16, z)
    assert not torch.isfinite(eager16).all(), "the test case must overflow eager fp16"
    assert torch.isfinite(expected).all()
    assert actual.dtype == torch.float16
    assert_close(actual, expected, rel_l2=1e-2, name="fp16 overflow recomputed")


@FP16_OVERFLOW_WARNINGS[0]
@FP16_OVERFLOW_WARNINGS[1]
def test_fp16_overflow_under_torch_compile_fullgraph_stays_finite():
    """The traceable form of the policy (torch.cond to a wider pass) under `torch.compile(fullgraph=True)`."""
    vae16, vae32, z = overflowing_fp16_vae()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            actual = torch.compile(fast.decode_sample, backend="aot_eager", fullgraph=True)(vae16, z)
            expected = vae32.decode(z.float()).sample
    finally:
        torch._dynamo.reset()
    assert actual.dtype == torch.float16
    assert_close(actual, expected, rel_l2=1e-2, name="compiled fp16 overflow")


def test_units_the_kernels_do_not_cover_run_their_own_forward_inside_the_fast_path():
    """A ResNet with output_scale_factor 2 and a GELU output activation fall back per unit, correctly."""
    vae = make_diffusers_vae(seed=8)
    vae.decoder.up_blocks[1].resnets[0].output_scale_factor = 2.0
    vae.decoder.conv_act = torch.nn.GELU()
    torch.manual_seed(9)
    z = torch.randn(1, 4, 2, 2) + 0.5
    with torch.no_grad():
        actual, names = run_profiled(fast.decode_sample, vae, z)
    assert UPSAMPLE_OPS & names and "aten::gelu" in names
    with torch.no_grad():
        assert_close(actual, vae.decode(z).sample, rel_l2=1e-4, name="decode with fallback units")


def test_prepared_weights_follow_in_place_edits_of_the_parameters(vae):
    """The folded quant_conv is rebuilt when quant_conv or conv_out change (load_state_dict copies in place)."""
    first = fast.folded_quant_conv(vae.encoder.conv_out, vae.quant_conv)
    assert fast.folded_quant_conv(vae.encoder.conv_out, vae.quant_conv)[0] is first[0]
    state = {k: v.clone() for k, v in vae.quant_conv.state_dict().items()}
    try:
        vae.quant_conv.load_state_dict({k: v * 2 for k, v in state.items()})
        second = fast.folded_quant_conv(vae.encoder.conv_out, vae.quant_conv)
        assert second[0] is not first[0]
        assert_close(second[0], first[0] * 2, rel_l2=1e-6, name="refolded weight")
    finally:
        vae.quant_conv.load_state_dict(state)


def test_use_fast_path_names_and_devices():
    assert fast.use_fast_path("torch", "cpu") is False
    assert fast.use_fast_path("auto", "cpu") is False
    assert fast.use_fast_path("triton", "cpu") is True  # the interpreter is on in the test session
    with pytest.raises(ValueError, match="auto.*triton.*torch"):
        fast.use_fast_path("cuda", "cpu")


def test_wrong_latent_channels_dtype_or_rank_give_clear_errors(vae):
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        fast.decode_sample(vae, torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        fast.encode_moments(vae, torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="float16.*float32"):
        fast.decode_sample(vae, torch.randn(1, 4, 2, 2, dtype=torch.float16))


def test_triton_backend_without_interpreter_raises_instead_of_falling_back():
    code = textwrap.dedent("""
        import torch
        from sdvae_fast import fast
        assert fast.use_fast_path("auto", "cpu") is False
        try:
            fast.use_fast_path("triton", "cpu")
        except RuntimeError as e:
            assert "TRITON_INTERPRET" in str(e), e
            print("raised")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "raised"


@pytest.fixture(scope="module")
def our_vae(vae):
    """sdvae_fast.AutoencoderKL with the diffusers VAE's config and weights, on the triton backend."""
    from sdvae_fast import AutoencoderKL

    ours = AutoencoderKL(**vae.config).eval().requires_grad_(False)
    ours.load_state_dict(vae.state_dict())
    ours.set_backend("triton")
    return ours


def test_our_model_on_the_triton_backend_encodes_like_diffusers(our_vae, vae):
    torch.manual_seed(7)
    x = torch.rand(1, 3, 9, 16) * 2 - 0.8
    with torch.no_grad():
        actual = our_vae.encode(x).latent_dist
        expected = vae.encode(x).latent_dist
    assert_close(actual.mean, expected.mean, rel_l2=1e-4, name="our encode mean")
    assert_close(actual.logvar, expected.logvar, rel_l2=1e-4, name="our encode logvar")
