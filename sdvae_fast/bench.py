"""`sdvae-fast bench`: end-to-end encode/decode timings against diffusers, and the environment record.

What is timed: `vae.encode(x).latent_dist` for images x (batch, 3, res, res) and `vae.decode(z).sample` for
latents z (batch, C, res/8, res/8), random inputs, in the chosen dtype on one CUDA device, for
- `sdvae-fast`: our AutoencoderKL on its fast path (backend auto),
- `diffusers eager`: `diffusers.AutoencoderKL` with the same config and weights, SDPA attention
  (`AttnProcessor2_0`),
- `diffusers compile`: `torch.compile` of that model's decode, compiled once at one resolution (a compile per
  resolution would cost more than the whole run),
- `sdvae-fast, stats pass`: our decode at that same resolution with `sdvae_fast.fast.EMIT_GN_STATS` off, i.e.
  every GroupNorm reading its input once more for its statistics instead of taking them from the producing
  conv's epilogue (what the emitted statistics save, measured).
Each time is the median of repeated runs after two warm-up calls, timed with CUDA events. FLOPs are the
reference arithmetic counted by `torch.utils.flop_counter.FlopCounterMode` on a meta-device copy (2 FLOPs per
multiply-add; convs, linears and attention), so TFLOP/s compare implementations on the same work; the floor is
the H200's dense bf16 matrix rate measured at about 790 TFLOP/s (docs/design.md, section 2). Peak memory is
`torch.cuda.max_memory_allocated` during one call minus what was allocated before it (weights and inputs).

Also here, for bench/gpu_check.sh: `env_info()` (GPU, driver, versions, commit, date) and `results_stem()` (the
`DATE-GPU` file stem), runnable as `python -m sdvae_fast.bench env-info|stem`.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

FLOOR_TFLOPS = 790.0  # dense bf16 matrix rate of one H200, TFLOP/s (docs/design.md, section 2)
REPO_ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("sdvae-fast", "diffusers eager", "diffusers compile", "sdvae-fast, stats pass")
STATS_PASS = IMPLS[3]


# ---------------------------------------------------------------------------------------------------------------
# Environment record and file naming
# ---------------------------------------------------------------------------------------------------------------


def _run(cmd: Sequence[str], cwd: Optional[Path] = None) -> Optional[str]:
    """stdout of a command, stripped; None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # a missing or broken optional package is simply reported as absent
        return None


def env_info() -> dict:
    """What a results file must name: GPU, driver, CUDA, versions of Python/torch/triton/diffusers, commit, date.

    Returns a dict of strings (None where unknown). `gpu` is "none" without CUDA; `commit` is the git HEAD of
    this checkout with "-dirty" appended when the tree has changes, or, for a tree copied without `.git`, the
    value of SDVAE_FAST_COMMIT (bench/gpu_check.sh sets it from its command line); `date` is UTC ISO 8601.
    """
    gpu, capability, memory = "none", None, None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, capability = props.name, f"{props.major}.{props.minor}"
        memory = f"{props.total_memory / 2**30:.1f} GiB"
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    commit = _run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT)
    if commit and _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT):
        commit += "-dirty"
    commit = commit or os.environ.get("SDVAE_FAST_COMMIT") or None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpu": gpu,
        "gpu_count": str(torch.cuda.device_count()),
        "compute_capability": capability,
        "gpu_memory": memory,
        "driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "sdvae_fast_commit": commit,
        "host": platform.node(),
    }


def env_markdown(info: dict) -> str:
    """`env_info()` as a markdown bullet list, one `- key: value` line per field."""
    return "\n".join(f"- {key}: {value if value is not None else 'unknown'}" for key, value in info.items())


