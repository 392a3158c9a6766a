"""CPU-side benchmarks (pytest-benchmark): checkpoint loading and the per-call overhead of the op layer.

Run: `python3 -m pytest bench/test_bench_cpu.py` (add `--benchmark-only` to skip nothing, `--benchmark-json F` to
keep the numbers). GPU timing lives in `sdvae-fast bench` and bench/bench_*.py, which use CUDA events; these
measure host work only, which is what a CPU can measure honestly:

- loading the sd15 architecture (83.65 M parameters, fp32) from a diffusers folder and from one
  diffusers-named safetensors file (layout detection and config inference);
- the dispatch overhead of `sdvae_fast.ops.gn_silu_conv2d` (argument validation + `torch.library` custom-op call)
  against the same arithmetic in plain `torch.nn.functional`, on a tensor so small that the arithmetic is
  negligible. Without CUDA and without the interpreter the op runs its PyTorch reference, so the difference is the
  op layer's own cost per call; a decode makes about 60 such calls.
"""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sdvae_fast import AutoencoderKL, ops


@pytest.fixture(scope="module")
def sd15_files(tmp_path_factory):
    """The sd15 architecture saved two ways: a diffusers folder and one diffusers-named safetensors file."""
    folder = tmp_path_factory.mktemp("sd15")
    vae = AutoencoderKL.from_preset("sd15", seed=0)
    vae.save_pretrained(folder / "diffusers")
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(folder / "diffusers_names.safetensors"))
    return folder, vae


def test_load_diffusers_folder(benchmark, sd15_files):
    folder, vae = sd15_files
    loaded = benchmark.pedantic(AutoencoderKL.from_pretrained, args=(str(folder / "diffusers"),), rounds=3)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in vae.parameters())


def test_load_single_file_with_diffusers_names(benchmark, sd15_files):
    folder, vae = sd15_files
    loaded = benchmark.pedantic(AutoencoderKL.from_single_file, args=(str(folder / "diffusers_names.safetensors"),),
                                kwargs={"config": "sd15"}, rounds=3)
    assert torch.equal(loaded.decoder.conv_out.weight, vae.decoder.conv_out.weight)


def _gsc_functional(x, weight, bias, gamma, beta):
    return F.conv2d(F.silu(F.group_norm(x, 4, gamma, beta, eps=1e-6)), weight, bias, padding=1)


@pytest.fixture(scope="module")
def tiny_gsc_inputs():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4) + 0.5
    return x, torch.randn(8, 8, 3, 3) * 0.1, torch.randn(8), torch.rand(8) + 0.5, torch.randn(8) * 0.1


def test_dispatch_gn_silu_conv2d_op(benchmark, tiny_gsc_inputs):
    x, weight, bias, gamma, beta = tiny_gsc_inputs
    y = benchmark(lambda: ops.gn_silu_conv2d(x, weight, bias, norm_weight=gamma, norm_bias=beta, num_groups=4))
    torch.testing.assert_close(y, _gsc_functional(x, weight, bias, gamma, beta), rtol=1e-5, atol=1e-5)


def test_dispatch_plain_functional_baseline(benchmark, tiny_gsc_inputs):
    x, weight, bias, gamma, beta = tiny_gsc_inputs
    benchmark(lambda: _gsc_functional(x, weight, bias, gamma, beta))
