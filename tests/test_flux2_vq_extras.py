"""FLUX.2 extras (issue 14): `sdvae_fast.patch` / `unpatch` of a live `diffusers.AutoencoderKLFlux2` (alone and
as a pipeline's `.vae`), and `sdvae-fast parity` on a FLUX.2 folder.

The torch-backend checks are bitwise (a patched VAE on backend "torch" runs diffusers' own forwards). The one
kernel check decodes with a two-level model (widths 8/16, small decoder 12/24, 4 groups; the encoder's units
are the same as AutoencoderKL's, tested elsewhere) under Triton's interpreter at batch 1 and a 1x2 latent, since
the interpreter costs about a second per launch; it counts `fast.run_decoder` calls to prove the fast path ran,
and compares with diffusers' output (fp32, 1e-4 relative L2, tests/helpers.py).
"""
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import sdvae_fast  # noqa: E402
from helpers import assert_close  # noqa: E402
from sdvae_fast import fast  # noqa: E402

TINY = dict(block_out_channels=(8, 16), decoder_block_out_channels=(12, 24), norm_num_groups=4, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _live_flux2(seed: int = 0):
    """diffusers' AutoencoderKLFlux2 of TINY, seeded, with biases and BatchNorm statistics off their defaults."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(**TINY).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen) + 0.05)
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.running_mean.shape, generator=gen))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen))
    return vae


def _instance_entries(vae):
    """{module name: its instance __dict__ entries except parameters, buffers and submodules}: what patching may
    change."""
    skip = {"_parameters", "_buffers", "_modules"}
    return {name: {k: v for k, v in m.__dict__.items() if k not in skip} for name, m in vae.named_modules()}


def _outputs(vae, x, z):
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        return posterior.mean, posterior.logvar, vae.decode(z).sample


def test_patch_unpatch_live_flux2_pipeline_round_trip_is_bit_identical_on_torch_backend():
    vae = _live_flux2()
    pipe = types.SimpleNamespace(vae=vae)
    x = (torch.rand(2, 3, 20, 18, generator=torch.Generator().manual_seed(2)) * 2 - 1).contiguous(
        memory_format=torch.channels_last)
    z = torch.randn(2, 32, 3, 5, generator=torch.Generator().manual_seed(3))
    before = _outputs(vae, x, z)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    entries = _instance_entries(vae)

    assert sdvae_fast.patch(pipe, backend="torch") is pipe
    assert sdvae_fast.is_patched(pipe) and sdvae_fast.is_patched(vae)
    assert sdvae_fast.patch(pipe, backend="torch") is pipe  # idempotent
    assert "forward" in vae.encoder.__dict__ and "forward" in vae.decoder.__dict__ and "_encode" in vae.__dict__
    patched = _outputs(vae, x, z)
    for a, b in zip(patched, before):
        assert torch.equal(a, b)

    assert sdvae_fast.unpatch(pipe) is pipe
    assert not sdvae_fast.is_patched(vae)
    assert _instance_entries(vae).keys() == entries.keys()
    for name, attrs in _instance_entries(vae).items():
        assert attrs.keys() == entries[name].keys(), name
        for key, value in attrs.items():
            assert value is entries[name][key] or (key == "training" and value == entries[name][key]), (name, key)
    after_state = vae.state_dict()
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], state[k]) for k in state)
    for a, b in zip(_outputs(vae, x, z), before):
        assert torch.equal(a, b)
    assert sdvae_fast.unpatch(vae) is vae  # a no-op when not patched


def test_patched_live_flux2_decodes_on_the_kernels(monkeypatch):
    vae = _live_flux2(seed=4)
    z = torch.randn(1, 32, 1, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = vae.decode(z).sample
    calls = {"run_decoder": 0, "run_encoder": 0}
    for name in calls:
        original = getattr(fast, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(fast, name, counted)
    sdvae_fast.patch(vae, backend="triton")
    try:
        with torch.no_grad():
            sample = vae.decode(z).sample
    finally:
        sdvae_fast.unpatch(vae)
    assert calls == {"run_decoder": 1, "run_encoder": 0}
    assert_close(sample, expected, rel_l2=1e-4, name="decode sample")


def test_parity_command_runs_on_a_flux2_folder_on_torch_backend(tmp_path, capsys):
    from sdvae_fast import cli

    _live_flux2(seed=7).save_pretrained(tmp_path / "vae")
    status = cli.main(["parity", "--vae", str(tmp_path / "vae"), "--backend", "torch", "--device", "cpu",
                       "--dtype", "fp32", "--res", "16", "--out", str(tmp_path / "report")])
    report = (tmp_path / "report" / "parity.md").read_text()
    assert status == 0, capsys.readouterr().out
    assert "decoder.mid_block.attentions.0" in report and "1x32x8x8" in report and "**PASS**" in report
