"""sdvae_fast.AutoencoderKL and sdvae_fast.reference against diffusers.AutoencoderKL holding identical weights.

Parity tests use each preset's structure at narrow widths but real depth (four levels, two resnets per encoder
level, the mid attention, 4 or 16 latent channels, quant convs on or off); full widths are compared as key and
shape sets only, built on the meta device. Tolerance: 1e-5 relative L2 error in fp32.
"""
import copy
import functools
import json
import sys
import types

import pytest
import torch

import sdvae_fast

try:
    import diffusers
except ImportError:  # the tests that compare with diffusers skip; the others still run
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="compares with diffusers, which is not installed "
                                     "(pip install -e '.[test]')")

from sdvae_fast import PRESETS, AutoencoderKL, DecoderOutput, DiagonalGaussianDistribution, resolve_config  # noqa: E402
from sdvae_fast.model import AutoencoderKLOutput, StandaloneAutoencoderKL  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

REAL_PRESETS = ["sd15", "sdxl", "sd3", "flux1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These small CPU convs run faster on one thread than on a shared, oversubscribed machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
# Narrow widths, real depth: four levels with a width change (shortcut convs) and 4 groups per norm.
NARROW = dict(block_out_channels=(8, 16, 16, 32), norm_num_groups=4)
TOL = 1e-5


def _images(*shape, seed=0):
    """Images with non-zero mean, roughly in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.5 * torch.randn(*shape, generator=g)


def _latents(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.2 + torch.randn(*shape, generator=g)


@functools.lru_cache(maxsize=None)
def _pair(preset: str, narrow: bool = True):
    """(ours, diffusers) in eval mode with identical (seeded random) weights; ours loads diffusers' state dict."""
    config = resolve_config(preset)
    if narrow:
        config.update(NARROW)
    torch.manual_seed(1234)
    theirs = diffusers.AutoencoderKL(**config).eval()
    ours = AutoencoderKL(**theirs.config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _state_shapes(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


# ---------------------------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------------------------


@needs_diffusers
@pytest.mark.parametrize("preset", REAL_PRESETS + ["diffusers_test"])
def test_state_dict_keys_and_shapes_equal_diffusers_at_full_width(preset):
    with torch.device("meta"):
        ours = AutoencoderKL.from_config(preset)
        theirs = diffusers.AutoencoderKL(**PRESETS[preset])
    assert _state_shapes(ours) == _state_shapes(theirs)


def test_sd15_parameter_counts_match_design_figures():
    with torch.device("meta"):
        model = AutoencoderKL.from_config("sd15")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == 83_653_863
    assert round(count(model.encoder) / 1e6, 2) == 34.16


# Non-parameter attributes that code walking either module tree (sdvae_fast.fast) reads.
WALKER_ATTRIBUTES = ("use_conv", "use_conv_transpose", "interpolate", "name", "norm", "padding", "time_emb_proj",
                     "upsample", "downsample", "output_scale_factor", "use_in_shortcut", "heads", "scale",
                     "rescale_output_factor", "residual_connection", "spatial_norm", "add_attention")


@needs_diffusers
def test_module_classes_and_walker_attributes_equal_diffusers():
    ours, theirs = _pair("sd15")
    their_modules = dict(theirs.named_modules())
    ours_modules = dict(ours.named_modules())
    assert list(ours_modules) == list(their_modules)
    for name, module in ours_modules.items():
        other = their_modules[name]
        assert type(module).__name__ == type(other).__name__, name
        for attr in WALKER_ATTRIBUTES:
            # The walker reads these with getattr(module, attr, None): an absent attribute reads as None.
            if hasattr(other, attr) and not isinstance(getattr(other, attr), (torch.nn.Module, torch.Tensor)):
                assert getattr(module, attr, None) == getattr(other, attr), f"{name}.{attr}"


@needs_diffusers
def test_quant_convs_are_none_when_disabled_and_structure_of_no_mid_attention_matches():
    assert AutoencoderKL.from_config("sd3", **NARROW).quant_conv is None
    assert AutoencoderKL.from_config("flux1", **NARROW).post_quant_conv is None
    ours = AutoencoderKL.from_config("sd15", mid_block_add_attention=False, **NARROW)
    theirs = diffusers.AutoencoderKL(**ours.config)
    assert ours.encoder.mid_block.attentions[0] is None
    assert _state_shapes(ours) == _state_shapes(theirs)


# ---------------------------------------------------------------------------------------------------------------
# Numerical parity with diffusers
# ---------------------------------------------------------------------------------------------------------------


@needs_diffusers
@pytest.mark.parametrize("preset", REAL_PRESETS)
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (3, 3, 76, 100)], ids=["b1_64x64", "b3_76x100"])
def test_encode_mean_and_logvar_match_diffusers(preset, shape):
    ours, theirs = _pair(preset)
    x = _images(*shape)
    with torch.no_grad():
        got = ours.encode(x).latent_dist
        want = theirs.encode(x).latent_dist
    # 76 rows: 76 -> 38 -> 19 -> 9 latent rows (floor halving), as diffusers' padded stride-2 convs give.
    assert got.mean.shape == (shape[0], ours.config.latent_channels, shape[2] // 8, shape[3] // 8)
    assert_close(got.mean, want.mean, rel_l2=TOL, name=f"{preset} mean")
    assert_close(got.logvar, want.logvar, rel_l2=TOL, name=f"{preset} logvar")


@needs_diffusers
@pytest.mark.parametrize("preset", REAL_PRESETS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 7, 9)], ids=["b1_8x8", "b3_7x9"])
def test_decode_matches_diffusers(preset, shape):
    ours, theirs = _pair(preset)
    batch, h, w = shape
    z = _latents(batch, ours.config.latent_channels, h, w)
    with torch.no_grad():
        got = ours.decode(z).sample
        want = theirs.decode(z).sample
    assert got.shape == (batch, 3, 8 * h, 8 * w)
    assert_close(got, want, rel_l2=TOL, name=f"{preset} decode")


