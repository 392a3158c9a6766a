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
config, the attention count, and the results' arithmetic and files); about 8 s. And those of issue 14's
bench/bench_flux2.py and bench/bench_quantize.py: each script's --smoke run end to end on the CPU under Triton's
interpreter in a subprocess (tiny shapes, nothing timed; about 14 CPU-seconds per FLUX.2 model, 5 for the
quantiser), their refusal without CUDA, the quantiser check's near-tie margin on hand-made codes, the results'
arithmetic and files, the FLUX.2 prewarm's recording for sm_90, and bench/gpu_check.sh's `quantize` and `flux2`
sections reaching the scripts (on CPU they stop at the missing GPU).
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


# ---------------------------------------------------------------------------------------------------------------
# Issue 14: bench/bench_flux2.py and bench/bench_quantize.py (smoke runs on the interpreter, in a subprocess;
# their results arithmetic and checks in process)
# ---------------------------------------------------------------------------------------------------------------


def _bench_script(name: str):
    """bench/NAME.py as a module (bench/ is no package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke(script: str, out, *args):
    """Run `python bench/SCRIPT --smoke --out OUT ARGS` with TRITON_INTERPRET=1 in a fresh process (Triton reads
    the variable when kernels are defined, and this process defined them without it); returns the finished
    process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, str(Path(__file__).with_name(script)), "--smoke", "--out", str(out),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("model", ["flux2", "flux2-small"])
def test_flux2_bench_smoke_checks_every_contender_and_times_nothing(tmp_path, model):
    """The whole script on the CPU: narrow two-level models, ours on the interpreter, diffusers eager and
    torch.compile (backend "eager"), each checked against diffusers' fp32 decode; nothing is timed."""
    import json

    done = _smoke("bench_flux2.py", tmp_path, "--models", model)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "smoke-flux2.json").read_text())
    assert result["smoke"] and result["latents"] == [1, 32, 2, 2] and list(result["models"]) == [model]
    mr = result["models"][model]
    assert mr["check"]["passed"] and mr["check"]["ours_rel_l2"] <= mr["check"]["bound"]
    assert list(mr["contenders"]) == ["diffusers eager", "sdvae-fast", "diffusers compile"]
    for row in mr["contenders"].values():
        assert row["rel_l2"] < 0.05 and row["nonfinite"] == 0 and "error" not in row
        assert row.get("ms") is None and "not timed" in row["note"]
    assert mr["flops"]["decode"] > 0 and mr["image"] == [1, 3, 4, 4]
    md = (tmp_path / "smoke-flux2.md").read_text()
    assert "CPU SMOKE RUN, NOT A BENCHMARK" in md and f"| {model} | sdvae-fast | - |" in md


def test_flux2_bench_refuses_without_cuda_and_smoke_without_the_interpreter(monkeypatch, capsys):
    import os

    bench = _bench_script("bench_flux2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--models", "flux2"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    if os.environ.get("TRITON_INTERPRET") != "1":  # this process defined the kernels for the GPU (ops above)
        assert bench.main(["--smoke"]) == 2
        assert "needs TRITON_INTERPRET=1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--size", "1001"])


