"""Issue 14's benchmark: the VQ quantiser `sdvae_fast.ops.vector_quantize` against diffusers' arithmetic
(`torch.cdist` + `argmin` + gather) at a 16384-entry codebook.

Run on a CUDA GPU:

    python bench/bench_quantize.py [--cases 4x128 32x128 256x64 256x128] [--codes 16384] [--dtypes fp32 bf16]
                                   [--out bench/results] [--name STEM]
    TRITON_INTERPRET=1 python bench/bench_quantize.py --smoke --out /tmp/x   # CPU: end to end, tiny, NOT timed

Cases. "DxS" is latents z (--batch, D, S, S) against a codebook (K = --codes, D); the defaults, all K = 16384:
- 4x128: latent diffusion's VQ-f8 (4-dim codes, 16384 entries) and MoVQ (Kandinsky's movq: the same) at 1024^2;
- 32x128: a mid width at the same pixels (a stress case, no particular model);
- 256x64: taming-transformers' VQGAN ImageNet f16-16384 (256-dim codes, 16384 entries) at 1024^2;
- 256x128: that width at 128^2 latents (2048^2 for f16): the largest distance matrix and GEMM.
Inputs are seeded N(0, 1) draws (codebook (K, D) and z), made in fp32 on the device and cast to each --dtypes
entry (fp32, bf16, fp16), so that both contenders see the same values. Random codes make near ties as likely as
they get (real latents sit close to one code).

Contenders, per case and dtype:
- "sdvae-fast": `sdvae_fast.ops.vector_quantize(z, codebook)` -> (z_q (N, D, H, W) contiguous, indices (N, H, W)
  int64): one Triton launch (fp32 distances `||e||^2 - 2 z.e` as a GEMM, argmin in its epilogue, the row
  gathered), never writing the (pixels x K) distance matrix;
- "cdist + argmin": `cdist_quantize` below, diffusers' VectorQuantizer forward without its loss: permute to
  (N, H, W, D), `torch.argmin(torch.cdist(z_flat, codebook), dim=1)`, `embedding` gather, `z + (z_q - z)`,
  permute back, all in the input dtype (cdist on CUDA takes its matmul path for K > 25 and writes pixels x K
  distances in that dtype). When diffusers is importable the check also runs diffusers' own
  `VectorQuantizer(K, D, sane_index_shape=True)` with that codebook and requires bitwise the same z_q and indices
  (`matches_diffusers`).

Correctness before timing (`check_case`), against the exact nearest code: fp64 distances of the same (rounded)
inputs, best and second best per pixel (`exact_nearest`). Each contender's indices are compared with it; a pixel
whose code differs is a near tie when its excess squared distance (fp64) is within `tie_margin`:
TIE_SAFETY x (2 + D) x 2^-24 x (||z|| + ||e_mine|| + ||e_exact||)^2, the rounding of an fp32 distance over D
channels times 2 (the inputs are compared as given, so no term for rounding them).
z_q must be bitwise `z + (E[idx] - z)` of the contender's own indices in the input dtype, and ours must equal
the cdist path's z_q bitwise wherever their indices agree. Ours passes when every differing code is a near tie
and both value checks hold; a failure is reported, the row marked "CHECK FAILED" and the exit status is 1.
The cdist path is checked the same way for information only: in bf16/fp16 its distances are rounded to that
dtype, so its codes may be farther than fp32 rounding from the nearest (reported as "beyond the margin").
Also reported: near-tie pixels (exact best and second best within that margin of each other), and the
agreement of the two contenders' indices.

Timing (CUDA only): one call for the peak memory (`sdvae_fast.bench.peak_extra_gib`: `torch.cuda.
max_memory_allocated` during the call minus what was allocated before, GiB; the cdist path's includes its
pixels x K distance matrix), then `triton.testing.do_bench(fn, warmup=--warmup-ms, rep=--rep-ms,
return_mode="median")` in ms (after the check's first calls). Throughput = pixels (N x S x S) / median seconds;
TFLOP/s counts the distance GEMM, 2 x pixels x K x D FLOPs; "x faster" = cdist's median ms / ours.

Output: DIR/NAME.json (environment, settings incl. `torch.backends.cuda.matmul.allow_tf32`, per case and dtype the
check and both contenders' numbers) and DIR/NAME.md, rewritten after every case; NAME defaults to
DATE-GPU-quantize.

--smoke: no GPU needed, proves the script runs end to end. On the CPU under Triton's interpreter (set here when
sdvae_fast's kernels are not yet imported; exit 2 otherwise), cases 4x8 and 32x4 with K = 256 (unless --cases /
--codes are given), fp32 and bf16, checked as above; NOTHING IS TIMED (interpreter times mean nothing) and there
are no memory figures. NAME defaults to smoke-quantize.

Exit status: 0 when ours passed every check and both contenders ran; 1 otherwise (details in the results); 2 for
bad arguments, or without CUDA and --smoke.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _path in (str(REPO_ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_consistency import _fmt, _free, _short, _sync, log, save_results  # noqa: E402
from bench_flux2 import use_interpreter  # noqa: E402

OURS, CDIST = "sdvae-fast", "cdist + argmin"
CONTENDERS = (OURS, CDIST)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CASES = ("4x128", "32x128", "256x64", "256x128")
DEFAULT_CODES = 16384
SMOKE_CASES = ("4x8", "32x4")
SMOKE_CODES = 256
TIE_SAFETY = 2.0  # factor on the fp32 rounding bound of `tie_margin`
EXACT_CHUNK = 4096  # pixels per fp64 distance block in `exact_nearest` (4096 x 16384 x 8 B = 512 MiB)
NOT_TIMED = "not timed (CPU smoke run: interpreter times mean nothing)"


def parse_case(text: str) -> tuple:
    """"DxS" -> (D, S): code width D and latent side S, both positive ints. Raises ValueError otherwise."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"a case is DxS with positive ints (code width x latent side), e.g. 4x128; got {text!r}")
    return int(match[1]), int(match[2])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (module docstring). Exits with status 2 (argparse) for a bad case, --codes < 2, --batch < 1,
    or --warmup-ms / --rep-ms <= 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", help=f"DxS cases: latents (batch, D, S, S) (default "
                        f"{' '.join(DEFAULT_CASES)}; smoke {' '.join(SMOKE_CASES)})")
    parser.add_argument("--codes", type=int, help=f"codebook entries K (default {DEFAULT_CODES}; smoke {SMOKE_CODES})")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                        help="input dtypes (default fp32 bf16)")
    parser.add_argument("--batch", type=int, default=1, help="latents per call (default 1)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="output folder for NAME.json and NAME.md (default bench/results)")
    parser.add_argument("--name", help="output file stem (default DATE-GPU-quantize; smoke-quantize with --smoke)")
    parser.add_argument("--seed", type=int, default=0, help="codebooks and latents (default 0)")
    parser.add_argument("--warmup-ms", type=float, default=50.0, help="do_bench warm-up, ms (default 50)")
    parser.add_argument("--rep-ms", type=float, default=500.0, help="do_bench timed repetitions, ms (default 500)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, TRITON_INTERPRET=1, tiny cases; checked, nothing timed")
    args = parser.parse_args(argv)
    args.cases = args.cases or list(SMOKE_CASES if args.smoke else DEFAULT_CASES)
    args.codes = args.codes or (SMOKE_CODES if args.smoke else DEFAULT_CODES)
    try:
        args.parsed_cases = [parse_case(c) for c in args.cases]
    except ValueError as error:
        parser.error(str(error))
    if args.codes < 2 or args.batch < 1:
        parser.error(f"--codes must be >= 2 (best and second best) and --batch >= 1, got {args.codes}, {args.batch}")
    if args.warmup_ms <= 0 or args.rep_ms <= 0:
        parser.error(f"--warmup-ms and --rep-ms must be > 0, got {args.warmup_ms} and {args.rep_ms}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# The two quantisers and the exact reference
# ---------------------------------------------------------------------------------------------------------------


def cdist_quantize(z: torch.Tensor, codebook: torch.Tensor) -> tuple:
    """diffusers' VectorQuantizer arithmetic without the loss (diffusers/models/autoencoders/vae.py): nearest code
    by `argmin(cdist(z, E))`, gathered by `embedding`, `z + (z_q - z)`.

    Args:
        z: latents (N, D, H, W), float. codebook: (K, D), z's dtype and device.
    Returns:
        (z_q (N, D, H, W) contiguous in z's dtype, indices (N, H, W) int64), as `ops.vector_quantize` returns them.
    """
    n, dim, height, width = z.shape
    zp = z.permute(0, 2, 3, 1).contiguous()  # (N, H, W, D)
    indices = torch.argmin(torch.cdist(zp.view(-1, dim), codebook), dim=1)  # (N*H*W,)
    chosen = torch.nn.functional.embedding(indices, codebook).view(zp.shape)
    z_q = zp + (chosen - zp)
    return z_q.permute(0, 3, 1, 2).contiguous(), indices.view(n, height, width)


def ours_quantize(z: torch.Tensor, codebook: torch.Tensor) -> tuple:
    """`sdvae_fast.ops.vector_quantize(z, codebook)`: (z_q (N, D, H, W) contiguous, indices (N, H, W) int64)."""
    from sdvae_fast import ops

    return ops.vector_quantize(z, codebook)


QUANTIZERS = {OURS: ours_quantize, CDIST: cdist_quantize}


def flat_pixels(z: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) -> (N*H*W, D), pixels in (n, y, x) order (the order of the flattened indices)."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def exact_nearest(z: torch.Tensor, codebook: torch.Tensor, chunk: int = EXACT_CHUNK) -> tuple:
    """The nearest and second-nearest code of every pixel from fp64 distances of the given (rounded) values.

    Args:
        z: (N, D, H, W) any float dtype. codebook: (K, D), K >= 2, on z's device.
        chunk: pixels per block of the (chunk x K) fp64 distance matrix.
    Returns:
        (best, second), each (N*H*W,) int64 in (n, y, x) order: argmin and second argmin of
        ||z||^2 - 2 z.e + ||e||^2 in fp64 (lowest index first on exact ties).
    """
    flat = flat_pixels(z).to(torch.float64)
    table = codebook.to(torch.float64)
    norms = (table * table).sum(1)
    best = torch.empty(flat.shape[0], dtype=torch.int64, device=z.device)
    second = torch.empty_like(best)
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start:start + chunk]
        dist = (rows * rows).sum(1, keepdim=True) - 2.0 * rows @ table.T + norms[None, :]
        first = torch.argmin(dist, dim=1)
        best[start:start + rows.shape[0]] = first
        dist.scatter_(1, first[:, None], float("inf"))
        second[start:start + rows.shape[0]] = torch.argmin(dist, dim=1)
    return best, second


def tie_margin(z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, ref_codes: torch.Tensor) -> tuple:
    """How much farther each pixel's `codes` is than its `ref_codes`, and how much fp32 rounding allows.

    Args:
        z: (N, D, H, W) latents, any float dtype. codebook: (K, D).
        codes, ref_codes: (N*H*W,) int64 code indices in (n, y, x) order.
    Returns:
        (excess, margin), each (N*H*W,) float64: excess = ||z - e_code||^2 - ||z - e_ref||^2 in fp64 (0 where the
        codes agree); margin = TIE_SAFETY x (2 + D) x 2^-24 x (||z|| + ||e_code|| + ||e_ref||)^2, a bound on what
        fp32 rounding of the two squared distances over D channels (as the kernel and cdist compute them) can
        change their difference by, times TIE_SAFETY. A differing code with excess <= margin is a near tie.
    """
    flat = flat_pixels(z).to(torch.float64)
    table = codebook.to(torch.float64)
    mine, theirs = table[codes], table[ref_codes]
    excess = ((flat - mine) ** 2).sum(1) - ((flat - theirs) ** 2).sum(1)
    scale = (flat.norm(dim=1) + mine.norm(dim=1) + theirs.norm(dim=1)) ** 2
    return excess, TIE_SAFETY * (2 + z.shape[1]) * 2.0 ** -24 * scale


def _codes_stats(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, exact: torch.Tensor) -> dict:
    """How `indices` (N*H*W,) compare with the exact nearest codes: {"mismatches", "beyond_margin": differing codes
    that are no near tie, "worst_excess_over_margin": max excess / margin over differing codes (0 when none)}."""
    differ = indices != exact
    mismatches = int(differ.sum())
    if not mismatches:
        return {"mismatches": 0, "beyond_margin": 0, "worst_excess_over_margin": 0.0}
    excess, margin = tie_margin(z, codebook, indices, exact)
    ratio = (excess / margin)[differ]
    return {"mismatches": mismatches, "beyond_margin": int((ratio > 1).sum()),
            "worst_excess_over_margin": float(ratio.max())}


def check_case(z: torch.Tensor, codebook: torch.Tensor, outputs: dict, cr: dict) -> None:
    """Correctness of one case (into `cr`, in place; module docstring): the exact codes, near ties, each
    contender's codes and values, their agreement, diffusers' own quantiser, and ours' verdict.

    Args:
        z: (N, D, H, W) latents. codebook: (K, D). outputs: {contender: (z_q, indices)} of the contenders that ran.
    """
    best, second = exact_nearest(z, codebook)
    gap, margin = tie_margin(z, codebook, second, best)
    cr["pixels"] = best.numel()
    cr["near_ties"] = int((gap <= margin).sum())
    cr["min_gap_over_margin"] = float((gap / margin).min())
    zp = flat_pixels(z)
    for name, (z_q, indices) in outputs.items():
        row = cr["contenders"][name]
        flat_idx = indices.reshape(-1)
        row.update(_codes_stats(z, codebook, flat_idx, best))
        expected = zp + (codebook[flat_idx] - zp)  # z + (e - z) in z's dtype
        row["values_exact"] = bool(torch.equal(flat_pixels(z_q), expected))
    if OURS in outputs and CDIST in outputs:
        (zq_o, idx_o), (zq_c, idx_c) = outputs[OURS], outputs[CDIST]
        agree = idx_o.reshape(-1) == idx_c.reshape(-1)
        cr["indices_agree"] = int(agree.sum())
        cr["zq_equal_where_agree"] = bool(torch.equal(flat_pixels(zq_o)[agree], flat_pixels(zq_c)[agree]))
    cr["matches_diffusers"] = _matches_diffusers(z, codebook, outputs.get(CDIST))
    ours = cr["contenders"][OURS]
    problems = []
    if OURS not in outputs:
        problems.append("ours did not run")
    else:
        if ours["beyond_margin"]:
            problems.append(f"{ours['beyond_margin']} codes beyond fp32 rounding of the nearest")
        if not ours["values_exact"]:
            problems.append("z_q is not z + (e - z) of its codes")
        if cr.get("zq_equal_where_agree") is False:
            problems.append("z_q differs from the cdist path's where the codes agree")
    passed = not problems
    cr["check"] = {"passed": passed, "verdict": (
        f"passed: {ours['mismatches']} of {cr['pixels']} codes differ from the exact nearest, none beyond the fp32 "
        f"margin ({cr['near_ties']} near-tie pixels); z_q bitwise" if passed else "FAILED: " + "; ".join(problems))}
    if not passed:
        ours["note"] = "CHECK FAILED"
    cdist = cr["contenders"][CDIST]
    if cdist.get("beyond_margin"):
        cdist["note"] = (f"{cdist['beyond_margin']} codes beyond fp32 rounding of the nearest (its distances are "
                         f"{cr['dtype']})")


def _matches_diffusers(z: torch.Tensor, codebook: torch.Tensor, cdist_out) -> Optional[bool]:
    """Whether diffusers' `VectorQuantizer(K, D, sane_index_shape=True)` holding `codebook` returns bitwise the
    cdist path's (z_q, indices) for z; None when diffusers is missing or the cdist path did not run."""
    if cdist_out is None:
        return None
    try:
        from diffusers.models.autoencoders.vae import VectorQuantizer
    except ImportError:
        return None
    k, dim = codebook.shape
    quantizer = VectorQuantizer(k, dim, beta=0.25, sane_index_shape=True, legacy=True)
    quantizer = quantizer.to(device=codebook.device, dtype=codebook.dtype).eval()
    with torch.no_grad():
        quantizer.embedding.weight.copy_(codebook)
        z_q, _, (_, _, indices) = quantizer(z)
    return bool(torch.equal(z_q, cdist_out[0]) and torch.equal(indices, cdist_out[1]))


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


def summarize(cr: dict) -> None:
    """Fill in (in place) each contender's throughput (pixels/s), TFLOP/s of the distance GEMM
    (2 x pixels x K x D / median time) and the case's "speedup" (cdist ms / ours ms) and "memory_ratio" (cdist
    peak / ours peak); None where a figure is missing."""
    rows = cr["contenders"]
    for row in rows.values():
        ms = row.get("ms")
        row["pixels_per_s"] = cr["pixels"] / (ms * 1e-3) if ms else None
        row["tflops"] = cr["flops"] / (ms * 1e-3) / 1e12 if ms else None
    ours, cdist = rows.get(OURS, {}), rows.get(CDIST, {})
    cr["speedup"] = cdist["ms"] / ours["ms"] if ours.get("ms") and cdist.get("ms") else None
    peaks = ours.get("peak_gib"), cdist.get("peak_gib")
    cr["memory_ratio"] = peaks[1] / peaks[0] if all(p is not None and p == p for p in peaks) and peaks[0] else None


def markdown(result: dict) -> str:
    """The results as markdown: header, one row per case, dtype and contender, then per case the check."""
    env = result["env"]
    title = f"# VQ quantiser, K = {result['codes']}, batch {result['batch']} ({env.get('date')})"
    if result.get("smoke"):
        title += " -- CPU SMOKE RUN, NOT A BENCHMARK"
    lines = [title, "",
             f"- GPU: {env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, diffusers "
             f"{env.get('diffusers')}; commit {env.get('sdvae_fast_commit')}",
             f"- ours: ops.vector_quantize ({result['our_path']}); cdist + argmin: diffusers' VectorQuantizer "
             f"arithmetic without its loss; TF32 matmul allowed: {result['allow_tf32']}",
             f"- timing: {result['timing']}",
             "- check: codes vs the exact (fp64) nearest, differing codes must be near ties (fp32 rounding margin); "
             "z_q bitwise z + (e - z); GFLOP = 2 x pixels x K x D", "",
             "| case (D x S^2) | dtype | contender | median ms | Mpixel/s | TFLOP/s | peak GiB | x faster | "
             "codes != exact | beyond margin | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cr in result["cases"].values():
        for name, row in cr["contenders"].items():
            speed = _fmt(cr.get("speedup"), ".2f") if name == OURS else "-"
            mpix = row.get("pixels_per_s")
            lines.append(f"| {cr['dim']} x {cr['side']}^2 | {cr['dtype']} | {name} | {_fmt(row.get('ms'), '.3f')} | "
                         f"{_fmt(None if mpix is None else mpix / 1e6, '.1f')} | {_fmt(row.get('tflops'), '.2f')} | "
                         f"{_fmt(row.get('peak_gib'), '.3f')} | {speed} | {row.get('mismatches', '-')} | "
                         f"{row.get('beyond_margin', '-')} | {row.get('note', '')} |")
    lines.append("")
    for key, cr in result["cases"].items():
        check = cr.get("check") or {}
        lines.append(f"- {key}: {cr['pixels']} pixels, {cr['flops'] / 1e9:.3g} GFLOP; near-tie pixels "
                     f"{cr.get('near_ties', '-')}; indices agree {cr.get('indices_agree', '-')}; cdist path == "
                     f"diffusers' VectorQuantizer: {cr.get('matches_diffusers')}; check: "
                     f"{check.get('verdict', 'not run')}")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: Path, name: str) -> List[Path]:
    """Write DIR/NAME.json and DIR/NAME.md (this benchmark's `markdown`); returns the two paths."""
    return save_results(result, out_dir, name, markdown)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def inputs(dim: int, side: int, codes: int, batch: int, dtype: torch.dtype, seed: int, device: torch.device):
    """(z (batch, dim, side, side), codebook (codes, dim)) in `dtype` on `device`: N(0, 1) draws in fp32 from a
    generator on `device` seeded with `seed` (codebook first), then cast."""
    gen = torch.Generator(device=device).manual_seed(seed)
    codebook = torch.randn(codes, dim, device=device, generator=gen)
    z = torch.randn(batch, dim, side, side, device=device, generator=gen)
    return z.to(dtype), codebook.to(dtype)


def run_case(args, dim: int, side: int, dtype_name: str, device: torch.device, result: dict,
             save: Callable[[], None]) -> None:
    """One case and dtype: inputs, each contender's first call, the check, then (CUDA) peak memory and do_bench."""
    from sdvae_fast.bench import peak_extra_gib

    key = f"{dim}x{side} {dtype_name}"
    z, codebook = inputs(dim, side, args.codes, args.batch, DTYPES[dtype_name], args.seed, device)
    pixels = args.batch * side * side
    cr = {"dim": dim, "side": side, "dtype": dtype_name, "latents": list(z.shape), "codebook": list(codebook.shape),
          "pixels": pixels, "flops": 2 * pixels * args.codes * dim, "contenders": {n: {} for n in CONTENDERS}}
    result["cases"][key] = cr
    outputs = {}
    for name, quantize in QUANTIZERS.items():
        row = cr["contenders"][name]
        start = time.perf_counter()
        try:
            with torch.no_grad():
                outputs[name] = quantize(z, codebook)
            _sync(device)
            row["first_call_s"] = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - reported; the other contender still runs
            row["error"] = row["note"] = f"failed: {_short(error)}"
            _free(device)
    check_case(z, codebook, outputs, cr)
    del outputs
    log(f"{key:14s} check {cr['check']['verdict']}; cdist beyond margin "
        f"{cr['contenders'][CDIST].get('beyond_margin', '-')}")
    save()
    for name, quantize in QUANTIZERS.items():
        row = cr["contenders"][name]
        if "error" in row:
            continue
        if device.type != "cuda":
            row["note"] = f"{row['note']}; {NOT_TIMED}" if row.get("note") else NOT_TIMED
            continue
        import triton.testing

        def call(quantize=quantize):
            with torch.no_grad():
                return quantize(z, codebook)

        try:
            row["peak_gib"] = peak_extra_gib(call, device)
            row["ms"] = triton.testing.do_bench(call, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        except Exception as error:  # noqa: BLE001 - reported; the other contender still runs
            row["error"] = row["note"] = f"failed while timing: {_short(error)}"
            _free(device)
        summarize(cr)
        log(f"{key:14s} {name:15s} {_fmt(row.get('ms'), '9.3f')} ms  {_fmt(row.get('pixels_per_s'), '.3e')} "
            f"pixel/s  peak {_fmt(row.get('peak_gib'), '.3f')} GiB {row.get('error', '')}")
        save()
    summarize(cr)
    save()
    _free(device)


def run(args, device: torch.device, smoke: bool = False) -> int:
    """Every case and dtype (module docstring) on `device`. Returns the exit status."""
    from sdvae_fast.bench import env_info, results_stem
    from sdvae_fast.kernels._common import kernels_available

    if device.type == "cuda":
        torch.cuda.set_device(device)
    name = args.name or ("smoke-quantize" if smoke else f"{results_stem()}-quantize")
    timing = (NOT_TIMED if smoke else f"triton.testing.do_bench median (warmup {args.warmup_ms:g} ms, rep "
              f"{args.rep_ms:g} ms) after the check's first call; peak = max_memory_allocated during one call")
    result = {"benchmark": "VQ quantiser (issue 14)", "smoke": smoke, "env": env_info(), "codes": args.codes,
              "batch": args.batch, "seed": args.seed, "timing": timing,
              "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
              "our_path": "Triton kernel" + (" under the interpreter" if device.type == "cpu" else "")
              if kernels_available(device) else "PyTorch reference (no kernels on this device)",
              "cases": {}}

    def save() -> None:
        write_results(result, args.out, name)

    for dim, side in args.parsed_cases:
        for dtype_name in args.dtypes:
            run_case(args, dim, side, dtype_name, device, result, save)
    paths = write_results(result, args.out, name)
    print(paths[1].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = [f"{key}: {c}: {row['error']}" for key, cr in result["cases"].items()
              for c, row in cr["contenders"].items() if "error" in row]
    failed += [f"{key}: check {cr['check']['verdict']}" for key, cr in result["cases"].items()
               if not cr["check"]["passed"]]
    for line in failed:
        print(f"bench_quantize.py: {line}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the command line and run (module docstring). Returns the exit status: 2 without CUDA unless --smoke,
    with a message on stderr."""
    args = parse_args(argv)
    if args.smoke:
        if not use_interpreter("bench_quantize.py"):
            return 2
        return run(args, torch.device("cpu"), smoke=True)
    if not torch.cuda.is_available():
        print("bench_quantize.py: needs a CUDA device (none is available); use --smoke for the CPU run",
              file=sys.stderr)
        return 2
    return run(args, torch.device("cuda", 0))


if __name__ == "__main__":
    sys.exit(main())