@needs_diffusers
def test_encode_of_468x768_image_gives_58_latent_rows_like_diffusers():
    """CASES.md C09: 468 -> 234 -> 117 -> 58 rows through three padded stride-2 convs."""
    ours, theirs = _pair("sdxl")
    x = _images(1, 3, 468, 768)
    with torch.no_grad():
        got = ours.encode(x).latent_dist.mean
        want = theirs.encode(x).latent_dist.mean
    assert got.shape == (1, 4, 58, 96)
    assert_close(got, want, rel_l2=TOL, name="468x768 mean")


@needs_diffusers
def test_diffusers_tiny_test_config_builds_and_matches():
    ours, theirs = _pair("diffusers_test", narrow=False)
    x = _images(2, 3, 32, 30)
    z = _latents(2, 4, 5, 7)
    with torch.no_grad():
        assert_close(ours.encode(x).latent_dist.mean, theirs.encode(x).latent_dist.mean, rel_l2=TOL)
        assert_close(ours.decode(z).sample, theirs.decode(z).sample, rel_l2=TOL)


@needs_diffusers
def test_no_mid_attention_matches_diffusers():
    torch.manual_seed(5)
    theirs = diffusers.AutoencoderKL(**dict(resolve_config("sd15"), mid_block_add_attention=False, **NARROW)).eval()
    ours = AutoencoderKL(**theirs.config).eval()
    ours.load_state_dict(theirs.state_dict())
    z = _latents(1, 4, 6, 5)
    with torch.no_grad():
        assert_close(ours.decode(z).sample, theirs.decode(z).sample, rel_l2=TOL)


