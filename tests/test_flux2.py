"""FLUX.2's VAE (issue 14): `sdvae_fast.AutoencoderKLFlux2` against diffusers' `AutoencoderKLFlux2`.

Narrow full-depth models (four levels, mid-block attention, 32 latent channels, quant convs, the latent BatchNorm)
with seeded, perturbed weights, loaded identically into both classes:
- "flux2": encoder and decoder widths 8/16/32/32, 8 groups;
- "flux2-small": the same encoder, decoder widths 24/48/96/96 with 8 groups: 3, 6 and 12 channels per group as
  in FLUX.2's small decoder (96/192/384/384 with 32 groups), and a mid-block attention of head dim 96 = 3 x 32,
  which the attention kernel runs as three column chunks as it runs 384.
Backend "torch" is diffusers' code (bitwise); backend "triton" runs the kernels under the interpreter (fp32,
1e-4 relative L2, tests/helpers.py). The interpreter costs about a second per conv launch, so the triton runs are
batch 1 with 2x1 / 1x3 latents, done once in a module-scoped fixture; the "flux2" decoder on the kernels (the
AutoencoderKL path with 32 latent channels) is a slow test.
"""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from helpers import assert_close  # noqa: E402
from sdvae_fast import AutoencoderKLFlux2  # noqa: E402
from sdvae_fast.fast import units  # noqa: E402
from sdvae_fast.flux2 import patchify_latents, unpatchify_latents  # noqa: E402

FLUX2 = dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1)
SMALL = dict(FLUX2, decoder_block_out_channels=(24, 48, 96, 96))
# aten ops that must not run in a forward on the kernels (tests/test_fast_path.py's list).
EAGER_OPS = ("aten::group_norm", "aten::native_group_norm", "aten::upsample_nearest2d",
             "aten::scaled_dot_product_attention", "aten::convolution")