def test_flux2_bench_results_arithmetic_verdict_and_files(tmp_path):
    bench = _bench_script("bench_flux2")
    mr = {"model": "flux2", "flops": {"decode": 10_000_000_000_000},
          "contenders": {bench.EAGER: {"ms": 40.0, "rel_l2": 0.01, "nonfinite": 0, "max_abs": 0.1},
                         bench.OURS: {"ms": 20.0, "rel_l2": 0.03, "nonfinite": 0, "max_abs": 0.2},
                         bench.COMPILE: {"ms": 25.0, "rel_l2": 0.01, "nonfinite": 0, "max_abs": 0.1}}}
    bench.summarize(mr, rate_tflops=800.0)
    ours = mr["contenders"][bench.OURS]
    assert ours["tflops"] == pytest.approx(500.0) and ours["fraction_of_matmul"] == pytest.approx(0.625)
    assert mr["speedups"] == {"speedup_vs_eager": pytest.approx(2.0), "speedup_vs_compile": pytest.approx(1.25)}
    assert mr["contenders"][bench.COMPILE]["x_eager"] == pytest.approx(1.6)
    bench.verdict(mr, tol_floor=5e-3)  # 0.03 > 2 x 0.01 + 0.005: ours fails and is marked
    assert not mr["check"]["passed"] and ours["note"] == "CHECK FAILED"
    assert mr["check"]["verdict"].startswith("FAILED: ours 3.000e-02 vs bound 2.500e-02")
    ours["rel_l2"], ours["note"] = 0.02, ""
    bench.verdict(mr, tol_floor=5e-3)
    assert mr["check"]["passed"]
    result = {"env": {"gpu": "test"}, "smoke": False, "seed": 0, "latents": [1, 32, 128, 128], "timing": "t",
              "tol_floor": 5e-3, "matmul": {"n": 8, "ms": 1.0, "tflops": 800.0}, "prewarm": "skipped",
              "models": {"flux2": mr}}
    json_path, md_path = bench.write_results(result, tmp_path, "x-flux2")
    assert "| flux2 | sdvae-fast | 20.00 | 2.00 | 1.25 | 500.0 | 62.5 | 2.00e-02 | - |  |" in md_path.read_text()
    assert '"speedup_vs_compile": 1.25' in json_path.read_text()


def test_flux2_bench_prewarm_records_both_decoders_for_sm90():
    """The GPU run's prewarm: our kernels' variants of both 1024^2 bf16 decodes, recorded on meta copies."""
    from sdvae_fast.kernels import _common

    if _common.INTERPRET:
        pytest.skip("recording needs the kernels defined for the GPU (TRITON_INTERPRET unset)")
    from sdvae_fast import warmup

    bench = _bench_script("bench_flux2")
    capability, shared = warmup.parse_target("sm_90")
    one = bench.record_variants(["flux2-small"], 128, capability, shared)
    both = bench.record_variants(["flux2", "flux2-small"], 128, capability, shared)
    assert 0 < len(one.variants) < len(both.variants) and len(both.tunes) > 0


def test_quantize_bench_smoke_checks_the_kernel_and_cdist_and_times_nothing(tmp_path):
    import json

    done = _smoke("bench_quantize.py", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "smoke-quantize.json").read_text())
    assert result["smoke"] and result["codes"] == 256
    assert result["our_path"] == "Triton kernel under the interpreter"
    assert list(result["cases"]) == ["4x8 fp32", "4x8 bf16", "32x4 fp32", "32x4 bf16"]
    for cr in result["cases"].values():
        assert cr["check"]["passed"] and cr["matches_diffusers"] is True
        assert cr["indices_agree"] == cr["pixels"] and cr["zq_equal_where_agree"]
        for row in cr["contenders"].values():
            assert row["values_exact"] and row["beyond_margin"] == 0 and row.get("ms") is None
            assert "not timed" in row["note"]
    assert "CPU SMOKE RUN, NOT A BENCHMARK" in (tmp_path / "smoke-quantize.md").read_text()