@needs_diffusers
def test_forward_with_sampled_posterior_and_generator_matches_diffusers():
    ours, theirs = _pair("sd15")
    x = _images(2, 3, 40, 48)
    with torch.no_grad():
        got = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
        want = theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
        mode = ours(x).sample
    assert_close(got, want, rel_l2=TOL, name="forward sampled")
    assert not torch.equal(got, mode), "sample_posterior=True must draw, not take the mean"


@needs_diffusers
def test_posterior_statistics_match_diffusers_distribution():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as TheirDist

    moments = _latents(2, 8, 3, 5)
    moments[:, 4:, 0, 0] = 40.0  # clamped to logvar 20
    moments[:, 4:, 0, 1] = -50.0  # clamped to logvar -30
    ours, theirs = DiagonalGaussianDistribution(moments), TheirDist(moments)
    other_moments = _latents(2, 8, 3, 5, seed=3)
    assert ours.logvar.max() == 20.0 and ours.logvar.min() == -30.0
    for name in ("mean", "logvar", "std", "var"):
        assert_close(getattr(ours, name), getattr(theirs, name), rel_l2=1e-7, name=name)
    assert_close(ours.mode(), theirs.mode(), rel_l2=0.0)
    assert_close(ours.kl(), theirs.kl(), rel_l2=1e-6, name="kl")
    assert_close(ours.kl(DiagonalGaussianDistribution(other_moments)), theirs.kl(TheirDist(other_moments)),
                 rel_l2=1e-6, name="kl(other)")
    sample = _latents(2, 4, 3, 5, seed=4)
    assert_close(ours.nll(sample), theirs.nll(sample), rel_l2=1e-6, name="nll")
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    their_gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    assert torch.equal(ours.sample(gens), theirs.sample(their_gens))
    deterministic = DiagonalGaussianDistribution(moments, deterministic=True)
    assert torch.equal(deterministic.sample(), deterministic.mean)
    assert torch.equal(deterministic.kl(), torch.zeros(2))


@needs_diffusers
def test_fp64_channels_last_and_non_contiguous_inputs_match_fp32_reference():
    ours, _ = _pair("sd15")
    z = _latents(2, 4, 5, 6)
    with torch.no_grad():
        want = ours.decode(z).sample
        channels_last = ours.decode(z.contiguous(memory_format=torch.channels_last)).sample
        wide = _latents(2, 4, 5, 12)
        wide[..., ::2] = z
        strided = ours.decode(wide[..., ::2]).sample
        model64 = AutoencoderKL(**ours.config).double()
        model64.load_state_dict(ours.state_dict())
        in_fp64 = model64.decode(z.double()).sample
    assert in_fp64.dtype == torch.float64
    assert_close(channels_last, want, rel_l2=TOL, name="channels_last")
    assert_close(strided, want, rel_l2=TOL, name="non-contiguous")
    assert_close(want, in_fp64, rel_l2=TOL, name="fp32 vs fp64")


# ---------------------------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------------------------


@needs_diffusers
def test_return_dict_false_gives_tuples_and_outputs_index_like_diffusers():
    ours, _ = _pair("sd15")
    x = _images(1, 3, 32, 32)
    with torch.no_grad():
        (posterior,) = ours.encode(x, return_dict=False)
        (sample,) = ours.decode(posterior.mode(), return_dict=False)
        (forward_sample,) = ours(x, return_dict=False)
        out = ours.decode(posterior.mode())
        enc = ours.encode(x)
    assert isinstance(posterior, DiagonalGaussianDistribution)
    assert isinstance(out, DecoderOutput) and isinstance(enc, AutoencoderKLOutput)
    assert torch.equal(out[0], sample) and torch.equal(out["sample"], sample) and torch.equal(forward_sample, sample)
    assert enc[0] is enc.latent_dist


