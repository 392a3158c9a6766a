"""sdvae_fast.patch / unpatch on live diffusers AutoencoderKL objects (CPU, Triton interpreter, backend "triton").

Fast forwards cost seconds under the interpreter, so each test runs at most two on latents of 2x3 or smaller;
everything about attributes, parameter sharing and reversibility is checked without running the kernels.
"""
import copy
import types

import pytest
import torch

from sdvae_fast.patching import is_patched, patch, unpatch
from tests.helpers import assert_close
from tests.test_fast_path import UPSAMPLE_OPS, make_diffusers_vae, run_profiled


def param_pointers(module):
    return {name: p.data_ptr() for name, p in module.named_parameters()}


def instance_entries(vae):
    """The instance-dict entries patch may touch, on the VAE, its encoder and its decoder."""
    return {(m, k): v for m, mod in (("vae", vae), ("encoder", vae.encoder), ("decoder", vae.decoder))
            for k, v in mod.__dict__.items() if k in ("forward", "_encode", "_decode", "_sdvae_fast_patch")}


@pytest.fixture
def vae():
    return make_diffusers_vae(seed=10)


@pytest.fixture
def latents():
    torch.manual_seed(11)
    return torch.randn(1, 4, 2, 3) + 0.5


def test_patch_of_a_pipeline_object_runs_fast_shares_parameters_and_unpatches_bit_identically(vae, latents):
    pipe = types.SimpleNamespace(vae=vae, unet=None)
    torch.manual_seed(13)
    x = torch.rand(1, 3, 16, 24) * 2 - 0.8
    entries = instance_entries(vae)
    pointers = param_pointers(vae)
    with torch.no_grad():
        eager_decode = vae.decode(latents).sample
        eager_moments = vae._encode(x)
        assert patch(pipe, backend="triton") is pipe
        decoded, decode_ops = run_profiled(lambda z: vae.decode(z).sample, latents)
        moments, encode_ops = run_profiled(vae._encode, x)
    assert is_patched(pipe) and is_patched(vae)
    assert_close(decoded, eager_decode, rel_l2=1e-4, name="pipe.vae.decode")
    assert_close(moments, eager_moments, rel_l2=1e-4, name="pipe.vae._encode")
    for names in (decode_ops, encode_ops):
        assert "sdvae_fast::gn_silu_conv2d" in names
        assert not names.intersection({"aten::group_norm", "aten::native_group_norm", "aten::upsample_nearest2d",
                                       "aten::scaled_dot_product_attention"})
    # quant_conv is folded into the encoder's conv_out: no eager conv at all in the encode.
    assert "aten::convolution" not in encode_ops
    assert param_pointers(vae) == pointers, "patch must share the parameters, not copy them"
    assert unpatch(pipe) is pipe
    assert not is_patched(vae)
    assert instance_entries(vae) == entries
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, eager_decode)
        assert torch.equal(vae._encode(x), eager_moments)


def test_patch_then_unpatch_restores_the_instance_attributes_and_diffusers_outputs(vae, latents):
    """Without running the fast path: a patched-then-unpatched VAE is diffusers' own, bit for bit."""
    torch.manual_seed(12)
    x = torch.rand(2, 3, 16, 24) * 2 - 0.8
    with torch.no_grad():
        before_decode = vae.decode(latents).sample
        before_encode = vae.encode(x).latent_dist.mean
    entries = instance_entries(vae)
    patch(vae, backend="triton")
    assert instance_entries(vae) != entries
    unpatch(vae)
    assert instance_entries(vae) == entries
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, before_decode)
        assert torch.equal(vae.encode(x).latent_dist.mean, before_encode)


def test_patch_twice_is_idempotent_and_unpatch_of_unpatched_is_a_no_op(vae):
    entries = instance_entries(vae)
    assert unpatch(vae) is vae and instance_entries(vae) == entries
    patch(vae, backend="torch")
    patched_entries = instance_entries(vae)
    patch(vae, backend="triton")
    assert instance_entries(vae) == patched_entries
    assert vae.__dict__["_sdvae_fast_patch"].backend == "triton"
    unpatch(vae)
    assert instance_entries(vae) == entries


def test_patched_vae_follows_a_bfloat16_cast(vae, latents):
    patch(vae, backend="triton")
    vae.to(torch.bfloat16)
    assert vae.dtype == torch.bfloat16 and is_patched(vae)
    z = latents.to(torch.bfloat16)
    with torch.no_grad():
        actual = vae.decode(z).sample
        unpatch(vae)
        expected = vae.decode(z).sample
    assert actual.dtype == torch.bfloat16
    assert_close(actual, expected, rel_l2=5e-2, name="patched decode after .to(bfloat16)")


def test_patched_tiled_decode_matches_unpatched_tiled_decode(vae):
    vae.enable_tiling()
    # Two tiles of at most 2x2 latents, no overlap: the tiled path calls vae.decoder once per tile.
    vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = 2, 16, 0.0
    torch.manual_seed(14)
    z = torch.randn(1, 4, 2, 3) + 0.5
    with torch.no_grad():
        expected = vae.decode(z).sample
        patch(vae, backend="triton")
        actual, names = run_profiled(lambda t: vae.decode(t).sample, z)
    assert UPSAMPLE_OPS & names, "the tiles did not run on the fast path"
    assert_close(actual, expected, rel_l2=1e-4, name="tiled decode")


def test_patched_decode_with_autograd_runs_diffusers_forward(vae, latents):
    vae.requires_grad_(True)
    expected = vae.decode(latents).sample
    patch(vae, backend="triton")
    actual = vae.decode(latents).sample
    assert actual.grad_fn is not None
    assert torch.equal(actual, expected)


def test_patched_decoder_with_parameters_elsewhere_runs_diffusers_forward(vae, latents, monkeypatch):
    """A block whose parameters are in another dtype (as offloading or keep-in-fp32 leaves them) is diffusers'."""
    from sdvae_fast import fast

    def fail(*args, **kwargs):
        raise AssertionError("the fast path ran on a decoder with parameters in another dtype")

    monkeypatch.setattr(fast, "run_decoder", fail)
    vae.decoder.up_blocks[3].to(torch.float64)
    patch(vae, backend="triton")
    with torch.no_grad(), pytest.raises(RuntimeError, match="(?i)type|dtype"):
        vae.decoder(latents)


def test_deepcopy_of_a_patched_vae_is_patched_on_its_own_modules(vae):
    patch(vae, backend="triton")
    clone = copy.deepcopy(vae)
    assert is_patched(clone)
    assert clone.decoder.forward.__self__ is clone.decoder
    assert clone.encoder.forward.__self__ is clone.encoder
    unpatch(clone)
    assert is_patched(vae) and not is_patched(clone)


def test_patch_rejects_unknown_backends_and_objects_without_a_vae(vae):
    with pytest.raises(ValueError, match="auto.*triton.*torch"):
        patch(vae, backend="cuda")
    with pytest.raises(TypeError, match="AutoencoderKL"):
        patch(object())
    assert not is_patched(vae)


def test_the_one_liner_sdvae_fast_patch_is_the_function_after_the_module_was_imported(vae):
    """`sdvae_fast.patch` stays the function even after `sdvae_fast.patching` was imported."""
    import sdvae_fast

    pipe = types.SimpleNamespace(vae=vae)
    assert sdvae_fast.patch(pipe, backend="torch") is pipe and is_patched(vae)
    sdvae_fast.unpatch(pipe)
    assert not is_patched(vae)
