"""Issue 13's benchmark: the consistency decoder's 2-step decode, ours against diffusers eager and torch.compile.

Run on a CUDA GPU (diffusers importable):

    python bench/bench_consistency.py [--sizes 512 1024] [--out bench/results] [--name STEM] [--budget-s 2]
    python bench/bench_consistency.py --dry-run     # no GPU: narrow model on the CPU, FLOP counts, the plan

What it does (batch 1, bf16, `decode(z, generator=...)` with diffusers' 2 steps at timesteps 1008 and 512):
1. builds `diffusers.ConsistencyDecoderVAE()` with its default constructor arguments, which are the config of
   openai/consistency-decoder (decoder UNet widths 320/640/1024/1024, 3 layers per block, 32 groups, 7 input and 6
   output channels, no attention; 621 M UNet parameters), in fp32 on cuda:0 with weights seeded by --seed (the real
   weights cannot be downloaded here), GroupNorm affine terms and the ResNets' time projections perturbed (as
   tests/test_consistency.py does) so that the fused norm and scale/shift arithmetic is exercised. That fp32 model
   is the reference. The three contenders, in the same process, all bf16 with the same state dict:
     - "diffusers eager": a bf16 copy of the reference;
     - "diffusers compile": another bf16 copy whose `decoder_unet` is `torch.compile(..., dynamic=False)`d (default
       mode; compiled once per size on its first call, the compile time is reported);
     - "sdvae-fast": `sdvae_fast.ConsistencyDecoderVAE` with backend "triton" (the UNet on the kernels).
2. prewarms our kernels: records every Triton variant our decode launches at the sizes (`sdvae_fast.warmup.record`
   on a meta copy, whose scheduler runs on the CPU with its arithmetic stubbed, since it launches no kernel),
   compiles them in parallel (`warmup.compile_launches`) and settles autotuning (`warmup.tune`); --no-prewarm
   leaves that to the first call (a sequential compile of about 120 variants: minutes);
3. measures the bf16 matrix rate: `triton.testing.do_bench` (median) of a --matmul-n cubed bf16 `torch.matmul`;
4. per size s: latents z (1, 4, s/8, s/8) from a seeded generator; correctness before timing: the reference's
   decode of z in fp32 (TF32 off for convolutions and matmuls) against each contender's bf16 decode of the same z
   with a generator seeded the same way (so the same noise draws): relative L2 = ||a - b|| / ||b||, b the fp32
   image. Ours must be within 2 x diffusers' own bf16 error + 1e-2 (docs: the project's precision standard);
5. times each contender: one call for its peak memory (`sdvae_fast.bench.peak_extra_gib`), then
   `sdvae_fast.bench.median_ms` (CUDA events around each call, 2 warm-up calls, at least 5 timed calls and
   --budget-s seconds), the generator re-seeded inside every call, the same latents.

FLOP floor. The decode's useful work is counted from the module structure on a meta copy (`decode_flops`): one
UNet call with forward hooks on every Conv2d (2 x N x C_out x H_out x W_out x C_in/groups x kh x kw), Linear
(2 x rows x in x out) and Attention (QK^T and PV: 4 x N x L_q x L_kv x inner dim), times 2 steps; conv_in at its 7
channels and conv_out at the 3 of its 6 output channels that decode keeps (what ours computes; diffusers computes
all 6). The same hooks' count with conv_out at 6 channels must equal `torch.utils.flop_counter.FlopCounterMode`'s
count of the same call (checked, ValueError otherwise). Each contender's TFLOP/s is useful FLOPs / median time,
and its fraction is that over the measured bf16 matmul rate. Issue 13's target: ours at least 60 % of the measured
rate over the whole decode, and faster than torch.compile; reported per size, not enforced by the exit status.

Output: DIR/NAME.json (everything: environment from `sdvae_fast.bench.env_info` with GPU name, torch/triton/diffusers
versions, date and git commit; FLOPs; the matmul rate; per size the check and each contender's numbers; speedups
of ours over eager and compile as their median ms / ours) and DIR/NAME.md (the table), rewritten after every
measurement so a run cut short keeps what it measured; NAME defaults to DATE-GPU-consistency.

Exit status: 0 when every check passed and every contender ran; 1 when ours failed its check or a contender
failed (the error is in the results; the run goes on); 2 for bad arguments, or without CUDA and --dry-run (a
message says so). --dry-run builds the narrow model of tests/test_consistency.py on the CPU (diffusers' class and
ours with the same state dict), counts its FLOPs and cross-checks them, counts the real config's FLOPs at the sizes
on the meta device, records our kernel variants for the narrow model (sm_90, nothing compiled; skipped under
TRITON_INTERPRET=1) and prints the plan; nothing is timed and nothing is written.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

#: Contenders, in the order they run at each size (compile last: its compile may be cut short by a time box).
EAGER, OURS, COMPILE = "diffusers eager", "sdvae-fast", "diffusers compile"
CONTENDERS = (EAGER, OURS, COMPILE)
#: The narrow config of --dry-run (tests/test_consistency.py's): 4 UNet blocks of each kind, widths 8/16/24/24.
NARROW = dict(encoder_block_out_channels=(8, 8, 16, 16), encoder_layers_per_block=1, encoder_norm_num_groups=8,
              decoder_block_out_channels=(8, 16, 24, 24), decoder_layers_per_block=1, decoder_norm_num_groups=8)
DTYPE = torch.bfloat16
STEPS = 2  # diffusers' ConsistencyDecoderVAE.decode default (timesteps 1008, 512)
KEPT_CHANNELS = 3  # decode keeps model_output[:, :3]
TARGET_FRACTION = 0.60  # issue 13: at least 60 % of the measured bf16 matrix rate over the whole decode
ATOL = 1e-2  # the bound's additive term: rel L2 <= 2 x diffusers' own bf16 error + ATOL


def log(message: str) -> None:
    """A progress line on stdout, flushed (the GPU check's section log keeps it even when the run is cut)."""
    print(message, flush=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (module docstring). Exits with status 2 (argparse) for a size that is not a positive
    multiple of 8, --budget-s <= 0 or --matmul-n < 256."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024],
                        help="image sides in pixels, multiples of 8 (default 512 1024)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="output folder for NAME.json and NAME.md (default bench/results)")
    parser.add_argument("--name", help="output file stem (default DATE-GPU-consistency)")
    parser.add_argument("--seed", type=int, default=0, help="weights, latents and the decode's noise (default 0)")
    parser.add_argument("--budget-s", type=float, default=2.0,
                        help="timed seconds per measurement, at least 5 calls (default 2)")
    parser.add_argument("--matmul-n", type=int, default=8192, help="side of the bf16 matmul of the rate (8192)")
    parser.add_argument("--no-prewarm", action="store_true",
                        help="do not compile our kernel variants in parallel first (they compile at first use)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: narrow model on the CPU, FLOP counts, the plan; nothing timed or written")
    args = parser.parse_args(argv)
    bad = [s for s in args.sizes if s < 8 or s % 8]
    if bad:
        parser.error(f"--sizes must be positive multiples of 8 (the latents are size / 8), got {bad}")
    if args.budget_s <= 0 or args.matmul_n < 256:
        parser.error(f"--budget-s must be > 0 and --matmul-n >= 256, got {args.budget_s} and {args.matmul_n}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def build_reference(config: dict, device: torch.device, seed: int):
    """`diffusers.ConsistencyDecoderVAE(**config)` in fp32 on `device`, eval mode, weights seeded by `seed`:
    default initialisation, then every GroupNorm's weight and bias plus 0.3 x N(0, 1) and every ResNet's
    `time_emb_proj` weight times 3 with a bias of 0.3 x N(0, 1) (a CPU generator, so the same on every device)."""
    import diffusers

    torch.manual_seed(seed)
    with torch.device(device):
        vae = diffusers.ConsistencyDecoderVAE(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in vae.named_modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=gen).to(device))
                module.bias.add_(0.3 * torch.randn(module.bias.shape, generator=gen).to(device))
            if name.endswith("time_emb_proj"):
                module.weight.mul_(3.0)
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen).to(device))
    return vae