@needs_diffusers
def test_slicing_equals_batched_call():
    ours, _ = _pair("sd3")
    x = _images(3, 3, 24, 40)
    z = _latents(3, 16, 4, 3)
    with torch.no_grad():
        batched = ours.encode(x).latent_dist.mean, ours.decode(z).sample
        ours.enable_slicing()
        try:
            sliced = ours.encode(x).latent_dist.mean, ours.decode(z).sample
        finally:
            ours.disable_slicing()
    assert_close(sliced[0], batched[0], rel_l2=TOL, name="sliced encode")
    assert_close(sliced[1], batched[1], rel_l2=TOL, name="sliced decode")


@functools.lru_cache(maxsize=None)
def _tiny_deep_model():
    """Four levels (f = 8) at width 4 with one resnet per level: cheap enough for many tiles."""
    return AutoencoderKL.from_preset("sd15", block_out_channels=(4, 4, 4, 4), norm_num_groups=2, layers_per_block=1)


@pytest.mark.parametrize("shape", [(1, 4, 20, 24), (1, 4, 58, 96), (1, 4, 59, 97), (2, 4, 9, 1)])
def test_tiled_decode_output_shape_is_8h_by_8w_for_any_size(shape):
    model = _tiny_deep_model()
    model.tile_latent_min_size = 32 if shape[2] > 40 else 8
    model.enable_tiling()
    try:
        with torch.no_grad():
            out = model.decode(_latents(*shape)).sample
    finally:
        model.disable_tiling()
    assert out.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3])
    assert torch.isfinite(out).all()


def test_tiled_encode_keeps_the_untiled_odd_size_arithmetic():
    model = _tiny_deep_model()
    x = _images(1, 3, 468, 100)
    model.tile_sample_min_size = 128
    with torch.no_grad():
        tiled = model.tiled_encode(x).latent_dist.mean
        untiled = model.encode(x).latent_dist.mean
    assert tiled.shape == untiled.shape == (1, 4, 58, 12)
    assert torch.isfinite(tiled).all()


def test_tile_blending_is_exact_for_a_pointwise_stand_in_model(monkeypatch):
    """With per-pixel stand-ins for the networks, blended tiles must reproduce the untiled result exactly: this
    checks the tile geometry and that the blend weights sum to one everywhere."""
    model = _tiny_deep_model()
    monkeypatch.setattr(model, "_decode_untiled", lambda z: torch.nn.functional.interpolate(z[:, :3], scale_factor=8.0))
    # Moments (N, 8, H // 8, W // 8): the mean of each 8x8 pixel block, channels (0, 1, 2, 0, 1, 2, 0, 1).
    monkeypatch.setattr(model, "_encode_untiled",
                        lambda x: torch.nn.functional.avg_pool2d(x, 8)[:, [0, 1, 2, 0, 1, 2, 0, 1]])
    model.tile_latent_min_size, model.tile_sample_min_size = 8, 64
    z = _latents(2, 4, 21, 30)
    x = _images(1, 3, 203, 150)
    assert_close(model.tiled_decode(z).sample, model._decode_untiled(z), rel_l2=1e-6, name="tiled stand-in decode")
    assert_close(model.tiled_encode(x).latent_dist.mean, model._encode_untiled(x)[:, :4], rel_l2=1e-6,
                 name="tiled stand-in encode")


@needs_diffusers
def test_tiling_is_exact_when_the_input_fits_in_one_tile():
    ours, _ = _pair("sd15")
    z = _latents(1, 4, 7, 9)
    with torch.no_grad():
        want = ours.decode(z).sample
        ours.enable_tiling()
        try:
            got = ours.decode(z).sample
        finally:
            ours.disable_tiling()
    assert torch.equal(got, want)
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == (512, 64, 0.25)


