"""Issue 14's benchmark: FLUX.2's VAE decode at 1024^2, ours against diffusers eager and torch.compile.

Run on a CUDA GPU (diffusers importable):

    python bench/bench_flux2.py [--models flux2 flux2-small] [--size 1024] [--out bench/results] [--name STEM]
    TRITON_INTERPRET=1 python bench/bench_flux2.py --smoke --out /tmp/x   # CPU: end to end, tiny, NOT timed

What it does, per model (batch 1, bf16, `decode(z).sample` of latents z (1, 32, size/8, size/8), float):
1. builds the model's architecture with seeded weights: `sdvae_fast.AutoencoderKLFlux2.from_preset(name, seed)`
   ("flux2": FLUX.2's VAE, decoder widths 128/256/512/512; "flux2-small": its small decoder, 96/192/384/384;
   84.0 M / 62.4 M parameters, of which the decoders hold 49.6 M / 27.9 M), every bias shifted by
   0.1 x N(0, 1) + 0.05 and every 1-D weight (GroupNorm gamma) scaled by 1 + 0.2 x N(0, 1) (a CPU generator
   seeded by --seed + 1; tests/test_flux2.py does the same), so that the fused norm and bias arithmetic is
   exercised (the real weights cannot be downloaded here). Its
   state dict is loaded (strict) into `diffusers.AutoencoderKLFlux2` of the same config, in fp32 on cuda:0: the
   reference (its default attention processor, SDPA). The three contenders, all bf16 with those weights:
     - "diffusers eager": a bf16 copy of the reference;
     - "diffusers compile": another bf16 copy's `decode` wrapped by `torch.compile(dynamic=False)` (default mode;
       compiled at its first call, whose time is reported);
     - "sdvae-fast": ours in bf16 with backend "triton" (what "auto" picks on CUDA).
2. before any model: the bf16 matrix rate (`bench_consistency.matmul_rate`: `triton.testing.do_bench` median of
   a --matmul-n cubed bf16 matmul) and a prewarm of our kernels (every Triton variant both decodes launch,
   recorded on meta copies with `sdvae_fast.warmup.record`, compiled in parallel by `warmup.compile_launches`,
   autotuning settled by `warmup.tune`; --no-prewarm leaves that to the first call);
3. correctness before timing: the reference's fp32 decode of z (TF32 off) against each contender's bf16 decode
   of z in bf16, `sdvae_fast.parity.error_stats` (relative L2 = ||a - b|| / ||b|| in fp64, b the fp32 image;
   max |a - b|; non-finite count). Ours passes when it has no non-finite value and its relative L2 is at most
   2 x diffusers eager's + 5e-3 (the project's rule, `parity.TOL_FLOOR[bf16]`); a failure is reported, the row
   marked "CHECK FAILED" and the exit status is 1 (the run goes on and still times it);
4. timing: one call for the peak memory (`sdvae_fast.bench.peak_extra_gib`: `torch.cuda.max_memory_allocated`
   during the call minus what was allocated before, GiB), then `triton.testing.do_bench(fn, warmup=--warmup-ms,
   rep=--rep-ms, return_mode="median")` in ms (its warm-up calls come after the check's first call).
Order: for each model eager and ours (check, then timing), then for each model torch.compile (check, which
compiles, then timing), so that a time box cutting a long compile leaves every eager and ours row measured.

FLOPs. The decode's work is counted by `sdvae_fast.bench.count_gflop` (the reference's `decode` on a meta copy
under `torch.utils.flop_counter.FlopCounterMode`: convolutions, linears and SDPA attention, 2 FLOPs per
multiply-add; the same count `sdvae-fast bench` reports). TFLOP/s = decode FLOPs / median time; "% of matmul" is
that over the measured bf16 matmul rate. "x eager" / "x compile" of a row: eager's (compile's) median ms / the
row's, so > 1 means the row is faster.

Output: DIR/NAME.json (environment from `sdvae_fast.bench.env_info`, the matmul rate, prewarm, per model the
config, FLOPs, check and each contender's numbers) and DIR/NAME.md (the table), rewritten after every measurement
so a run cut short keeps what it measured; NAME defaults to DATE-GPU-flux2.

--smoke: no GPU needed, proves the script runs end to end. On the CPU under Triton's interpreter (set here when
sdvae_fast's kernels are not yet imported; exit 2 otherwise), narrow two-level versions of both models (widths
8/32, small decoder 24/48, 8 groups, one layer per block, 32 latent channels) decode latents (1, 32, 2, 2);
torch.compile uses backend "eager" (Dynamo only: Inductor's C++ build on a CPU would take minutes); no prewarm, no
matmul rate and NOTHING IS TIMED (interpreter times of GPU kernels mean nothing): the results say "not timed".
NAME defaults to smoke-flux2.

Exit status: 0 when every check passed and every contender ran; 1 when ours failed its check or a contender
failed (the error is in the results); 2 for bad arguments, without diffusers, or without CUDA and --smoke.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _path in (str(REPO_ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_consistency import (_fmt, _free, _short, _sync, compile_and_tune, exact_fp32, log,  # noqa: E402
                               matmul_rate, save_results)

#: Contenders, in the order they run for each model (compile last: its compile may be cut short by a time box).
EAGER, OURS, COMPILE = "diffusers eager", "sdvae-fast", "diffusers compile"
CONTENDERS = (EAGER, OURS, COMPILE)
MODELS = ("flux2", "flux2-small")
DTYPE = torch.bfloat16
LATENT_CHANNELS = 32
TOL_FACTOR = 2.0  # ours' rel L2 <= TOL_FACTOR x diffusers eager's + parity.TOL_FLOOR[bf16]
#: --smoke's narrow two-level models (overrides of the presets; decoder factor 2).
_SMOKE_BASE = dict(block_out_channels=(8, 32), norm_num_groups=8, layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SMOKE_OVERRIDES = {"flux2": dict(_SMOKE_BASE), "flux2-small": dict(_SMOKE_BASE, decoder_block_out_channels=(24, 48))}
SMOKE_LATENT_SIDE = 2
NOT_TIMED = "not timed (CPU smoke run: interpreter times mean nothing)"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (module docstring). Exits with status 2 (argparse) for a --size that is not a positive
    multiple of 8, --rep-ms or --warmup-ms <= 0, or --matmul-n < 256."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="presets to benchmark (default: flux2 flux2-small)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels, a multiple of 8 (1024)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="output folder for NAME.json and NAME.md (default bench/results)")
    parser.add_argument("--name", help="output file stem (default DATE-GPU-flux2; smoke-flux2 with --smoke)")
    parser.add_argument("--seed", type=int, default=0, help="weights and latents (default 0)")
    parser.add_argument("--warmup-ms", type=float, default=100.0, help="do_bench warm-up, ms (default 100)")
    parser.add_argument("--rep-ms", type=float, default=1000.0, help="do_bench timed repetitions, ms (default 1000)")
    parser.add_argument("--matmul-n", type=int, default=8192, help="side of the bf16 matmul of the rate (8192)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for diffusers' decode (default: torch's default mode)")
    parser.add_argument("--no-prewarm", action="store_true",
                        help="do not compile our kernel variants in parallel first (they compile at first use)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, TRITON_INTERPRET=1, narrow models at tiny latents; nothing timed")
    args = parser.parse_args(argv)
    if args.size < 8 or args.size % 8:
        parser.error(f"--size must be a positive multiple of 8 (the latents are size / 8), got {args.size}")
    if args.warmup_ms <= 0 or args.rep_ms <= 0 or args.matmul_n < 256:
        parser.error(f"--warmup-ms and --rep-ms must be > 0 and --matmul-n >= 256, got {args.warmup_ms}, "
                     f"{args.rep_ms} and {args.matmul_n}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def build_ours(name: str, seed: int, overrides: Optional[dict] = None):
    """`sdvae_fast.AutoencoderKLFlux2.from_preset(name, seed, **overrides)` in fp32 on the CPU, eval mode, with
    every bias shifted by 0.1 x N(0, 1) + 0.05 and every other 1-D parameter (GroupNorm gamma) scaled by
    1 + 0.2 x N(0, 1), from a CPU generator seeded with `seed + 1` (so the weights are the same on every
    machine). The latent BatchNorm `bn` is not part of decode and keeps its initial statistics."""
    from sdvae_fast import AutoencoderKLFlux2

    model = AutoencoderKLFlux2.from_preset(name, seed=seed, **(overrides or {}))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.add_(0.1 * torch.randn(param.shape, generator=gen) + 0.05)
            elif param.dim() == 1:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen))
    return model.eval()


def build_reference(ours, device: torch.device):
    """`diffusers.AutoencoderKLFlux2` of `ours`' config with its state dict (strict), fp32 on `device`, eval."""
    import diffusers

    config = {k: v for k, v in ours.config.items() if not k.startswith("_")}
    reference = diffusers.AutoencoderKLFlux2(**config)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return reference.to(device=device, dtype=torch.float32).eval()


