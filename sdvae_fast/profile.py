"""`sdvae-fast profile`: where the time of an encode or decode goes, unit by unit, on a CUDA device.

For each unit (the pieces `sdvae_fast.parity` names: conv_in, every ResnetBlock2D, Downsample2D, Upsample2D, the
mid-block attention, the output head, the quant convs; for a consistency decoder also its UNet's units, one row
per decode step, `[call k]`, each run with the time embedding it received; for a VQ model (`sdvae_fast.VQModel`)
also the attention inside its attention levels, and MoVQ's SpatialNorm units run with the quantised latents they
received):
- time: median of repeated calls, CUDA events, the unit run alone on the fast path (`sdvae_fast.fast`'s unit
  function) with inputs recorded from a PyTorch run of the same model; fusions across units (none today) would
  not show here, the end-to-end row has them;
- FLOPs: the reference arithmetic of the unit, counted by `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per
  multiply-add) on the PyTorch forward: the 4-phase upsample does fewer multiply-adds than it is credited with,
  so its TFLOP/s is "useful" TFLOP/s;
- TFLOP/s and its percent of this device's bf16 matrix rate, measured in the same run (a 8192^3 bf16 matmul);
- bytes: the least traffic the unit can have, inputs + output + parameters, once each (NHWC or not), and the
  achieved GB/s on that basis;
- peak memory: `torch.cuda.max_memory_allocated` during one call beyond what was allocated before it.
The end-to-end row times the whole `encode` / `decode` the same way (encode to `parity.encoder_latents`: a VQ
model's unquantised latents; a VQ decode quantises its random latents first, so the quantiser kernel is in that
row and in no unit row). A chrome trace of one end-to-end call (torch.profiler, CPU and CUDA activity) is written
beside the tables.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sdvae_fast.bench import median_ms, peak_extra_gib
from sdvae_fast.parity import (call_labels, decode, decoder_channels, downscale_factor, encoder_latents,
                                record_units, unit_call, units_by_name)


def matmul_tflops(device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matrix rate of `device` in TFLOP/s: median time of an (n x n) @ (n x n) matmul in `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device=device, budget_s=0.5, warmup=3)
    return 2 * n**3 / ms / 1e9


@dataclass
class UnitProfile:
    """One row: ms (median), gflop (reference arithmetic), bytes (least traffic), peak_gib (extra peak memory)."""

    name: str
    shape: tuple
    ms: float
    gflop: float
    bytes: int
    peak_gib: float

    def tflops(self) -> float:
        return self.gflop / self.ms if self.ms > 0 else math.nan

    def gbps(self) -> float:
        return self.bytes / self.ms / 1e6 if self.ms > 0 else math.nan


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _unit_param_bytes(unit) -> int:
    """Bytes of the parameters of a unit (all the modules it covers)."""
    return sum(_nbytes(list(m.parameters())) for m in unit.modules)


def _gflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def profile_part(vae, part: str, x: torch.Tensor, budget_s: float = 0.3) -> list[UnitProfile]:
    """Profile `vae.encode` (part "encode", x images) or `vae.decode` (part "decode", x latents) unit by unit.

    Returns one UnitProfile per unit in execution order, then the end-to-end row named after the part. Runs on
    CPU too (perf_counter timing, NaN memory), which the tests use; the CLI allows CUDA only.
    """
    from sdvae_fast.fast import use_fast_path

    fast_path = use_fast_path(vae.backend, x.device)
    reference = copy.deepcopy(vae)
    reference.set_backend("torch")
    captures: list = []
    with record_units(reference, captures):
        reference.encode(x) if part == "encode" else decode(reference, x)  # records every unit's inputs and output
    rows = []
    units, reference_units = units_by_name(vae), units_by_name(reference)  # once: not inside the timed calls
    for cap, label in zip(captures, call_labels(captures)):
        unit = units[cap.name]
        call = unit_call(unit, cap.args, cap.kwargs, fast_path)
        gflop = _gflop(unit_call(reference_units[cap.name], cap.args, cap.kwargs, False))
        traffic = _nbytes(cap.args) + _nbytes(cap.output) + _unit_param_bytes(unit)
        peak = peak_extra_gib(call, x.device)
        rows.append(UnitProfile(label, tuple(cap.output.shape), median_ms(call, device=x.device, budget_s=budget_s),
                                gflop, traffic, peak))
    del captures, reference
    whole = (lambda: encoder_latents(vae, x)) if part == "encode" else (lambda: decode(vae, x))
    out_shape = tuple(whole().shape)
    traffic = _nbytes(x) + _nbytes(list(vae.parameters()))
    rows.append(UnitProfile(f"{part} (end to end)", out_shape,
                            median_ms(whole, device=x.device, budget_s=3 * budget_s), sum(r.gflop for r in rows),
                            traffic, peak_extra_gib(whole, x.device)))
    return rows


def input_shape(vae, part: str, batch: int, res: int) -> tuple:
    """The input `run_profile` draws for `part`: images (batch, 3, res, res) for "encode", latents (batch, C,
    res/f, res/f) for "decode", C the channel count `vae.decode` takes (`parity.decoder_channels`: a VQ model's
    vq_embed_dim) and f its `downscale_factor` (VQ-f4: 4). Raises ValueError when res is not a multiple of f."""
    factor = downscale_factor(vae)
    if res % factor:
        raise ValueError(f"--res must be a multiple of {factor} for this model, got {res}")
    if part == "encode":
        return (batch, 3, res, res)
    return (batch, decoder_channels(vae), res // factor, res // factor)


def format_rows(rows: Sequence[UnitProfile], peak_tflops: float) -> str:
    """A markdown table of unit rows, with percent of `peak_tflops` (the measured matrix rate)."""
    lines = ["| unit | output shape | ms | GFLOP | TFLOP/s | % of peak | MB moved | GB/s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {'x'.join(map(str, r.shape))} | {r.ms:.3f} | {r.gflop:.1f} | "
                     f"{r.tflops():.1f} | {100 * r.tflops() / peak_tflops:.1f} | {r.bytes / 1e6:.1f} | "
                     f"{r.gbps():.0f} | {r.peak_gib:.3f} |")
    return "\n".join(lines)


def run_profile(vae, *, device, dtype: torch.dtype, res: int, batch: int, parts: Sequence[str],
                out_dir: Path) -> dict:
    """Profile the requested parts at `res` x `res` (batch images); print tables and write them to `out_dir`.

    Writes `profile-PART-RES.md` and `trace-PART-RES.json` (chrome trace, open in chrome://tracing or Perfetto)
    per part. Returns {part: rows}. Raises ValueError when res is not a positive multiple of 8.
    """
    from torch.profiler import ProfilerActivity, profile

    from sdvae_fast.bench import env_info, env_markdown

    if res < 8 or res % 8:
        raise ValueError(f"--res must be a positive multiple of 8, got {res}")
    shapes = {part: input_shape(vae, part, batch, res) for part in parts}
    out_dir.mkdir(parents=True, exist_ok=True)
    peak = matmul_tflops(device)
    print(f"measured bf16 matmul rate: {peak:.0f} TFLOP/s")
    gen = torch.Generator(device=device).manual_seed(0)
    results = {}
    with torch.no_grad():
        for part in parts:
            x = torch.randn(shapes[part], device=device, generator=gen).to(dtype)
            rows = profile_part(vae, part, x)
            table = format_rows(rows, peak)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                (encoder_latents(vae, x) if part == "encode" else decode(vae, x))
                torch.cuda.synchronize(device)
            trace = out_dir / f"trace-{part}-{res}.json"
            prof.export_chrome_trace(str(trace))
            kernels = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
            text = (f"# profile: {part} {batch}x{res}x{res} {str(dtype).replace('torch.', '')}, backend "
                    f"{vae.backend}\n\n{env_markdown(env_info())}\n- measured bf16 matmul rate: {peak:.0f} "
                    f"TFLOP/s\n\n{table}\n\n## top kernels (torch.profiler)\n\n```\n{kernels}\n```\n")
            path = out_dir / f"profile-{part}-{res}.md"
            path.write_text(text, encoding="utf-8")
            print(f"\n## {part}\n\n{table}\n\nwrote {path} and {trace}")
            results[part] = rows
    return results