def test_config_reads_as_attributes_and_mapping_and_round_trips():
    model = AutoencoderKL.from_config("sdxl", **NARROW)
    assert model.config.scaling_factor == 0.13025 and model.config["latent_channels"] == 4
    assert model.config.get("shift_factor", "missing") is None
    rebuilt = AutoencoderKL(**dict(model.config))
    from_config = AutoencoderKL.from_config(model.config)
    assert dict(rebuilt.config) == dict(model.config) == dict(from_config.config)
    assert _state_shapes(rebuilt) == _state_shapes(model)
    assert dict(copy.deepcopy(model).config) == dict(model.config)
    with pytest.raises(AttributeError, match="no field|no attribute"):
        model.config.no_such_field


def test_standalone_config_is_a_read_only_dict_that_diffusers_from_config_accepts():
    model = StandaloneAutoencoderKL.from_config("sdxl", **NARROW)
    assert isinstance(model.config, dict) and model.config.scaling_factor == 0.13025
    for mutate in (lambda c: setattr(c, "scaling_factor", 1.0), lambda c: c.update(scaling_factor=1.0),
                   lambda c: c.__setitem__("scaling_factor", 1.0)):
        with pytest.raises(TypeError, match="read-only"):
            mutate(model.config)
    with pytest.raises(AttributeError, match="no field"):
        model.config.no_such_field
    if diffusers is not None:
        theirs = diffusers.AutoencoderKL.from_config(model.config)
        assert _state_shapes(theirs) == _state_shapes(model)


def test_presets_carry_the_published_latent_constants():
    expected = {"sd15": (4, 0.18215, None, True), "sdxl": (4, 0.13025, None, True),
                "sd3": (16, 1.5305, 0.0609, False), "flux1": (16, 0.3611, 0.1159, False)}
    for name, (channels, scale, shift, quant) in expected.items():
        c = PRESETS[name]
        assert (c["latent_channels"], c["scaling_factor"], c["shift_factor"], c["use_quant_conv"]) == \
            (channels, scale, shift, quant), name
        assert c["block_out_channels"] == (128, 256, 512, 512) and c["layers_per_block"] == 2


@needs_diffusers
def test_constructor_takes_diffusers_config_with_private_keys_and_folder_paths(tmp_path):
    _, theirs = _pair("flux1")
    theirs.save_config(tmp_path)  # diffusers writes config.json with _class_name and _diffusers_version
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert "_class_name" in on_disk
    from_dict = AutoencoderKL(**on_disk)
    from_folder = AutoencoderKL.from_config(tmp_path)
    from_file = AutoencoderKL.from_config(str(tmp_path / "config.json"), scaling_factor=0.5)
    for model in (from_dict, from_folder):
        public = {k: v for k, v in model.config.items() if not k.startswith("_")}
        assert resolve_config(public) == resolve_config(dict(theirs.config))
    assert from_file.config.scaling_factor == 0.5 and from_file.config.latent_channels == 16


def test_bad_configs_raise_clear_errors():
    with pytest.raises(TypeError, match="unknown AutoencoderKL config field.*'bogus'"):
        AutoencoderKL(bogus=1)
    with pytest.raises(ValueError, match="valid preset names: .*sd15"):
        AutoencoderKL.from_config("sd9")
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        AutoencoderKL(block_out_channels=(50,), norm_num_groups=32)
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4)
    with pytest.raises(ValueError, match="valid preset names"):
        AutoencoderKL.from_preset("sd2")


