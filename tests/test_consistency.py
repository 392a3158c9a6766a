"""The consistency decoder (issue 13): `sdvae_fast.ConsistencyDecoderVAE` against diffusers' class.

A narrow full-depth decoder (4 UNet blocks of each kind, widths 8/16/24/24, 8 groups, layers_per_block=1, 7 input
channels, perturbed GroupNorm and time-embedding weights) with identical weights and generator: decode on the
torch backend is diffusers' code (bitwise), on the triton backend under the interpreter within fp32 1e-4
relative L2 (tests/helpers.py), bf16 within twice diffusers' own bf16 error. The triton cases are the slow ones
(each decode is 2 full-depth UNet calls under the interpreter).
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from helpers import assert_close, error_report  # noqa: E402
from sdvae_fast import ConsistencyDecoderVAE, fast, ops  # noqa: E402
from sdvae_fast.fast import units  # noqa: E402

CONFIG = dict(
    encoder_block_out_channels=(8, 8, 16, 16), encoder_layers_per_block=1, encoder_norm_num_groups=8,
    decoder_block_out_channels=(8, 16, 24, 24), decoder_layers_per_block=1, decoder_norm_num_groups=8,
)


def _reference(seed: int = 0):
    """diffusers' ConsistencyDecoderVAE with CONFIG, seeded, GroupNorm affine and time weights perturbed."""
    torch.manual_seed(seed)
    vae = diffusers.ConsistencyDecoderVAE(**CONFIG).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in vae.named_modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(0.3 * torch.randn(module.bias.shape, generator=gen))
            if name.endswith("time_emb_proj"):
                module.weight.mul_(3.0)
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
    return vae


def _ours(reference, backend: str):
    vae = ConsistencyDecoderVAE(**CONFIG).eval()
    vae.load_state_dict(reference.state_dict())
    vae.set_backend(backend)
    return vae


@pytest.fixture(scope="module")
def pair():
    reference = _reference()
    return reference, _ours(reference, "torch")


def _decode(vae, z, seed=0):
    with torch.no_grad():
        return vae.decode(z, generator=torch.Generator().manual_seed(seed)).sample


def test_subclass_config_and_state_dict_are_diffusers(pair):
    reference, ours = pair
    assert isinstance(ours, diffusers.ConsistencyDecoderVAE)
    assert dict(ours.config) == dict(reference.config)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert ours.backend == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ours.set_backend("cuda")


def test_torch_backend_is_diffusers_bitwise(pair):
    reference, ours = pair
    z = torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_decode(ours, z), _decode(reference, z))
    # forward (encode + decode) as well
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        a = ours(x, generator=torch.Generator().manual_seed(5)).sample
        b = reference(x, generator=torch.Generator().manual_seed(5)).sample
    assert torch.equal(a, b)


def test_save_load_round_trip_through_diffusers(pair, tmp_path):
    reference, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    loaded = diffusers.ConsistencyDecoderVAE.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    reference.save_pretrained(tmp_path / "theirs")
    back = ConsistencyDecoderVAE.from_pretrained(tmp_path / "theirs")
    assert type(back) is ConsistencyDecoderVAE and back.backend in ("auto", "triton", "torch")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), reference.state_dict().values()))


def test_deepcopy_keeps_backend_and_rebinds_the_unet_forward(pair):
    _, ours = pair
    twin = copy.deepcopy(ours)
    assert twin.backend == "torch"
    assert twin.decoder_unet.forward.__self__ is twin.decoder_unet
    twin.set_backend("triton")
    assert ours.backend == "torch"


def test_which_unet_units_run_on_the_kernels(pair):
    _, ours = pair
    stages = units.unet_units(ours.decoder_unet)
    listed = {u.name: u for stage in stages for u in stage}
    fused = sorted(n for n, u in listed.items() if u.kind == "ResnetBlock2D[scale_shift]" and u.reason is None)
    # every resnet: 4 down blocks x 1 + 3 downsampling, mid 2, 4 up blocks x 2 + 3 upsampling
    assert len(fused) == 4 + 3 + 2 + 8 + 3, fused
    assert {units.resampling(u.modules[0]) for n, u in listed.items() if "samplers" in n} == {"up", "down"}
    assert listed["decoder_unet.conv_in"].reason is None and listed["decoder_unet.conv_out*"].reason is None
    assert not {n: u.reason for n, u in listed.items() if u.reason is not None}
    # up-block resnets read [x | popped skip]: no statistics are emitted for their norm1 by the previous unit
    assert listed["decoder_unet.up_blocks.0.resnets.0"].input_norm is None
    # a resampling resnet with a shortcut conv, or a FIR resampler, falls back with its reason
    up = diffusers.models.resnet.ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=16, groups=4, up=True,
                                               time_embedding_norm="scale_shift")
    assert "resamples other than" in units.make_unit("r", up).reason
    # the VAE's ResnetBlock2D registration is untouched; a 'default' time norm falls back with its reason
    resnet = diffusers.models.resnet.ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4)
    assert "time_embedding_norm is 'default'" in units.make_unit("r", resnet).reason
    resnet.time_emb_proj = None
    assert units.make_unit("r", resnet).kind == "ResnetBlock2D"