def build_contenders(ours, reference, *, with_compile: bool, compile_backend: str = "inductor",
                     compile_mode: Optional[str] = None) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """{contender: decode function z -> image} in `CONTENDERS`' order: a bf16 copy of the reference (eager), ours
    moved to the reference's device in bf16 with backend "triton", and (with_compile) another bf16 copy whose
    `decode` is `torch.compile(..., dynamic=False, backend=compile_backend, mode=compile_mode)`d. `ours` is
    moved in place. Each function takes z (1, 32, h, w) bf16 and returns the image (1, 3, f*h, f*w) bf16 under
    `torch.no_grad()`."""
    eager = copy.deepcopy(reference).to(DTYPE)
    fast = ours.to(device=reference.device, dtype=DTYPE).eval()
    fast.set_backend("triton")

    def call(decode):
        def run(z: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return decode(z).sample
        return run

    fns = {EAGER: call(eager.decode), OURS: call(fast.decode)}
    if with_compile:
        compiled = copy.deepcopy(reference).to(DTYPE)
        fns[COMPILE] = call(torch.compile(compiled.decode, dynamic=False, backend=compile_backend,
                                          mode=compile_mode))
    return fns


def decoder_factor(model) -> int:
    """Image side / latent side of a FLUX.2 VAE: 2^(levels - 1) (8 for the presets)."""
    return 2 ** (len(model.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------------------------
# Our kernels: record, compile, tune
# ---------------------------------------------------------------------------------------------------------------


def record_variants(models: Sequence[str], latent_side: int, capability: int, shared_memory: int):
    """Every Triton variant and autotune key our bf16 decodes of (1, 32, latent_side, latent_side) latents launch
    for the presets `models` (a `sdvae_fast.warmup.Recording`), recorded on meta copies (backend "triton"; nothing
    is launched or compiled). Needs TRITON_INTERPRET unset."""
    from sdvae_fast import AutoencoderKLFlux2, warmup
    from sdvae_fast.configs import FLUX2_PRESETS

    def workload(name: str) -> Callable:
        def run(recorder) -> None:
            with torch.device("meta"):
                model = AutoencoderKLFlux2(**FLUX2_PRESETS[name])
            model = model.to(DTYPE).eval()
            model.set_backend("triton")
            z = torch.empty(1, LATENT_CHANNELS, latent_side, latent_side, device="meta", dtype=DTYPE)
            with torch.no_grad():
                model.decode(z)
        return run

    return warmup.record([workload(n) for n in models], capability=capability, shared_memory=shared_memory)


def prewarm(models: Sequence[str], latent_side: int) -> dict:
    """Compile our decodes' kernel variants in parallel (one process per core) and settle autotuning on the current
    GPU (`bench_consistency.compile_and_tune`). Returns {"variants", "tune_keys", "seconds", "compile",
    "failures"}; an error is returned in "error", not raised (the kernels then compile at first use)."""
    return compile_and_tune(lambda capability, shared: record_variants(models, latent_side, capability, shared))


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


def summarize(model_result: dict, rate_tflops: Optional[float]) -> None:
    """Fill in (in place) each contender's TFLOP/s (decode FLOPs / median ms), its fraction of the measured bf16
    matmul rate, its "x_eager" / "x_compile" (eager's / compile's median ms over its own), and the model's
    "speedups" of ours (speedup_vs_eager, speedup_vs_compile); None where a time is missing."""
    flops = model_result["flops"]["decode"]
    rows = model_result["contenders"]
    eager_ms, compile_ms = rows.get(EAGER, {}).get("ms"), rows.get(COMPILE, {}).get("ms")
    for row in rows.values():
        ms = row.get("ms")
        row["tflops"] = flops / (ms * 1e-3) / 1e12 if ms else None
        row["fraction_of_matmul"] = row["tflops"] / rate_tflops if row["tflops"] and rate_tflops else None
        row["x_eager"] = eager_ms / ms if ms and eager_ms else None
        row["x_compile"] = compile_ms / ms if ms and compile_ms else None
    ours = rows.get(OURS, {})
    model_result["speedups"] = {"speedup_vs_eager": ours.get("x_eager"), "speedup_vs_compile": ours.get("x_compile")}


def markdown(result: dict) -> str:
    """The results as markdown: header (environment, timing method, matmul rate, prewarm), one table row per model
    and contender, then per model its FLOPs and check verdict."""
    env = result["env"]
    rate = result.get("matmul") or {}
    title = f"# FLUX.2 VAE decode, bf16, batch 1 ({env.get('date')})"
    if result.get("smoke"):
        title += " -- CPU SMOKE RUN, NOT A BENCHMARK"
    lines = [title, "",
             f"- GPU: {env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, diffusers "
             f"{env.get('diffusers')}; commit {env.get('sdvae_fast_commit')}",
             f"- models: {', '.join(result['models'])}, seeded weights (seed {result['seed']}); latents "
             f"{result['latents']}; timing: {result['timing']}",
             (f"- bf16 matmul rate: {_fmt(rate.get('tflops'), '.1f')} TFLOP/s ({rate.get('n')}^3, "
              f"{_fmt(rate.get('ms'), '.3f')} ms, do_bench median)" if rate else "- bf16 matmul rate: not measured"),
             f"- prewarm of our kernels: {result.get('prewarm')}",
             f"- check: rel L2 of the bf16 image vs diffusers' fp32 decode (TF32 off); ours must be <= "
             f"{TOL_FACTOR:g} x eager's + {result['tol_floor']:g}",
             "- FLOPs: FlopCounterMode of diffusers' decode (convs, linears, SDPA); TFLOP/s = FLOPs / median time; "
             "x eager / x compile = their median ms / the row's (> 1: faster)", "",
             "| model | contender | median ms | x eager | x compile | TFLOP/s | % of matmul | rel L2 vs fp32 | "
             "peak GiB | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model_name, mr in result["models"].items():
        for name, row in mr["contenders"].items():
            fraction = row.get("fraction_of_matmul")
            lines.append(f"| {model_name} | {name} | {_fmt(row.get('ms'), '.2f')} | {_fmt(row.get('x_eager'), '.2f')} "
                         f"| {_fmt(row.get('x_compile'), '.2f')} | {_fmt(row.get('tflops'), '.1f')} | "
                         f"{_fmt(None if fraction is None else 100 * fraction, '.1f')} | "
                         f"{_fmt(row.get('rel_l2'), '.2e')} | {_fmt(row.get('peak_gib'), '.2f')} | "
                         f"{row.get('note', '')} |")
    lines.append("")
    for model_name, mr in result["models"].items():
        check = mr.get("check") or {}
        lines.append(f"- {model_name}: {mr['flops']['decode'] / 1e12:.4g} TFLOP per decode; check: "
                     f"{check.get('verdict', 'not run')}")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: Path, name: str) -> List[Path]:
    """Write DIR/NAME.json and DIR/NAME.md (this benchmark's `markdown`); returns the two paths."""
    return save_results(result, out_dir, name, markdown)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def _note(row: dict, text: str) -> None:
    row["note"] = f"{row['note']}; {text}" if row.get("note") else text


def reference_image(reference, z: torch.Tensor) -> torch.Tensor:
    """The reference's fp32 decode of z (1, 32, h, w) fp32 with TF32 off: the image (1, 3, f*h, f*w) fp32."""
    with exact_fp32(), torch.no_grad():
        return reference.decode(z).sample


def check_contenders(fns: dict, z: torch.Tensor, expected: torch.Tensor, mr: dict,
                     save: Callable[[], None]) -> None:
    """Each contender's bf16 image of z (1, 32, h, w) (cast to bf16), its first call timed with perf_counter (for
    compile: the compile), and `parity.error_stats` against `expected` (the fp32 image): rel_l2, max_abs,
    nonfinite into `mr["contenders"][name]` (in place); a failure goes to the row's "error" and "note"."""
    from sdvae_fast.parity import error_stats

    device = z.device
    z_low = z.to(DTYPE)
    for name, fn in fns.items():
        row = mr["contenders"][name]
        start = time.perf_counter()
        try:
            image = fn(z_low)
            _sync(device)
            row["first_call_s"] = time.perf_counter() - start
            if name == COMPILE:
                _note(row, f"compiled in {row['first_call_s']:.0f} s (first call)")
            stats = error_stats(image, expected)
            row.update(rel_l2=stats["rel_l2"], max_abs=stats["max_abs"], nonfinite=stats["nonfinite"])
            del image
        except Exception as error:  # noqa: BLE001 - reported; the other contenders still run
            row["error"] = f"failed: {_short(error)}"
            _note(row, row["error"])
            _free(device)
        log(f"{mr['model']:12s} {name:18s} rel L2 vs fp32 {_fmt(row.get('rel_l2'), '.3e')} "
            f"(first call {_fmt(row.get('first_call_s'), '.1f')} s) {row.get('error', '')}")
        save()


def verdict(mr: dict, tol_floor: float) -> None:
    """Ours' check (into `mr["check"]`, in place): passed when ours has no non-finite value and its rel L2 is at
    most TOL_FACTOR x diffusers eager's + tol_floor; otherwise ours' row is marked "CHECK FAILED"."""
    eager, ours = mr["contenders"][EAGER], mr["contenders"][OURS]
    if eager.get("rel_l2") is None or ours.get("rel_l2") is None:
        mr["check"] = {"passed": False, "verdict": "FAILED: ours or diffusers eager did not run"}
    else:
        bound = TOL_FACTOR * eager["rel_l2"] + tol_floor
        passed = ours["nonfinite"] == 0 and ours["rel_l2"] <= bound
        mr["check"] = {"passed": passed, "ours_rel_l2": ours["rel_l2"], "eager_rel_l2": eager["rel_l2"],
                       "ours_max_abs": ours["max_abs"], "ours_nonfinite": ours["nonfinite"], "bound": bound,
                       "verdict": f"{'passed' if passed else 'FAILED'}: ours {ours['rel_l2']:.3e} vs bound "
                                  f"{bound:.3e} ({TOL_FACTOR:g} x diffusers' bf16 error {eager['rel_l2']:.3e} + "
                                  f"{tol_floor:g}); {ours['nonfinite']} non-finite"}
    if not mr["check"]["passed"]:
        _note(ours, "CHECK FAILED")
    log(f"{mr['model']:12s} check {mr['check']['verdict']}")


def time_model(fns: dict, z: torch.Tensor, args, mr: dict, rate: Optional[float], save: Callable[[], None]) -> None:
    """Time every contender that ran its check (into `mr`, in place): peak extra GiB of one call, then
    `triton.testing.do_bench(..., return_mode="median")` ms. Not on a CPU (--smoke): rows get `NOT_TIMED`."""
    import triton.testing

    from sdvae_fast.bench import peak_extra_gib

    z_low = z.to(DTYPE)
    for name, fn in fns.items():
        row = mr["contenders"][name]
        if "error" in row:
            continue
        if z.device.type != "cuda":
            _note(row, NOT_TIMED)
            continue
        call = lambda fn=fn: fn(z_low)  # noqa: E731
        try:
            row["peak_gib"] = peak_extra_gib(call, z.device)
            row["ms"] = triton.testing.do_bench(call, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        except Exception as error:  # noqa: BLE001 - reported; the other contenders still run
            row["error"] = f"failed while timing: {_short(error)}"
            _note(row, row["error"])
            _free(z.device)
        summarize(mr, rate)
        log(f"{mr['model']:12s} {name:18s} {_fmt(row.get('ms'), '9.2f')} ms  x{_fmt(row.get('x_eager'), '.2f')} "
            f"eager  {_fmt(row.get('tflops'), '6.1f')} TFLOP/s  peak {_fmt(row.get('peak_gib'), '.2f')} GiB "
            f"{row.get('error', '')}")
        save()


def run(args, device: torch.device, smoke: bool = False) -> int:
    """The benchmark (module docstring) on `device`; `smoke`: the narrow models at tiny latents, nothing timed.
    Returns the exit status."""
    from sdvae_fast.bench import count_gflop, env_info, results_stem
    from sdvae_fast.parity import TOL_FLOOR

    if device.type == "cuda":
        torch.cuda.set_device(device)
    name = args.name or ("smoke-flux2" if smoke else f"{results_stem()}-flux2")
    latent_side = SMOKE_LATENT_SIDE if smoke else args.size // 8
    shape = (1, LATENT_CHANNELS, latent_side, latent_side)
    compile_backend = "eager" if smoke else "inductor"
    timing = (NOT_TIMED if smoke else f"triton.testing.do_bench median (warmup {args.warmup_ms:g} ms, rep "
              f"{args.rep_ms:g} ms) after the check's first call; peak = max_memory_allocated during one call")
    result = {"benchmark": "FLUX.2 VAE decode (issue 14)", "smoke": smoke, "env": env_info(), "dtype": "bf16",
              "batch": 1, "latents": list(shape), "seed": args.seed, "timing": timing,
              "tol_factor": TOL_FACTOR, "tol_floor": TOL_FLOOR[DTYPE],
              "compile": None if args.no_compile else {"backend": compile_backend, "mode": args.compile_mode,
                                                       "dynamic": False, "what": "diffusers' decode"},
              "models": {}}

    def save() -> None:
        write_results(result, args.out, name)

    if smoke:
        result["prewarm"] = "skipped (CPU smoke run)"
    else:
        result["matmul"] = matmul_rate(args.matmul_n, device)
        log(f"bf16 matmul {args.matmul_n}^3: {result['matmul']['tflops']:.1f} TFLOP/s")
        result["prewarm"] = "skipped (--no-prewarm)" if args.no_prewarm else prewarm(args.models, latent_side)
        log(f"prewarm: {result['prewarm']}")
    save()
    rate = (result.get("matmul") or {}).get("tflops")
    # Phase 1, per model: eager and ours, checked then timed. Phase 2, per model: torch.compile (its compile may be
    # long; a time box that cuts it leaves every eager and ours row measured).
    pending = {}
    for model_name in args.models:
        log(f"{model_name}: building the fp32 reference and the bf16 contenders")
        ours = build_ours(model_name, args.seed, SMOKE_OVERRIDES[model_name] if smoke else None)
        reference = build_reference(ours, device)
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in reference.config.items()
                  if not k.startswith("_")}
        factor = decoder_factor(reference)
        mr = {"model": model_name, "config": config, "image": [1, 3, latent_side * factor, latent_side * factor],
              "decoder_parameters": sum(p.numel() for p in reference.decoder.parameters())
              + sum(p.numel() for p in reference.post_quant_conv.parameters()),
              "attention_processor": type(reference.decoder.mid_block.attentions[0].processor).__name__,
              "flops": {"decode": round(count_gflop(reference, "decode", shape) * 1e9)},
              "contenders": {}}
        result["models"][model_name] = mr
        fns = build_contenders(ours, reference, with_compile=not args.no_compile, compile_backend=compile_backend,
                               compile_mode=args.compile_mode)
        mr["contenders"] = {n: {} for n in fns}
        gen = torch.Generator(device=device).manual_seed(args.seed)
        z = torch.randn(shape, device=device, generator=gen)
        expected = reference_image(reference, z)
        first = {n: fns[n] for n in (EAGER, OURS)}
        check_contenders(first, z, expected, mr, save)
        verdict(mr, TOL_FLOOR[DTYPE])
        save()
        time_model(first, z, args, mr, rate, save)
        summarize(mr, rate)
        save()
        if COMPILE in fns:
            pending[model_name] = (fns[COMPILE], z, expected)
        del fns, first, ours, reference
        _free(device)
    for model_name, (fn, z, expected) in pending.items():
        mr = result["models"][model_name]
        check_contenders({COMPILE: fn}, z, expected, mr, save)
        time_model({COMPILE: fn}, z, args, mr, rate, save)
        summarize(mr, rate)
        save()
    del pending
    _free(device)
    paths = write_results(result, args.out, name)
    print(paths[1].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = [f"{m}: {c}: {row['error']}" for m, mr in result["models"].items()
              for c, row in mr["contenders"].items() if "error" in row]
    failed += [f"{m}: check {mr['check']['verdict']}" for m, mr in result["models"].items()
               if not mr["check"]["passed"]]
    for line in failed:
        print(f"bench_flux2.py: {line}", file=sys.stderr)
    return 1 if failed else 0


def use_interpreter(script: str) -> bool:
    """Switch Triton's interpreter on for a --smoke run: True when TRITON_INTERPRET is "1" or sdvae_fast's kernels
    are not imported yet (then it is set here); False (with a message on stderr) when they were already defined
    for the GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if any(m.startswith("sdvae_fast.kernels") for m in sys.modules):
        print(f"{script}: --smoke needs TRITON_INTERPRET=1 before sdvae_fast's kernels are imported; run it as "
              f"`TRITON_INTERPRET=1 python bench/{script} --smoke`", file=sys.stderr)
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the command line and run (module docstring). Returns the exit status: 2 without diffusers, or without
    CUDA unless --smoke, with a message on stderr."""
    args = parse_args(argv)
    if args.smoke and not use_interpreter("bench_flux2.py"):
        return 2
    try:
        import diffusers  # noqa: F401
        from diffusers.utils import logging as diffusers_logging
    except ImportError as error:
        print(f"bench_flux2.py: diffusers is needed (the contenders and the reference): {error}", file=sys.stderr)
        return 2
    diffusers_logging.set_verbosity_error()  # the dtype-cast notice of every .to(bf16)
    if args.smoke:
        return run(args, torch.device("cpu"), smoke=True)
    if not torch.cuda.is_available():
        print("bench_flux2.py: needs a CUDA device (none is available); use --smoke for the CPU run",
              file=sys.stderr)
        return 2
    return run(args, torch.device("cuda", 0))


if __name__ == "__main__":
    sys.exit(main())