def results_stem(gpu: Optional[str] = None, date: Optional[_dt.date] = None) -> str:
    """File stem of a results file: `YYYY-MM-DD-GPU`, e.g. `2026-11-29-NVIDIA-H200`.

    `gpu` defaults to the name of CUDA device 0 ("cpu" without CUDA); runs of characters other than letters,
    digits, dots and dashes become one dash. `date` defaults to today (UTC).
    """
    if gpu is None:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    date = date or _dt.datetime.now(_dt.timezone.utc).date()
    clean = re.sub(r"[^A-Za-z0-9.-]+", "-", gpu).strip("-") or "unknown"
    return f"{date.isoformat()}-{clean}"


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], *, device="cuda", budget_s: float = 2.0, warmup: int = 2,
              min_reps: int = 3, max_reps: int = 50) -> float:
    """Median time of one `fn()` call in milliseconds: CUDA events on a CUDA `device`, else `perf_counter`.

    Runs `warmup` untimed calls, then timed calls until `min_reps` are done and `budget_s` seconds of timed work
    have passed (at most `max_reps`). Each call is timed on its own so that the median discards outliers.
    """
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    while len(times) < max_reps:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
        if len(times) >= min_reps and sum(times) >= budget_s * 1e3:
            break
    return statistics.median(times)