def test_quantize_bench_check_excuses_near_ties_and_flags_far_codes_and_wrong_values():
    """check_case on hand-made outputs (PyTorch only): a pixel halfway between two close codes may take either,
    a far code or a z_q that is not z + (e - z) fails the check."""
    bench = _bench_script("bench_quantize")
    gen = torch.Generator().manual_seed(0)
    codebook = 10 * torch.randn(8, 4, generator=gen)
    codebook[2] = codebook[1] + 0.01
    z = torch.randn(1, 4, 2, 2, generator=gen)
    z[0, :, 0, 0] = (codebook[1] + codebook[2]) / 2  # a near tie between codes 1 and 2

    def fresh(indices):
        flat = bench.flat_pixels(z)
        z_q = (flat + (codebook[indices] - flat)).view(1, 2, 2, 4).permute(0, 3, 1, 2).contiguous()
        return {bench.OURS: (z_q, indices.view(1, 2, 2)), bench.CDIST: bench.cdist_quantize(z, codebook)}, \
            {"dtype": "fp32", "contenders": {bench.OURS: {}, bench.CDIST: {}}}

    best, _ = bench.exact_nearest(z, codebook)
    assert int(best[0]) in (1, 2)
    other = best.clone()
    other[0] = 3 - best[0]  # the other code of the tie
    outputs, cr = fresh(other)
    bench.check_case(z, codebook, outputs, cr)
    assert cr["check"]["passed"] and cr["near_ties"] >= 1 and cr["contenders"][bench.OURS]["mismatches"] == 1
    assert cr["matches_diffusers"] is True
    far = best.clone()
    far[1] = int(torch.argmax(((bench.flat_pixels(z)[1] - codebook) ** 2).sum(1)))  # the farthest code
    outputs, cr = fresh(far)
    bench.check_case(z, codebook, outputs, cr)
    assert not cr["check"]["passed"] and cr["contenders"][bench.OURS]["beyond_margin"] == 1
    assert "1 codes beyond fp32 rounding" in cr["check"]["verdict"]
    assert cr["contenders"][bench.OURS]["note"] == "CHECK FAILED"
    outputs, cr = fresh(best)
    outputs[bench.OURS][0][0, 0, 1, 1] += 1.0
    bench.check_case(z, codebook, outputs, cr)
    assert not cr["check"]["passed"] and "z_q is not z + (e - z)" in cr["check"]["verdict"]


def test_quantize_bench_results_arithmetic_and_files(tmp_path):
    bench = _bench_script("bench_quantize")
    assert bench.parse_case("256x64") == (256, 64)
    with pytest.raises(ValueError):
        bench.parse_case("4x")
    cr = {"dim": 4, "side": 128, "dtype": "bf16", "pixels": 16384, "flops": 2 * 16384 * 16384 * 4,
          "check": {"passed": True, "verdict": "passed"},
          "contenders": {bench.OURS: {"ms": 0.5, "peak_gib": 0.001, "mismatches": 0, "beyond_margin": 0},
                         bench.CDIST: {"ms": 2.0, "peak_gib": 1.0, "mismatches": 3, "beyond_margin": 2}}}
    bench.summarize(cr)
    assert cr["speedup"] == pytest.approx(4.0) and cr["memory_ratio"] == pytest.approx(1000.0)
    assert cr["contenders"][bench.OURS]["pixels_per_s"] == pytest.approx(16384 / 0.5e-3)
    assert cr["contenders"][bench.OURS]["tflops"] == pytest.approx(2 * 16384 * 16384 * 4 / 0.5e-3 / 1e12)
    result = {"env": {"gpu": "test"}, "smoke": False, "codes": 16384, "batch": 1, "our_path": "Triton kernel",
              "allow_tf32": False, "timing": "t", "cases": {"4x128 bf16": cr}}
    _, md_path = bench.write_results(result, tmp_path, "x-quantize")
    assert "| 4 x 128^2 | bf16 | sdvae-fast | 0.500 | 32.8 | 4.29 | 0.001 | 4.00 | 0 | 0 |  |" in md_path.read_text()


def test_gpu_check_runs_the_issue14_sections(tmp_path):
    """SECTIONS="quantize flux2": each section runs its script (here without a GPU: exit 2 with the message) and
    the report records both, in the script's order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("with a GPU the sections would run the real benchmarks")
    results = tmp_path / "results"
    env = dict(os.environ, SECTIONS="flux2 quantize", RESULTS_DIR=str(results), PYTHON=sys.executable,
               TRITON_CACHE_DIR=str(tmp_path / "cache"))
    script = Path(__file__).with_name("gpu_check.sh")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = next(results.glob("*.md")).read_text()
    assert report.index("## quantize (exit code 2") < report.index("## flux2 (exit code 2")
    assert "bench/bench_flux2.py --size 1024" in report and "bench/bench_quantize.py --out" in report
    assert report.count("needs a CUDA device") == 2