def test_modulated_gsc_folds_the_time_scale_shift(pair):
    """One op against diffusers' arithmetic, per-sample time scale/shift (batch 2), under the interpreter."""
    _, ours = pair
    block = ours.decoder_unet.mid_block.resnets[0]
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(2, 24, 3, 5, generator=gen)
    temb = torch.randn(2, 32, generator=gen)
    scale, shift = units.time_scale_shift(block, temb, units.RunContext())
    with torch.no_grad():
        y, _ = units.modulated_gsc(h, block.conv2, units.RunContext(), block.norm2, scale, shift)
        t = block.time_emb_proj(torch.nn.functional.silu(temb))[:, :, None, None]
        s, b = t.chunk(2, dim=1)
        expected = block.conv2(torch.nn.functional.silu(block.norm2(h) * (1 + s) + b))
    assert ops._conv_kernel_runs(h, block.conv2.weight, 1)
    assert_close(y, expected, rel_l2=1e-5, name="modulated_gsc")


def _aten_ops(fn):
    """Names of the ops `fn()` runs per call (torch.profiler, CPU activities): those inside the one-time weight
    derivations (`kernels._common.DERIVE_RANGE`: packing, the upsample fold) are left out."""
    from sdvae_fast.kernels._common import DERIVE_RANGE

    def derived(event):
        while event is not None:
            if event.name == DERIVE_RANGE:
                return True
            event = event.cpu_parent
        return False

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events() if not derived(event)}


def test_triton_decode_batch2_odd_size_matches_diffusers_with_every_resnet_fused(pair, monkeypatch):
    """Decode of 2 x 4 x 1 x 1 latents (8 x 8 pixels, odd latent size; every level a ragged tile) on the kernels
    against diffusers' decode: fp32 within 1e-4 relative L2, all 20 resnets fused in both steps."""
    reference, _ = pair
    ours = _ours(reference, "triton")
    calls = []
    original = units.modulated_gsc
    monkeypatch.setattr(units, "modulated_gsc", lambda *a, **k: calls.append(1) or original(*a, **k))
    z = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(11))
    assert_close(_decode(ours, z), _decode(reference, z), rel_l2=1e-4, name="decode triton 2x4x1x1")
    assert len(calls) == 2 * 20  # 2 steps x 20 fused scale/shift resnets: the kernels really ran


def test_triton_bf16_decode_without_aten_group_norm_upsample_or_cat(pair):
    """bf16 on the kernels against diffusers in fp32, within 2x diffusers' own bf16 error plus 1e-2 relative L2
    (decode of 1 x 4 x 1 x 1 latents). The decode's profiler trace holds no aten group_norm, upsample or cat:
    conv_in reads x_t and the latents, the up blocks read [x | skip], the upsampling resnets upsample by indexing.
    (Our encoder in bf16 is the VAE's, tested in tests/test_fast_path.py and tests/test_autocast.py.)"""
    reference, _ = pair
    ours = _ours(reference, "triton").to(torch.bfloat16)
    low = copy.deepcopy(reference).to(torch.bfloat16)
    z = torch.randn(1, 4, 1, 1, generator=torch.Generator().manual_seed(12))
    expected = _decode(reference, z)
    torch_rel = error_report(_decode(low, z.bfloat16()), expected)["rel_l2"]
    result = {}
    names = _aten_ops(lambda: result.setdefault("y", _decode(ours, z.bfloat16())))
    assert_close(result["y"], expected, rel_l2=2 * torch_rel + 1e-2,
                 name=f"decode bf16 (diffusers bf16 rel {torch_rel:.1e})")
    forbidden = sorted(n for n in names if n.startswith("aten::") and any(k in n for k in ("group_norm", "upsample",
                                                                                            "aten::cat")))
    assert not forbidden, forbidden
    assert "sdvae_fast::fused_conv2d" in names and "sdvae_fast::gn_silu_conv2d" in names


def test_triton_encode_runs_our_encoder_and_matches_diffusers(pair, monkeypatch):
    reference, _ = pair
    ours = _ours(reference, "triton")
    calls = []
    original = fast.run_encoder
    monkeypatch.setattr(fast, "run_encoder", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(15)) * 2 - 1
    with torch.no_grad():
        actual, expected = ours.encode(x).latent_dist, reference.encode(x).latent_dist
    assert calls == [1]
    assert_close(actual.mean, expected.mean, rel_l2=1e-5, name="encode triton mean")
    assert_close(actual.logvar, expected.logvar, rel_l2=1e-5, name="encode triton logvar")


def test_other_step_counts_raise_diffusers_error(pair):
    _, ours = pair
    ours = _ours(ours, "triton")
    with pytest.raises(ValueError, match="more than 2 inference steps are not supported"):
        ours.decode(torch.randn(1, 4, 1, 1), num_inference_steps=3)


def test_without_diffusers_a_clear_import_error():
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'diffusers' or name.startswith('diffusers.'): raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import sdvae_fast\n"
            "try:\n"
            "    sdvae_fast.ConsistencyDecoderVAE()\n"
            "except ImportError as e:\n"
            "    print('IMPORTERROR', e)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "IMPORTERROR" in out.stdout and "diffusers" in out.stdout, out.stdout + out.stderr
