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

Also here, without the benchmark fixture (so `--benchmark-only` skips them): the CPU smoke tests of
bench/bench_consistency.py's non-GPU parts (its refusal without CUDA, its --dry-run with the FLOP counts of the real
config, the attention count, and the results' arithmetic and files); about 8 s.
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


def _bench_consistency():
    """bench/bench_consistency.py as a module (bench/ is no package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("bench_consistency.py")
    spec = importlib.util.spec_from_file_location("bench_consistency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_consistency_bench_refuses_without_cuda_and_dry_run_counts_the_real_decode(monkeypatch, capsys):
    bench = _bench_consistency()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--sizes", "512"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert bench.main(["--dry-run", "--sizes", "512", "1024"]) == 0
    out = capsys.readouterr().out
    assert "our copy holds the reference's weights: True" in out
    # openai/consistency-decoder: 33.63 TFLOP per UNet call at 512^2 (FlopCounterMode agrees, checked inside)
    assert "real config 67.26 TFLOP useful per decode (33.63 per step" in out
    assert "real config 269.02 TFLOP useful per decode" in out
    assert "kernel variants of our narrow decode" in out or "TRITON_INTERPRET=1" in out
    flops = bench.decode_flops({}, [64])[64]
    # diffusers' conv_out computes 6 channels (320 -> 6, 3x3), decode keeps 3: the other 3 are not useful work
    assert flops["full"] - flops["useful"] == 2 * 2 * 64 * 64 * 3 * 320 * 9
    assert flops["full"] == flops["counter"] and flops["attention"] == 0


def test_consistency_bench_counts_attention_and_reports_the_target(tmp_path):
    bench = _bench_consistency()
    flops = bench.decode_flops({**bench.NARROW, "decoder_add_attention": True}, [64])[64]
    # the mid block's attention at 8x8 (L = 64, inner dim 24): QK^T and PV, 2 FLOPs per multiply-add, 2 steps
    assert flops["attention"] == 2 * 4 * 64 * 64 * 24
    assert flops["full"] == flops["counter"]
    size_result = {"size": 64, "flops": {"useful": 6e12}, "check": {"verdict": "passed", "passed": True},
                   "contenders": {bench.EAGER: {"ms": 30.0}, bench.OURS: {"ms": 10.0}, bench.COMPILE: {"ms": 15.0}}}
    bench.summarize(size_result, rate_tflops=800.0)
    assert size_result["contenders"][bench.OURS]["tflops"] == pytest.approx(600.0)
    assert size_result["speedups"] == {"speedup_vs_eager": pytest.approx(3.0), "speedup_vs_compile": pytest.approx(1.5)}
    assert size_result["target"]["met"]  # 75 % of the matmul rate and ahead of compile
    assert size_result["target"]["verdict"] == ("met: ours at 75.0 % of the matmul rate (>= 60 %), 1.50x "
                                                "torch.compile's speed")
    result = {"env": {"gpu": "test"}, "seed": 0, "timing": "t", "matmul": {"n": 8, "ms": 1.0, "tflops": 800.0},
              "prewarm": "skipped", "sizes": {64: size_result}}
    json_path, md_path = bench.write_results(result, tmp_path, "x-consistency")
    assert "| 64 | sdvae-fast | 10.00 | 600.0 | 75.0 |" in md_path.read_text()
    assert '"speedup_vs_compile": 1.5' in json_path.read_text()