def build_ours(config: dict, reference, dtype: torch.dtype):
    """`sdvae_fast.ConsistencyDecoderVAE(**config)` on the reference's device with its state dict (strict), cast
    to `dtype`, eval mode, backend "triton"."""
    from sdvae_fast import ConsistencyDecoderVAE

    with torch.device(reference.device):
        ours = ConsistencyDecoderVAE(**config)
    ours.load_state_dict(reference.state_dict())
    ours = ours.to(dtype).eval()
    ours.set_backend("triton")
    return ours


def build_contenders(config: dict, reference, dtype: torch.dtype, with_compile: bool) -> Dict[str, object]:
    """{contender name: model} (`CONTENDERS`' order): bf16 copies of the reference for eager and compile (the
    latter's `decoder_unet` wrapped by `torch.compile(dynamic=False)`, compiled at its first call), and ours."""
    models = {EAGER: copy.deepcopy(reference).to(dtype), OURS: build_ours(config, reference, dtype)}
    if with_compile:
        compiled = copy.deepcopy(reference).to(dtype)
        compiled.decoder_unet = torch.compile(compiled.decoder_unet, dynamic=False)
        models[COMPILE] = compiled
    return models


def latent_factor(vae) -> int:
    """Image side / latent side of a ConsistencyDecoderVAE (its decode upsamples by 2^(levels - 1), 8 for the real
    config)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------


def _attention_flops(module, args: tuple, kwargs: dict) -> int:
    """FLOPs of an Attention call's two batched matmuls (QK^T and PV): 4 x N x L_q x L_kv x inner dim, the inner
    dim being `to_q`'s output features; L from hidden_states (N, C, H, W) -> H x W or (N, L, C) -> L, and L_kv
    from encoder_hidden_states when given (else L_q)."""
    def length(t: torch.Tensor) -> int:
        return t.shape[2] * t.shape[3] if t.dim() == 4 else t.shape[1]

    hidden = args[0] if args else kwargs["hidden_states"]
    context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    l_q = length(hidden)
    l_kv = length(context) if context is not None else l_q
    return 4 * hidden.shape[0] * l_q * l_kv * module.to_q.out_features


def unet_call_flops(unet: torch.nn.Module, size: int, batch: int = 1, kept_channels: int = KEPT_CHANNELS) -> dict:
    """FLOPs of one call of a meta-device UNet2DModel on (batch, in_channels, size, size) at timestep 1008.

    Args:
        unet: a UNet2DModel whose parameters are on the meta device (nothing is computed).
        size: the input's side in pixels. batch: samples per call.
        kept_channels: conv_out's output channels counted as useful (decode keeps 3 of 6).
    Returns:
        {"useful": conv + linear + attention FLOPs with conv_out at `kept_channels`, "full": the same with conv_out
        at all its channels, "conv", "linear", "attention": the parts of "useful", "counter": FlopCounterMode's
        count of the same call}, ints (2 FLOPs per multiply-add).
    Raises:
        ValueError: "full" differs from FlopCounterMode's count (a module kind the hooks miss).
    """
    from diffusers.models.attention_processor import Attention
    from torch.utils.flop_counter import FlopCounterMode

    parts = {"conv": 0, "linear": 0, "attention": 0, "conv_out_dropped": 0}

    def conv_hook(module, args, output):
        kh, kw = module.kernel_size
        flops = 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
        parts["conv"] += flops
        if module is unet.conv_out:
            parts["conv_out_dropped"] += flops * (module.out_channels - kept_channels) // module.out_channels

    def linear_hook(module, args, output):
        parts["linear"] += 2 * (output.numel() // module.out_features) * module.in_features * module.out_features

    def attention_hook(module, args, kwargs, output):
        parts["attention"] += _attention_flops(module, args, kwargs)

    handles = []
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, Attention):
            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
    try:
        sample = torch.empty(batch, unet.config.in_channels, size, size, device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(sample, torch.tensor(1008, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    full = parts["conv"] + parts["linear"] + parts["attention"]
    if full != counter.get_total_flops():
        raise ValueError(f"FLOP count from the module structure ({full}) differs from FlopCounterMode's "
                         f"({counter.get_total_flops()}) at size {size}: a module kind is not counted")
    useful_conv = parts["conv"] - parts["conv_out_dropped"]
    return {"useful": useful_conv + parts["linear"] + parts["attention"], "full": full, "conv": useful_conv,
            "linear": parts["linear"], "attention": parts["attention"], "counter": counter.get_total_flops()}


def meta_reference(config: dict):
    """`diffusers.ConsistencyDecoderVAE(**config)` on the meta device (no memory, no initialisation cost beyond
    building the modules)."""
    import diffusers

    with torch.device("meta"):
        return diffusers.ConsistencyDecoderVAE(**config).eval()


def decode_flops(config: dict, sizes: Sequence[int], batch: int = 1, steps: int = STEPS) -> Dict[int, dict]:
    """{size: FLOPs of one decode of a size x size image}: `unet_call_flops` of the config's decoder UNet at full
    resolution times `steps` (each step is one UNet call of the same shapes), keys as there plus "per_step"
    (the useful FLOPs of one call). Counted on the meta device."""
    unet = meta_reference(config).decoder_unet
    result = {}
    for size in sizes:
        call = unet_call_flops(unet, size, batch)
        result[size] = {key: value * steps for key, value in call.items()}
        result[size]["per_step"] = call["useful"]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Our kernels: record, compile, tune
# ---------------------------------------------------------------------------------------------------------------


def record_variants(config: dict, sizes: Sequence[int], capability: int, shared_memory: int, batch: int = 1):
    """Every Triton variant and autotune key our bf16 decode launches at `sizes` (a `sdvae_fast.warmup.Recording`).

    Runs `sdvae_fast.ConsistencyDecoderVAE.decode` (backend "triton") on meta latents inside `warmup.record`. The
    scheduler runs in PyTorch and launches no kernel; on the meta device it cannot index its tables, so the meta
    copy gets a fresh CPU scheduler whose `set_timesteps` keeps the timesteps on the CPU and whose `step` returns
    an empty tensor of the sample's shape. Needs TRITON_INTERPRET unset (RuntimeError otherwise).
    """
    from sdvae_fast import ConsistencyDecoderVAE, warmup

    with torch.device("meta"):
        model = ConsistencyDecoderVAE(**config)
    model = model.to(DTYPE).eval()
    model.set_backend("triton")
    scheduler = type(model.decoder_scheduler)()
    cls = type(scheduler)
    scheduler.set_timesteps = lambda num_inference_steps, device=None: cls.set_timesteps(
        scheduler, num_inference_steps, device="cpu")
    scheduler.step = lambda model_output, timestep, sample, generator=None, return_dict=True: types.SimpleNamespace(
        prev_sample=torch.empty_like(sample))
    model.decoder_scheduler = scheduler
    factor = latent_factor(model)

    def workload(size: int) -> Callable:
        def run(recorder) -> None:
            z = torch.empty(batch, model.config.latent_channels, size // factor, size // factor, device="meta",
                            dtype=DTYPE)
            with torch.no_grad():
                model.decode(z)
        return run

    return warmup.record([workload(s) for s in sizes], capability=capability, shared_memory=shared_memory)


def prewarm(config: dict, sizes: Sequence[int]) -> dict:
    """Compile our decode's kernel variants at `sizes` in parallel (one process per core) and settle autotuning on
    the current GPU (`record_variants`, `warmup.compile_launches`, `warmup.tune`). Returns {"variants",
    "tune_keys", "seconds", "compile": the summary line, "failures"}; an error is reported in "error" and not
    raised (the kernels then compile at first use)."""
    return compile_and_tune(lambda capability, shared: record_variants(config, sizes, capability, shared))


def compile_and_tune(record: Callable[[int, int], object]) -> dict:
    """Compile the kernel variants that `record(capability, shared_memory)` finds (a `warmup` recording with
    `.variants` and `.tunes`) in parallel, one process per core, and settle their autotuning on the current GPU.
    Returns {"variants", "tune_keys", "seconds", "compile": the summary line, "failures"}; an error is returned in
    "error", not raised (the kernels then compile at first use). Shared by the GPU benchmarks of bench/."""
    from sdvae_fast import warmup

    start = time.perf_counter()
    try:
        capability, shared = warmup.current_gpu_target()
        found = record(capability, shared)
        variants, tunes = list(found.variants.values()), list(found.tunes.values())
        log(f"prewarm: {len(variants)} kernel variants, {len(tunes)} autotune keys recorded; compiling")
        summary = warmup.compile_launches(variants, capability=capability, progress=False)
        log(f"prewarm: compiled {summary.format()}; tuning")
        warmup.tune(tunes, progress=False)
        return {"variants": len(variants), "tune_keys": len(tunes), "seconds": time.perf_counter() - start,
                "compile": summary.format(), "failures": len(summary.failures)}
    except Exception as error:  # noqa: BLE001 - the benchmark still runs, compiling at first use
        return {"error": _short(error), "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


def matmul_rate(n: int, device: torch.device) -> dict:
    """The bf16 matrix rate: `triton.testing.do_bench` (median, 100 ms warm-up, 500 ms of repetitions) of an
    (n, n) x (n, n) bf16 `torch.matmul` into a preallocated output. Returns {"n", "ms", "tflops"} (2 n^3 FLOPs)."""
    import triton.testing

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=DTYPE, generator=gen)
    b = torch.randn(n, n, device=device, dtype=DTYPE, generator=gen)
    c = torch.empty(n, n, device=device, dtype=DTYPE)
    ms = triton.testing.do_bench(lambda: torch.matmul(a, b, out=c), warmup=100, rep=500, return_mode="median")
    return {"n": n, "ms": ms, "tflops": 2.0 * n ** 3 / (ms * 1e-3) / 1e12}


@contextlib.contextmanager
def exact_fp32():
    """Within the block, fp32 convolutions and matmuls without TF32 (the reference's arithmetic); restored on exit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (b the reference, same shape); inf when ||b|| is 0."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    denominator = b64.norm().item()
    return (a64 - b64).norm().item() / denominator if denominator else float("inf")


def decoder(model, z: torch.Tensor, seed: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """A call `model.decode(z, generator=...).sample` with a generator on `device` re-seeded with `seed` inside
    every call (so every call and every contender draws the same noise)."""
    gen = torch.Generator(device=device)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.decode(z, generator=gen.manual_seed(seed)).sample

    return run


def _sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Return cached blocks to the driver after a failure or a size (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:240]}"


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def summarize(size_result: dict, rate_tflops: float) -> None:
    """Fill in, for one size's result, each contender's TFLOP/s and fraction of the measured rate, ours' speedups
    (eager ms / ours ms, compile ms / ours ms) and the target verdict (in place)."""
    useful = size_result["flops"]["useful"]
    rows = size_result["contenders"]
    for row in rows.values():
        ms = row.get("ms")
        row["tflops"] = useful / (ms * 1e-3) / 1e12 if ms else None
        row["fraction_of_matmul"] = row["tflops"] / rate_tflops if row["tflops"] and rate_tflops else None
    ours = rows.get(OURS, {}).get("ms")
    speedups = {}
    for name, key in ((EAGER, "speedup_vs_eager"), (COMPILE, "speedup_vs_compile")):
        other = rows.get(name, {}).get("ms")
        speedups[key] = other / ours if ours and other else None
    size_result["speedups"] = speedups
    fraction = rows.get(OURS, {}).get("fraction_of_matmul")
    ahead = speedups["speedup_vs_compile"] > 1.0 if speedups["speedup_vs_compile"] else None
    met = bool(fraction is not None and fraction >= TARGET_FRACTION and ahead)
    if fraction is None:
        verdict = "not measured (ours has no time)"
    else:
        verdict = (f"{'met' if met else 'missed'}: ours at {100 * fraction:.1f} % of the matmul rate "
                   f"({'>=' if fraction >= TARGET_FRACTION else '<'} {100 * TARGET_FRACTION:.0f} %), ")
        verdict += ("torch.compile not measured" if ahead is None else
                    f"{speedups['speedup_vs_compile']:.2f}x torch.compile's speed")
    size_result["target"] = {"fraction_min": TARGET_FRACTION, "fraction": fraction, "ahead_of_compile": ahead,
                             "met": met, "verdict": verdict}


def markdown(result: dict) -> str:
    """The results as markdown: header (environment, matmul rate, prewarm), one table row per size and contender,
    then per size the check, the speedups and the target verdict."""
    env = result["env"]
    rate = result.get("matmul") or {}
    lines = [f"# Consistency decoder, 2-step decode, bf16, batch 1 ({env.get('date')})", "",
             f"- GPU: {env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, diffusers "
             f"{env.get('diffusers')}; commit {env.get('sdvae_fast_commit')}",
             f"- model: diffusers.ConsistencyDecoderVAE, config {result.get('config')}, seeded weights (seed "
             f"{result['seed']}); timing: {result['timing']}",
             f"- bf16 matmul rate: {_fmt(rate.get('tflops'), '.1f')} TFLOP/s ({rate.get('n')}^3, "
             f"{_fmt(rate.get('ms'), '.3f')} ms, do_bench median)",
             f"- prewarm of our kernels: {result.get('prewarm')}",
             f"- FLOPs: useful work (conv_in at 7 channels, conv_out at 3 of 6, every conv, linear and attention of "
             f"the UNet, x {STEPS} steps); TFLOP/s = useful / median time; % = of the measured matmul rate", "",
             "| size | contender | median ms | TFLOP/s | % of matmul | ours is x faster | rel L2 vs fp32 | "
             "peak GiB | note |", "|---|---|---|---|---|---|---|---|---|"]
    for size, sr in result["sizes"].items():
        for name, row in sr["contenders"].items():
            speed = "-"
            if name != OURS:
                key = "speedup_vs_eager" if name == EAGER else "speedup_vs_compile"
                speed = _fmt((sr.get("speedups") or {}).get(key), ".2f")
            fraction = row.get("fraction_of_matmul")
            lines.append(f"| {size} | {name} | {_fmt(row.get('ms'), '.2f')} | {_fmt(row.get('tflops'), '.1f')} | "
                         f"{_fmt(None if fraction is None else 100 * fraction, '.1f')} | {speed} | "
                         f"{_fmt(row.get('rel_l2'), '.2e')} | {_fmt(row.get('peak_gib'), '.2f')} | "
                         f"{row.get('note', '')} |")
    lines.append("")
    for size, sr in result["sizes"].items():
        check, target = sr.get("check") or {}, sr.get("target") or {}
        lines.append(f"- {size}^2: {sr['flops']['useful'] / 1e12:.1f} TFLOP per decode; check: "
                     f"{check.get('verdict', 'not run')}; target (>= {100 * TARGET_FRACTION:.0f} % of the matmul "
                     f"rate and ahead of torch.compile): {target.get('verdict', 'not measured')}")
    return "\n".join(lines) + "\n"


def save_results(result: dict, out_dir: Path, name: str, render: Callable[[dict], str]) -> List[Path]:
    """Write DIR/NAME.json (the result, values json can't write as str) and DIR/NAME.md (`render(result)`);
    returns the two paths. Shared by the GPU benchmarks of bench/ (consistency, flux2, quantize)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(render(result), encoding="utf-8")
    return paths


def write_results(result: dict, out_dir: Path, name: str) -> List[Path]:
    """Write DIR/NAME.json and DIR/NAME.md (this benchmark's `markdown`); returns the two paths."""
    return save_results(result, out_dir, name, markdown)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def check_size(models: dict, reference, z: torch.Tensor, args, device: torch.device, sr: dict,
               save: Callable[[], None]) -> None:
    """Correctness at one size (into `sr`, in place): the fp32 reference image, then each contender's bf16 image
    of the same latents and noise, its rel L2, and ours' verdict against 2 x eager's error + ATOL."""
    with exact_fp32():
        expected = decoder(reference, z, args.seed, device)()
    z_low = z.to(DTYPE)
    for name, model in models.items():
        row = sr["contenders"][name]
        start = time.perf_counter()
        try:
            image = decoder(model, z_low, args.seed, device)()
            _sync(device)
            row["first_call_s"] = time.perf_counter() - start
            if name == COMPILE:
                row["note"] = f"compiled in {row['first_call_s']:.0f} s (first call)"
            row["rel_l2"] = rel_l2(image, expected)
            del image
        except Exception as error:  # noqa: BLE001 - reported; the other contenders still run
            row["error"] = row["note"] = f"failed: {_short(error)}"
            _free(device)
        log(f"{sr['size']:5d} {name:18s} rel L2 vs fp32 {_fmt(row.get('rel_l2'), '.3e')} "
            f"(first call {_fmt(row.get('first_call_s'), '.1f')} s) {row.get('error', '')}")
        save()
    eager, ours = sr["contenders"][EAGER].get("rel_l2"), sr["contenders"][OURS].get("rel_l2")
    if eager is None or ours is None:
        sr["check"] = {"passed": False, "verdict": "FAILED: ours or diffusers eager did not run"}
    else:
        bound = 2 * eager + ATOL
        passed = ours <= bound
        sr["check"] = {"passed": passed, "ours_rel_l2": ours, "eager_rel_l2": eager, "bound": bound,
                       "verdict": f"{'passed' if passed else 'FAILED'}: ours {ours:.3e} vs bound {bound:.3e} "
                                  f"(2 x diffusers' bf16 error {eager:.3e} + {ATOL:g})"}
    log(f"{sr['size']:5d} check {sr['check']['verdict']}")
    save()


def time_size(models: dict, z: torch.Tensor, args, device: torch.device, sr: dict, rate: float,
              save: Callable[[], None]) -> None:
    """Time every contender that ran its check at one size (into `sr`, in place): peak memory of one call, then
    the median of CUDA-event-timed calls (`sdvae_fast.bench.median_ms`)."""
    from sdvae_fast.bench import median_ms, peak_extra_gib

    z_low = z.to(DTYPE)
    for name, model in models.items():
        row = sr["contenders"][name]
        if "error" in row:
            continue
        fn = decoder(model, z_low, args.seed, device)
        try:
            row["peak_gib"] = peak_extra_gib(fn, device)
            row["ms"] = median_ms(fn, device=device, budget_s=args.budget_s, warmup=2, min_reps=5)
        except Exception as error:  # noqa: BLE001 - reported; the other contenders still run
            row["error"] = row["note"] = f"failed while timing: {_short(error)}"
            _free(device)
        summarize(sr, rate)
        log(f"{sr['size']:5d} {name:18s} {_fmt(row.get('ms'), '9.2f')} ms  {_fmt(row.get('tflops'), '6.1f')} TFLOP/s "
            f"({_fmt(None if row.get('fraction_of_matmul') is None else 100 * row['fraction_of_matmul'], '.1f')} % "
            f"of matmul)  peak {_fmt(row.get('peak_gib'), '.2f')} GiB {row.get('error', '')}")
        save()


def run(args, device: torch.device = torch.device("cuda", 0), config: Optional[dict] = None) -> int:
    """The GPU benchmark (module docstring) on `device` with `config` (constructor arguments; None: diffusers'
    defaults, i.e. openai/consistency-decoder). Returns the exit status."""
    from sdvae_fast.bench import env_info, results_stem

    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = {} if config is None else config
    name = args.name or f"{results_stem()}-consistency"
    timer = "CUDA events" if device.type == "cuda" else "perf_counter"
    result = {"benchmark": "consistency decoder decode (issue 13)", "env": env_info(),
              "config": config or "diffusers' defaults (openai/consistency-decoder)", "dtype": "bf16", "batch": 1,
              "steps": STEPS, "seed": args.seed,
              "timing": f"{timer}, median of >= 5 calls after 2 warm-up calls, {args.budget_s:g} s budget each; "
                        f"generator re-seeded per call", "target_fraction": TARGET_FRACTION, "sizes": {}}

    def save() -> None:
        write_results(result, args.out, name)

    log(f"counting FLOPs at {args.sizes}")
    flops = decode_flops(config, args.sizes)
    log("building the fp32 reference and the bf16 contenders")
    reference = build_reference(config, device, args.seed)
    models = build_contenders(config, reference, DTYPE, with_compile=not args.no_compile)
    result["parameters"] = sum(p.numel() for p in reference.decoder_unet.parameters())
    result["matmul"] = matmul_rate(args.matmul_n, device)
    log(f"bf16 matmul {args.matmul_n}^3: {result['matmul']['tflops']:.1f} TFLOP/s")
    result["prewarm"] = "skipped (--no-prewarm)" if args.no_prewarm else prewarm(config, args.sizes)
    log(f"prewarm: {result['prewarm']}")
    save()
    factor = latent_factor(reference)
    for size in args.sizes:
        sr = {"size": size, "flops": flops[size], "contenders": {n: {} for n in models}}
        result["sizes"][size] = sr
        gen = torch.Generator(device=device).manual_seed(args.seed + size)
        z = torch.randn(1, reference.config.latent_channels, size // factor, size // factor, device=device,
                        generator=gen)
        check_size(models, reference, z, args, device, sr, save)
        time_size(models, z, args, device, sr, result["matmul"]["tflops"], save)
        summarize(sr, result["matmul"]["tflops"])
        save()
        _free(device)
    paths = write_results(result, args.out, name)
    print(paths[1].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = [f"{size}: {row['error']}" for size, sr in result["sizes"].items() for row in sr["contenders"].values()
              if "error" in row]
    failed += [f"{size}: check {sr['check']['verdict']}" for size, sr in result["sizes"].items()
               if not sr["check"]["passed"]]
    for line in failed:
        print(f"bench_consistency.py: {line}", file=sys.stderr)
    return 1 if failed else 0


def dry_run(args) -> int:
    """The plan without a GPU (module docstring, --dry-run). Returns 0, or 1 when the narrow model's weights do not
    load into ours."""
    from sdvae_fast.bench import FLOOR_TFLOPS
    from sdvae_fast.kernels import _common

    start = time.perf_counter()
    reference = build_reference(NARROW, torch.device("cpu"), args.seed)
    ours = build_ours(NARROW, reference, DTYPE)
    loaded = all(torch.equal(a.to(DTYPE), b) for a, b in zip(reference.state_dict().values(),
                                                             ours.state_dict().values()))
    narrow = decode_flops(NARROW, args.sizes)
    real = decode_flops({}, args.sizes)
    target_rate = TARGET_FRACTION * FLOOR_TFLOPS
    log(f"dry run (no GPU, nothing timed): narrow model {sum(p.numel() for p in reference.parameters())} "
        f"parameters, built twice (diffusers' class and ours, backend {ours.backend!r}); our copy holds the "
        f"reference's weights: {loaded}")
    for size in args.sizes:
        n, r = narrow[size], real[size]
        log(f"{size:5d}^2: narrow {n['useful'] / 1e9:.3f} GFLOP useful ({n['full'] / 1e9:.3f} as diffusers "
            f"computes, = FlopCounterMode); real config {r['useful'] / 1e12:.2f} TFLOP useful per decode "
            f"({r['per_step'] / 1e12:.2f} per step; conv {r['conv'] / 1e12:.2f}, linear {r['linear'] / 1e9:.2f} "
            f"GFLOP, attention {r['attention']}), as diffusers computes {r['full'] / 1e12:.2f}; at "
            f"{100 * TARGET_FRACTION:.0f} % of {FLOOR_TFLOPS:.0f} TFLOP/s that is "
            f"{r['useful'] / target_rate / 1e9:.1f} ms")
    if _common.INTERPRET:
        log("kernel variants: not recorded (TRITON_INTERPRET=1: the interpreter compiles nothing)")
    else:
        from sdvae_fast import warmup

        capability, shared = warmup.parse_target("sm_90")
        found = record_variants(NARROW, args.sizes, capability, shared)
        log(f"kernel variants of our narrow decode at {args.sizes} for sm_90: {len(found.variants)} "
            f"({len(found.tunes)} autotune keys), recorded, not compiled")
    name = args.name or "DATE-GPU-consistency"
    contenders = [c for c in CONTENDERS if not (args.no_compile and c == COMPILE)]
    log(f"plan on a GPU: the real config (diffusers' defaults) fp32 reference + bf16 {', '.join(contenders)}; "
        f"{'no prewarm' if args.no_prewarm else 'prewarm our kernels'}; bf16 matmul {args.matmul_n}^3; per size "
        f"{args.sizes}: check (rel L2 vs fp32, bound 2 x eager's + {ATOL:g}), then median ms, TFLOP/s, % of the "
        f"matmul rate, speedups, target >= {100 * TARGET_FRACTION:.0f} % and ahead of compile; results to "
        f"{args.out / name}.json and .md")
    log(f"dry run done in {time.perf_counter() - start:.1f} s")
    return 0 if loaded else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the command line and run (module docstring). Returns the exit status: 2 without CUDA (unless
    --dry-run) or diffusers, with a message on stderr."""
    args = parse_args(argv)
    try:
        from diffusers.utils import logging as diffusers_logging
    except ImportError as error:
        print(f"bench_consistency.py: diffusers is needed (the contenders and the reference): {error}",
              file=sys.stderr)
        return 2
    diffusers_logging.set_verbosity_error()  # the dtype-cast notice of every .to(bf16)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("bench_consistency.py: needs a CUDA device (none is available); use --dry-run for the CPU plan",
              file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