@needs_diffusers
def test_bad_inputs_raise_errors_naming_the_expected_shape():
    ours, _ = _pair("sd15")
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        ours.decode(_latents(4, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        ours.decode(_latents(1, 16, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ours.encode(_images(1, 4, 32, 32))
    with pytest.raises(ValueError, match="at least 8"):
        ours.encode(_images(1, 3, 7, 32))
    with pytest.raises(ValueError, match="empty batch"):
        ours.decode(_latents(0, 4, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        ours.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="model is on cpu"):
        ours.decode(torch.empty(1, 4, 8, 8, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ours.decode([[1.0]])


@needs_diffusers
def test_other_float_dtypes_are_cast_to_the_model_dtype():
    ours, _ = _pair("sd15")
    z = _latents(1, 4, 4, 5)
    with torch.no_grad():
        from_fp64 = ours.decode(z.double()).sample
        from_fp32 = ours.decode(z).sample
    assert from_fp64.dtype == torch.float32
    assert torch.equal(from_fp64, from_fp32)
    low = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.no_grad():
        from_bf16_model = low.decode(z).sample  # fp32 latents into a bf16 model
    assert from_bf16_model.dtype == torch.bfloat16 and low.dtype == torch.bfloat16
    assert_close(from_bf16_model, from_fp32, rel_l2=5e-2, name="bf16 model vs fp32")


def test_from_preset_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = AutoencoderKL.from_preset("sd15", seed=3, **NARROW)
    b = AutoencoderKL.from_preset("sd15", seed=3, **NARROW)
    c = AutoencoderKL.from_preset("sd15", seed=4, **NARROW)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.encoder.conv_in.weight, c.encoder.conv_in.weight)
    assert not a.training
    d = AutoencoderKL.from_preset("sd15", dtype=torch.float64, **NARROW)
    assert d.dtype == torch.float64 and d.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Backend hook (contract with sdvae_fast.fast)
# ---------------------------------------------------------------------------------------------------------------


def _fake_fast_module(calls):
    fake = types.ModuleType("sdvae_fast.fast")

    def use_fast_path(backend, device):
        calls.append(("use_fast_path", backend, torch.device(device).type))
        return True

    def encode_moments(model, x, *, validate=True):
        calls.append(("encode_moments", tuple(x.shape)))
        return torch.full((x.shape[0], 8, x.shape[2] // 8, x.shape[3] // 8), 0.5)

    def decode_sample(model, z, *, validate=True):
        calls.append(("decode_sample", tuple(z.shape)))
        return torch.full((z.shape[0], 3, 8 * z.shape[2], 8 * z.shape[3]), 0.25)

    fake.use_fast_path, fake.encode_moments, fake.decode_sample = use_fast_path, encode_moments, decode_sample
    return fake


def test_backend_hook_calls_fast_path_only_when_asked(monkeypatch):
    calls = []
    fake = _fake_fast_module(calls)
    monkeypatch.setitem(sys.modules, "sdvae_fast.fast", fake)
    monkeypatch.setattr(sdvae_fast, "fast", fake, raising=False)  # bound once the real module was imported
    model = AutoencoderKL.from_config("sd15", **NARROW)
    z, x = _latents(2, 4, 3, 5), _images(1, 3, 16, 24)
    with torch.no_grad():
        model.decode(z)  # "auto" on CPU: never consults sdvae_fast.fast
        assert calls == []
        model.set_backend("triton")
        assert torch.all(model.decode(z).sample == 0.25)
        assert torch.all(model.encode(x).latent_dist.mean == 0.5)
        model.set_backend("torch")
        model.decode(z)
    assert calls == [("use_fast_path", "triton", "cpu"), ("decode_sample", (2, 4, 3, 5)),
                     ("use_fast_path", "triton", "cpu"), ("encode_moments", (1, 3, 16, 24))]


def test_backend_names_are_validated_from_argument_and_environment(monkeypatch):
    model = AutoencoderKL.from_config("diffusers_test")
    assert model.backend == "auto"
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        model.set_backend("cuda")
    monkeypatch.setenv("SDVAE_FAST_BACKEND", "torch")
    assert AutoencoderKL.from_config("diffusers_test").backend == "torch"
    monkeypatch.setenv("SDVAE_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="SDVAE_FAST_BACKEND"):
        AutoencoderKL.from_config("diffusers_test")


def test_package_import_stays_light():
    import subprocess

    code = ("import sys, sdvae_fast; heavy = [m for m in ('diffusers', 'triton', 'sdvae_fast.patching', "
            "'sdvae_fast.fast') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