def peak_extra_gib(fn: Callable[[], object], device="cuda") -> float:
    """Peak CUDA memory allocated during one `fn()` call beyond what was allocated before it, in GiB.

    NaN on a non-CUDA device (the call still runs, so it doubles as a warm-up).
    """
    if torch.device(device).type != "cuda":
        fn()
        return math.nan
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def count_gflop(model: torch.nn.Module, op: str, shape: Sequence[int]) -> float:
    """GFLOP of `model.encode` or `model.decode` on an input of `shape`, counted on a meta-device copy.

    Uses `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add). Returns NaN when the model
    cannot run on the meta device.
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        meta = copy.deepcopy(model).to("meta")
        x = torch.empty(*shape, device="meta", dtype=next(meta.parameters()).dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            getattr(meta, op)(x)
        return counter.get_total_flops() / 1e9
    except Exception as exc:  # e.g. a data-dependent check that meta tensors cannot answer
        print(f"sdvae-fast bench: warning: FLOPs of {op} not counted ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return math.nan


@dataclass
class Row:
    """One measurement. ms: median milliseconds; gflop: work per call; peak_gib: extra peak memory."""

    op: str
    res: int
    batch: int
    dtype: str
    impl: str
    ms: float = math.nan
    gflop: float = math.nan
    peak_gib: float = math.nan
    note: str = ""

    @property
    def tflops(self) -> float:
        return self.gflop / self.ms if self.ms > 0 else math.nan  # GFLOP per ms = TFLOP/s

    @property
    def pct_floor(self) -> float:
        return 100.0 * self.tflops / FLOOR_TFLOPS


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _speedups(rows: list[Row], row: Row) -> tuple[float, float]:
    """(eager_ms / row.ms, compile_ms / row.ms) for the same op, resolution and batch (NaN when absent)."""
    def ms_of(impl):
        for r in rows:
            if (r.op, r.res, r.batch, r.impl) == (row.op, row.res, row.batch, impl) and r.ms == r.ms:
                return r.ms
        return math.nan

    return ms_of("diffusers eager") / row.ms, ms_of("diffusers compile") / row.ms


def _fmt(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)


def write_results(rows: list[Row], out_dir: Path, name: str, header: str = "") -> dict:
    """Write `name.csv` and `name.md` (and `name.png` when matplotlib is present) to `out_dir`.

    Returns {"csv": path, "md": path, "png": path or None}.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{name}.csv", "md": out_dir / f"{name}.md", "png": None}
    fields = ["op", "res", "batch", "dtype", "impl", "ms", "speedup_vs_eager", "speedup_vs_compile", "gflop",
              "tflops", "pct_floor", "peak_gib", "note"]
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            vs_eager, vs_compile = _speedups(rows, r)
            writer.writerow({**asdict(r), "speedup_vs_eager": f"{vs_eager:.3f}",
                             "speedup_vs_compile": f"{vs_compile:.3f}", "tflops": f"{r.tflops:.2f}",
                             "pct_floor": f"{r.pct_floor:.1f}"})
    lines = [header, "", "| op | res | batch | dtype | impl | median ms | x eager | x compile | TFLOP/s | "
             f"% of {FLOOR_TFLOPS:.0f} | peak GiB | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_eager, vs_compile = _speedups(rows, r)
        lines.append(f"| {r.op} | {r.res} | {r.batch} | {r.dtype} | {r.impl} | {_fmt(r.ms, '.2f')} | "
                     f"{_fmt(vs_eager, '.2f')} | {_fmt(vs_compile, '.2f')} | {_fmt(r.tflops, '.1f')} | "
                     f"{_fmt(r.pct_floor, '.1f')} | {_fmt(r.peak_gib, '.2f')} | {r.note} |")
    paths["md"].write_text("\n".join(lines).lstrip() + "\n", encoding="utf-8")
    paths["png"] = _chart(rows, out_dir / f"{name}.png")
    return paths


def _chart(rows: list[Row], path: Path) -> Optional[Path]:
    """Grouped bar chart of median ms per (op, res), one bar per implementation, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = sorted({(r.op, r.res) for r in rows if r.ms == r.ms}, key=lambda g: (g[0], g[1]))
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups)), 4.0))
    width = 0.8 / len(IMPLS)
    for i, impl in enumerate(IMPLS):
        values = [next((r.ms for r in rows if (r.op, r.res, r.impl) == (*g, impl)), math.nan) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=impl)
    ax.set_xticks([j + width for j in range(len(groups))], [f"{op}\n{res}²" for op, res in groups])
    ax.set_yscale("log")
    ax.set_ylabel("median ms (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _build_peer(vae, device, dtype):
    """diffusers.AutoencoderKL with `vae`'s config and weights and SDPA attention; None (with a warning) if absent."""
    try:
        import diffusers
        from diffusers.models.attention_processor import AttnProcessor2_0
    except ImportError as exc:
        print(f"sdvae-fast bench: warning: diffusers is not importable ({exc}); timing sdvae-fast only",
              file=sys.stderr)
        return None
    from sdvae_fast.configs import config_dict

    peer = diffusers.AutoencoderKL.from_config(config_dict(vae))
    try:
        peer.load_state_dict({k: v for k, v in vae.state_dict().items()}, strict=True)
    except RuntimeError as exc:
        print(f"sdvae-fast bench: warning: diffusers peer does not take our weights ({' '.join(str(exc).split())[:200]}"
              f"); timing sdvae-fast only", file=sys.stderr)
        return None
    peer.set_attn_processor(AttnProcessor2_0())
    return peer.to(device=device, dtype=dtype).eval()


def _decode_with_stats_pass(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z).sample` with `fast.EMIT_GN_STATS` off (each GroupNorm computes its own statistics)."""
    from sdvae_fast import fast

    saved, fast.EMIT_GN_STATS = fast.EMIT_GN_STATS, False
    try:
        return vae.decode(z).sample
    finally:
        fast.EMIT_GN_STATS = saved


def run_bench(vae, *, device, dtype: torch.dtype, resolutions: Sequence[int], batch: int = 1, out_dir: Path,
              name: Optional[str] = None, compile_res: int = 1024, peers: bool = True, budget_s: float = 2.0,
              quiet: bool = False) -> list[Row]:
    """Time encode and decode at each resolution for sdvae-fast and the diffusers peers; write results.

    Args:
        vae: our AutoencoderKL on `device` in `dtype` with its backend set. The CLI allows CUDA only; on CPU
            this runs too (perf_counter timing, no memory figures), which the tests use.
        resolutions: image sides in pixels (multiples of 8). batch: images per call.
        out_dir, name: results go to out_dir/name.{csv,md,png} (name defaults to `DATE-GPU-e2e`), rewritten
            after every measurement so an interrupted run keeps what it measured.
        compile_res: the resolution at which diffusers' decode also runs under torch.compile, and ours without
            emitted statistics (0: never).
        peers: also time diffusers. budget_s: timed seconds per measurement at most (at least 3 runs).
    Returns:
        The rows measured. Raises ValueError for a resolution that is not a positive multiple of 8.
    """
    from tqdm import tqdm

    from sdvae_fast.configs import config_dict

    for res in resolutions:
        if res < 8 or res % 8:
            raise ValueError(f"--res values must be positive multiples of 8, got {res}")
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    name = name or f"{results_stem()}-e2e"
    info = env_info()
    dtype_name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    timer = "CUDA events" if device.type == "cuda" else "perf_counter"
    header = (f"# sdvae-fast end-to-end benchmark ({info['date']})\n\n{env_markdown(info)}\n\nMedian of repeated "
              f"runs after warm-up ({timer}); TFLOP/s of the reference arithmetic; floor {FLOOR_TFLOPS:.0f} "
              f"TFLOP/s; peak GiB = extra memory during one call.")
    peer = _build_peer(vae, device, dtype) if peers else None
    channels = int(config_dict(vae)["latent_channels"])
    flops_model = peer if peer is not None else vae

    plan = [(res, op, impl) for res in resolutions for op in ("encode", "decode")
            for impl in (("diffusers eager", "sdvae-fast") if peer is not None else ("sdvae-fast",))]
    if compile_res in resolutions:
        plan.append((compile_res, "decode", STATS_PASS))
    if peer is not None and compile_res in resolutions:
        plan.append((compile_res, "decode", "diffusers compile"))  # last: its compile may be cut short
    rows: list[Row] = []
    gflop_cache: dict = {}  # (op, shape) -> GFLOP: the count does not depend on the implementation
    compiled_decode = None
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for res, op, impl in tqdm(plan, desc="bench", unit="run", disable=quiet):
            shape = (batch, 3, res, res) if op == "encode" else (batch, channels, res // 8, res // 8)
            x = torch.randn(shape, device=device, generator=gen).to(dtype)
            if op == "encode":
                x = x.clamp(-1, 1)
            if (op, shape) not in gflop_cache:
                gflop_cache[op, shape] = count_gflop(flops_model, op, shape)
            row = Row(op, res, batch, dtype_name, impl, gflop=gflop_cache[op, shape])
            try:
                if impl == "diffusers compile":
                    start = time.perf_counter()
                    compiled_decode = compiled_decode or torch.compile(peer.decode)
                    compiled_decode(x)
                    _sync(device)
                    row.note = f"compiled in {time.perf_counter() - start:.0f} s"
                    fn = lambda: compiled_decode(x).sample  # noqa: E731
                elif impl == STATS_PASS:
                    fn = lambda: _decode_with_stats_pass(vae, x)  # noqa: E731
                else:
                    model = vae if impl == "sdvae-fast" else peer
                    fn = (lambda: model.encode(x).latent_dist) if op == "encode" else (lambda: model.decode(x).sample)
                row.peak_gib = peak_extra_gib(fn, device)
                row.ms = median_ms(fn, device=device, budget_s=budget_s)
            except Exception as exc:  # noqa: BLE001 - keep going (Triton compile/resource errors included)
                row.note = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            if not quiet:
                vs_eager, _ = _speedups(rows, row)
                tqdm.write(f"{op:6s} {res:5d}  {impl:18s} {_fmt(row.ms, '9.2f')} ms  x{_fmt(vs_eager, '.2f')} eager  "
                           f"{_fmt(row.tflops, '6.1f')} TFLOP/s  peak {_fmt(row.peak_gib, '.2f')} GiB  {row.note}")
            write_results(rows, out_dir, name, header)
    paths = write_results(rows, out_dir, name, header)
    print(paths["md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values() if p))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# `python -m sdvae_fast.bench env-info|stem`, used by bench/gpu_check.sh
# ---------------------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`env-info [--md FILE] [--json FILE]` prints (and writes) the environment; `stem` prints `DATE-GPU`."""
    parser = argparse.ArgumentParser(prog="python -m sdvae_fast.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env-info", help="GPU, driver, versions, commit and date")
    p.add_argument("--md", type=Path, help="append the markdown list to this file")
    p.add_argument("--json", type=Path, help="write the fields as JSON to this file")
    sub.add_parser("stem", help="print the results file stem DATE-GPU")
    args = parser.parse_args(argv)
    if args.command == "stem":
        print(results_stem())
        return 0
    info = env_info()
    text = env_markdown(info)
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        with open(args.md, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
