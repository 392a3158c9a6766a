"""Precision policy per backend (issue 15, item B; docs/design.md, section 6).

- Under `torch.autocast(cpu, bfloat16)` an fp32 model returns bf16 on both backends: backend "torch" because
  autocast runs its convs in bf16 (as diffusers), backend "triton" (the kernels, TRITON_INTERPRET=1) because the
  fast path follows autocast (`sdvae_fast.fast.autocast_dtype`). Both are within bf16 rounding of the fp32
  reference: the kernels' relative L2 error is at most twice PyTorch's own bf16 error plus a small slack (the
  project's standard). Repeated autocast calls reuse the packed bf16 weights (no rebuild, no new cache entry).
- fp16 overflow: backend "torch" is diffusers' numerics and returns non-finite values for a model that overflows
  fp16 (fp16 weights, or fp32 weights under fp16 autocast); the fast path guards fp16 and stays finite.

Tiny VAE (`diffusers_test`: widths 2/4, two levels) and tiny inputs, so the interpreter takes seconds.
"""
import time

import pytest
import torch

from sdvae_fast import AutoencoderKL
from sdvae_fast.kernels._common import derived_weights
from tests.helpers import assert_close, error_report

BF16_SLACK = 1e-3  # the small fixed slack of the standard, added to twice PyTorch's own relative error


def _vae(backend: str, dtype=torch.float32) -> AutoencoderKL:
    vae = AutoencoderKL.from_preset("diffusers_test", seed=0).eval().requires_grad_(False).to(dtype)
    vae.set_backend(backend)
    return vae


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 8, 10, generator=g) * 2 - 1, torch.randn(1, 4, 3, 5, generator=g)


def _run(vae, x, z):
    """(posterior mean, moments' logvar, decoded images) of one encode and one decode."""
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.logvar, vae.decode(z).sample


def test_autocast_bf16_both_backends_return_bf16_within_bf16_tolerance():
    start = time.perf_counter()
    x, z = _inputs()
    ref_vae, fast_vae = _vae("torch"), _vae("triton")
    names = ("mean", "logvar", "decode")
    with torch.no_grad():
        reference = _run(ref_vae, x, z)  # fp32, the yardstick
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch_bf16 = _run(ref_vae, x, z)
            fast_bf16 = _run(fast_vae, x, z)
    for name, want, theirs, ours in zip(names, reference, torch_bf16, fast_bf16):
        assert want.dtype == torch.float32
        assert theirs.dtype == torch.bfloat16, f"{name}: the torch backend should follow autocast"
        assert ours.dtype == theirs.dtype, f"{name}: fast path {ours.dtype}, torch backend {theirs.dtype}"
        torch_error = error_report(theirs, want)["rel_l2"]
        report = assert_close(ours, want, rel_l2=2 * torch_error + BF16_SLACK, name=f"autocast bf16 {name}")
        print(f"{name}: torch backend rel_l2={torch_error:.2e}, fast path rel_l2={report['rel_l2']:.2e}")
    print(f"{time.perf_counter() - start:.1f} s")


def test_repeated_autocast_calls_reuse_packed_weights():
    """The second decode under autocast builds no derived weight and adds no cache entry (nothing leaks); the
    fp32 run afterwards still returns fp32."""
    _, z = _inputs()
    vae = _vae("triton")
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first = vae.decode(z).sample
            builds, entries = dict(derived_weights.builds), len(derived_weights)
            again = vae.decode(z).sample
        new_builds = {k: v - builds.get(k, 0) for k, v in derived_weights.builds.items() if v != builds.get(k, 0)}
        assert not new_builds, f"the second autocast call rebuilt {new_builds}"
        assert len(derived_weights) == entries
        assert torch.equal(first, again)
        assert vae.decode(z).sample.dtype == torch.float32


def _overflowing(backend: str, dtype) -> AutoencoderKL:
    """The tiny VAE with the decoder's second mid-block conv scaled so its outputs exceed fp16's range."""
    vae = _vae(backend)
    conv2 = vae.decoder.mid_block.resnets[1].conv2
    with torch.no_grad():
        conv2.weight.mul_(30000.0 / conv2.weight.abs().max().item())
    return vae.to(dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_fp16_overflow_policy_per_backend():
    """fp16 model and fp32 model under fp16 autocast: backend "torch" overflows (non-finite, as diffusers), the
    fast path stays finite and close to fp32."""
    _, z = _inputs()
    with torch.no_grad():
        expected = _overflowing("torch", torch.float32).decode(z).sample
        assert torch.isfinite(expected).all()
        torch16 = _overflowing("torch", torch.float16).decode(z).sample
        fast16 = _overflowing("triton", torch.float16).decode(z).sample
        with torch.autocast("cpu", dtype=torch.float16):
            torch_ac = _overflowing("torch", torch.float32).decode(z).sample
            fast_ac = _overflowing("triton", torch.float32).decode(z).sample
    assert not torch.isfinite(torch16).all(), "the case must overflow the torch backend in fp16"
    assert not torch.isfinite(torch_ac).all(), "the case must overflow the torch backend under fp16 autocast"
    assert fast16.dtype == fast_ac.dtype == torch_ac.dtype == torch.float16
    assert_close(fast16, expected, rel_l2=1e-2, name="fp16 model, fast path")
    assert_close(fast_ac, expected, rel_l2=1e-2, name="fp16 autocast, fast path")