def _reference(config, seed: int = 0):
    """diffusers' AutoencoderKLFlux2 of `config`, seeded; GroupNorm affine terms, biases and the BatchNorm's
    running statistics perturbed (none at their defaults)."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen) + 0.05)
            elif p.dim() == 1:  # GroupNorm gamma
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.running_mean.shape, generator=gen))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen))
        vae.bn.num_batches_tracked.fill_(7)
    return vae


def _ours(reference, config, backend: str):
    vae = AutoencoderKLFlux2(**config).eval()
    vae.load_state_dict(reference.state_dict())
    vae.set_backend(backend)
    return vae


def _image(batch: int, height: int, width: int, seed: int):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 0.8


def _latents(batch: int, height: int, width: int, seed: int):
    return torch.randn(batch, 32, height, width, generator=torch.Generator().manual_seed(seed)) + 0.3


@pytest.fixture(scope="module")
def small_pair():
    reference = _reference(SMALL)
    return reference, _ours(reference, SMALL, "torch")


@pytest.fixture(scope="module")
def small_on_kernels(small_pair):
    """The small model on backend "triton": (encode moments, decode sample, op names) of one image of 16x15
    pixels (latents 2x1) and one 1x3 latent, both under the profiler, with diffusers' results for them."""
    reference, _ = small_pair
    vae = _ours(reference, SMALL, "triton")
    x, z = _image(1, 16, 15, seed=2), _latents(1, 1, 3, seed=3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dist = vae.encode(x).latent_dist
        sample = vae.decode(z).sample
    with torch.no_grad():
        expected_dist = reference.encode(x).latent_dist
        expected_sample = reference.decode(z).sample
    names = {e.name for e in prof.events()}
    return dict(dist=dist, sample=sample, expected_dist=expected_dist, expected_sample=expected_sample,
                names=names, vae=vae)


# ---------------------------------------------------------------------------------------------------------------
# The class, its config and presets
# ---------------------------------------------------------------------------------------------------------------


def test_subclass_config_and_state_dict_are_diffusers_with_bn_statistics(small_pair):
    reference, ours = small_pair
    assert isinstance(ours, diffusers.AutoencoderKLFlux2)
    assert dict(ours.config) == dict(reference.config)
    state = ours.state_dict()
    assert list(state) == list(reference.state_dict())
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(state[key], reference.state_dict()[key]), key
    assert ours.bn.num_features == 4 * 32 and ours.config.batch_norm_eps == 1e-4
    assert "scaling_factor" not in ours.config and ours.backend == "torch"


def test_presets_are_flux2_and_its_small_decoder():
    """The real architectures, built on the meta device: widths, 32 latent channels, 128 BatchNorm channels,
    3/6/12 channels per GroupNorm group in the small decoder, mid-block attention head dims 512 and 384."""
    with torch.device("meta"):
        full = AutoencoderKLFlux2.from_config("flux2")
        small = AutoencoderKLFlux2.from_config("flux2-small")
    assert tuple(full.config.block_out_channels) == (128, 256, 512, 512)
    assert full.config.decoder_block_out_channels is None
    assert tuple(small.config.decoder_block_out_channels) == (96, 192, 384, 384)
    for vae in (full, small):
        assert vae.config.latent_channels == 32 and vae.bn.num_features == 128 and vae.quant_conv is not None
    per_group = {m.num_channels // m.num_groups for m in small.decoder.modules()
                 if isinstance(m, torch.nn.GroupNorm)}
    assert per_group == {3, 6, 12}
    assert small.decoder.mid_block.attentions[0].to_q.weight.shape == (384, 384)
    assert small.encoder.mid_block.attentions[0].to_q.weight.shape == (512, 512)
    narrow = dict(block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(24, 48, 96, 96),
                  norm_num_groups=8)
    a = AutoencoderKLFlux2.from_preset("flux2-small", seed=5, **narrow)
    b = AutoencoderKLFlux2.from_preset("flux2-small", seed=5, **narrow)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not a.training


# ---------------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux2", "flux2-small"])
def test_torch_backend_is_diffusers_bitwise_batch2(name):
    config = FLUX2 if name == "flux2" else SMALL
    reference = _reference(config, seed=1)
    ours = _ours(reference, config, "torch")
    x, z = _image(2, 16, 24, seed=4), _latents(2, 2, 3, seed=5)
    with torch.no_grad():
        ours_dist, ref_dist = ours.encode(x).latent_dist, reference.encode(x).latent_dist
        assert torch.equal(ours_dist.mean, ref_dist.mean) and torch.equal(ours_dist.logvar, ref_dist.logvar)
        assert torch.equal(ours.decode(z).sample, reference.decode(z).sample)
        assert torch.equal(ours(x).sample, reference(x).sample)


def test_small_model_on_kernels_matches_diffusers_fp32(small_on_kernels):
    r = small_on_kernels
    assert r["dist"].mean.shape == (1, 32, 2, 1) and r["sample"].shape == (1, 3, 8, 24)
    assert_close(r["dist"].mean, r["expected_dist"].mean, rel_l2=1e-4, name="flux2-small encode mean")
    assert_close(r["dist"].logvar, r["expected_dist"].logvar, rel_l2=1e-4, name="flux2-small encode logvar")
    assert_close(r["sample"], r["expected_sample"], rel_l2=1e-4, name="flux2-small decode")


def test_small_model_runs_every_unit_on_the_kernels(small_on_kernels):
    """3/6/12 channels per group and head dim 96 through the kernels: no unit falls back, and the profile of the
    encode and decode holds the fused ops and none of the eager GroupNorm / SDPA / conv / upsample ops."""
    r = small_on_kernels
    assert units.unsupported_units(r["vae"]) == []
    names = r["names"]
    assert {"sdvae_fast::gn_silu_conv2d", "sdvae_fast::attention"} <= names, "not the fast path"
    assert not names.intersection(EAGER_OPS), sorted(names.intersection(EAGER_OPS))


@pytest.mark.slow
def test_flux2_decoder_on_kernels_matches_diffusers_fp32():
    reference = _reference(FLUX2, seed=2)
    ours = _ours(reference, FLUX2, "triton")
    z = _latents(1, 1, 3, seed=6)
    with torch.no_grad():
        assert_close(ours.decode(z).sample, reference.decode(z).sample, rel_l2=1e-4, name="flux2 decode")


# ---------------------------------------------------------------------------------------------------------------
# FLUX.2's latent normalisation
# ---------------------------------------------------------------------------------------------------------------


def test_patchify_and_bn_normalisation_match_the_flux2_pipeline(small_pair):
    """diffusers' Flux2Pipeline (pipeline_flux2.py, `_encode_vae_image` and the end of `__call__`) patchifies the
    encoder's latents (channel c, patch offset (i, j) -> channel 4c + 2i + j) and normalises them with bn's
    running statistics and config.batch_norm_eps, and undoes both before decode: same numbers, bitwise. (The
    pipeline class itself needs transformers, absent here, so its arithmetic is written out.)"""
    _, vae = small_pair
    z = _latents(2, 4, 6, seed=7)
    patched = vae.patchify_latents(z)
    assert patched.shape == (2, 128, 2, 3)
    offsets = [z[:, :, i::2, j::2] for i in (0, 1) for j in (0, 1)]  # 4 x (N, 32, 2, 3), offset 2i + j
    assert torch.equal(patched, torch.stack(offsets, dim=2).reshape(2, 128, 2, 3))
    assert torch.equal(vae.unpatchify_latents(patched), z)
    assert torch.equal(unpatchify_latents(patchify_latents(z)), z)
    # The pipeline's arithmetic, written out: mean and std in the latents' dtype.
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    assert torch.equal(vae.normalize_latents(patched), (patched - mean) / std)
    assert torch.equal(vae.denormalize_latents(patched), patched * std + mean)
    assert_close(vae.denormalize_latents(vae.normalize_latents(patched)), patched, rel_l2=1e-6, name="round trip")
    half = patched.to(torch.bfloat16)
    assert vae.normalize_latents(half).dtype == torch.bfloat16
    assert torch.equal(vae.normalize_latents(half), (half - mean.to(torch.bfloat16)) / std.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# The diffusers contract
# ---------------------------------------------------------------------------------------------------------------


def test_folders_are_interchangeable_with_diffusers(small_pair, tmp_path):
    reference, ours = small_pair
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2" and config["decoder_block_out_channels"] == [24, 48, 96, 96]
    loaded_by_diffusers = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "ours")
    reference.save_pretrained(tmp_path / "theirs")
    loaded_by_us = AutoencoderKLFlux2.from_pretrained(tmp_path / "theirs")
    assert type(loaded_by_us) is AutoencoderKLFlux2
    expected = reference.state_dict()
    for model in (loaded_by_diffusers, loaded_by_us):
        state = model.state_dict()
        assert list(state) == list(expected)
        assert all(torch.equal(state[k], v) for k, v in expected.items())
    from_folder = dict(AutoencoderKLFlux2.from_config(str(tmp_path / "theirs")).config)
    assert from_folder == {k: v for k, v in loaded_by_us.config.items() if k != "_name_or_path"}


def test_slicing_tiling_and_return_dict(small_pair):
    _, vae = small_pair
    x, z = _image(2, 16, 24, seed=8), _latents(2, 2, 3, seed=9)
    with torch.no_grad():
        batched = vae.decode(z).sample
        (as_tuple,) = vae.decode(z, return_dict=False)
        assert isinstance(vae.decode(z), diffusers.models.autoencoders.vae.DecoderOutput)
        assert torch.equal(as_tuple, batched)
        vae.enable_slicing()
        try:
            assert_close(vae.decode(z).sample, batched, rel_l2=1e-5, name="sliced decode")
            assert_close(vae.encode(x).latent_dist.mean, vae._encode(x)[:, :32], rel_l2=1e-5, name="sliced encode")
        finally:
            vae.disable_slicing()
        vae.enable_tiling()
        sizes = vae.tile_sample_min_size, vae.tile_latent_min_size
        vae.tile_sample_min_size, vae.tile_latent_min_size = 16, 2
        try:
            assert vae.decode(_latents(1, 3, 5, seed=10)).sample.shape == (1, 3, 24, 40)
            assert vae.encode(_image(1, 24, 40, seed=11)).latent_dist.mean.shape == (1, 32, 3, 5)
        finally:
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = sizes


def test_bad_input_raises_clear_errors(small_pair):
    _, vae = small_pair
    with pytest.raises(ValueError, match=r"z must be latents of shape \(N, 32, H, W\)"):
        vae.decode(torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match=r"x must be images of shape \(N, 3, H, W\)"):
        vae.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        vae.patchify_latents(torch.randn(1, 32, 3, 4))
    # The methods take the model's shapes only: unpatchified (N, 32, H, W) in, patchified (N, 128, h, w) out.
    with pytest.raises(ValueError, match=r"latents must be patchified latents \(N, 128, h, w\).*\(1, 30, 2, 2\)"):
        vae.unpatchify_latents(torch.randn(1, 30, 2, 2))
    with pytest.raises(ValueError, match=r"latents must be patchified latents \(N, 128, h, w\).*"
                                         r"\(1, 32, 4, 4\) \(these look unpatchified"):
        vae.unpatchify_latents(torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match=r"latents must be unpatchified latents \(N, 32, H, W\).*"
                                         r"\(1, 128, 2, 2\) \(these look patchified already"):
        vae.patchify_latents(torch.randn(1, 128, 2, 2))
    with pytest.raises(ValueError, match=r"latents must be unpatchified latents \(N, 32, H, W\)"):
        vae.patchify_latents(torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match=r"latents must be \(N, C, H, W\)"):
        vae.unpatchify_latents(torch.randn(128, 2, 2))
    with pytest.raises(TypeError, match=r"latents must be a torch.Tensor"):
        vae.patchify_latents([[0.0]])
    # The module-level functions stay general (any channel count the patch divides).
    assert unpatchify_latents(torch.randn(1, 32, 4, 4)).shape == (1, 8, 8, 8)
    assert patchify_latents(torch.randn(1, 8, 2, 2)).shape == (1, 32, 1, 1)
    with pytest.raises(ValueError, match="multiple of ph \\* pw"):
        unpatchify_latents(torch.randn(1, 30, 2, 2))
    with pytest.raises(ValueError, match=r"patchified latents \(N, 128, h, w\)"):
        vae.normalize_latents(torch.randn(1, 32, 2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        vae.denormalize_latents(torch.zeros(1, 128, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="patch_size"):
        patchify_latents(torch.randn(1, 32, 2, 2), patch_size=(2, 0))
    with pytest.raises(ValueError, match="decoder_block_out_channels must be None or 4 positive ints"):
        AutoencoderKLFlux2(**dict(SMALL, decoder_block_out_channels=(24, 48, 96)))
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        AutoencoderKLFlux2(**dict(SMALL, decoder_block_out_channels=(24, 48, 96, 100)))
    with pytest.raises(ValueError, match="batch_norm_eps must be a positive number"):
        AutoencoderKLFlux2(**dict(FLUX2, batch_norm_eps=0.0))
    with pytest.raises(TypeError, match=r"unknown config field\(s\) \['scaling_factor'\]"):
        AutoencoderKLFlux2(**dict(FLUX2, scaling_factor=0.5))
    with pytest.raises(ValueError, match="valid preset names"):
        AutoencoderKLFlux2.from_preset("flux1")
    with pytest.raises(FileNotFoundError, match="ae.safetensors"):  # original files: tests/test_flux2_single_file.py
        AutoencoderKLFlux2.from_single_file("ae.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_detects_flux2_folders_and_round_trips_normalised_latents(small_pair, tmp_path, capsys):
    """`encode --vae FOLDER` (found to be FLUX.2 by its `_class_name`) writes patchified, BatchNorm-normalised
    latents and says so in the metadata; `decode` undoes it; scaled latents of another VAE are refused."""
    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from sdvae_fast import cli
    from sdvae_fast.images import load_image, pad_to_multiple, to_uint8

    _, vae = small_pair
    folder = tmp_path / "pipeline"
    vae.save_pretrained(folder / "vae")  # a pipeline folder: the VAE in vae/
    image = tmp_path / "cat.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (21, 35, 3), dtype=np.uint8)).save(image)
    latents_path = tmp_path / "latents.safetensors"
    common = ["--vae", str(folder), "--backend", "torch", "-q"]
    assert cli.main(["encode", str(image), "-o", str(latents_path), *common]) == 0
    assert "latents (1, 128, 2, 3)" in capsys.readouterr().out  # 21x35 padded to 32x48: latents 4x6, patched 2x3
    with safe_open(str(latents_path), "pt") as f:
        meta, stored = f.metadata(), f.get_tensor("cat")
    assert meta["model"] == "AutoencoderKLFlux2" and meta["normalization"] == "flux2_batch_norm"
    with torch.no_grad():
        padded, _ = pad_to_multiple(load_image(image), 16)
        z = vae.encode(padded).latent_dist.mode()
        assert torch.equal(stored, vae.normalize_latents(vae.patchify_latents(z)))
        expected = vae.decode(vae.unpatchify_latents(vae.denormalize_latents(stored))).sample[..., :21, :35]
    out_dir = tmp_path / "out"
    assert cli.main(["decode", str(latents_path), "-o", str(out_dir), *common]) == 0
    assert np.array_equal(np.asarray(Image.open(out_dir / "cat.png")), to_uint8(expected)[0])
    capsys.readouterr()
    assert cli.main(["decode", str(latents_path), "-o", str(out_dir), "--preset", "sd15", "--backend", "torch",
                     "-q"]) == 2
    assert "decode them with FLUX.2's VAE" in capsys.readouterr().err
    assert cli.main(["encode", str(image), "-o", str(latents_path), "--scaling-factor", "0.5", *common]) == 2
    assert "do not apply" in capsys.readouterr().err
    assert cli.main(["info", str(folder / "vae")]) == 0
    text = capsys.readouterr().out
    assert "family reason: _class_name AutoencoderKLFlux2 in config.json" in text
    assert "decoder_block_out_channels: [24, 48, 96, 96]" in text and "scaling_factor" in text  # "no scaling_factor"
    assert "model: AutoencoderKLFlux2" in text and "scaling_factor: config.json" not in text
