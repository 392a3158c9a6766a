"""Benchmark the GSC conv and the 4-phase upsample conv at the real decoder shapes of a 512^2 and 1024^2 decode.

Run on a CUDA GPU:  python bench/bench_conv.py --out DIR  [--sizes 512 1024]

For every shape it first checks the kernel against an fp32 eager computation of the same bf16 inputs (relative
L2 error, reported next to PyTorch's own bf16 error), then times with `triton.testing.do_bench(...,
return_mode="median")`:
  - GSC units (GroupNorm(32) + SiLU + conv, bias, optional residual): `sdvae_fast.ops.gn_silu_conv2d` (statistics
    included), the conv kernel alone with precomputed scale/shift, eager `group_norm + silu + conv2d` in NCHW and
    in channels_last, and a plain bf16 `torch.matmul` of the conv's GEMM shape (M = N*H*W, K = C_in*kh*kw,
    N = C_out);
  - upsample units: `sdvae_fast.ops.upsample_conv2d` against eager `interpolate(nearest) + conv2d` (channels_last)
    and against `conv_transpose2d` with a 4x4 stride-2 kernel (the best published alternative).
TFLOP/s count 2 FLOPs per multiply-accumulate of the work each variant does; the upsample rows also give the
"effective" rate of the 9-tap conv they replace. "% peak" is against 790 TFLOP/s, the dense bf16 matrix rate
measured on an H200 (docs/design.md, section 2). Results go to DIR/conv_bench.csv (every measurement),
DIR/conv_bench_summary.csv (the target ratios per case) and DIR/conv_bench.md (both tables).
Exits with status 2 and a message when no CUDA device is present.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time

import torch
import torch.nn.functional as F

PEAK_TFLOPS = 790.0
GROUPS = 32


def _decoder_gsc_shapes(image_size: int):
    """(name, C_in, C_out, side, kernel, residual) of the distinct GSC convs of a decode to image_size^2."""
    s = image_size // 8  # latent side
    return [
        ("mid/up0 3x3 512->512", 512, 512, s, 3, True),
        ("up1 3x3 512->512", 512, 512, 2 * s, 3, True),
        ("up2 conv1 3x3 512->256", 512, 256, 4 * s, 3, False),
        ("up2 3x3 256->256", 256, 256, 4 * s, 3, True),
        ("up3 conv1 3x3 256->128", 256, 128, 8 * s, 3, False),
        ("up3 3x3 128->128", 128, 128, 8 * s, 3, True),
        ("conv_out 3x3 128->3", 128, 3, 8 * s, 3, False),
    ]


def _decoder_shortcut_shapes(image_size: int):
    """(name, C_in, C_out, side) of the 1x1 shortcut convs (plain conv + residual add in the epilogue)."""
    s = image_size // 8
    return [("up2 shortcut 1x1 512->256", 512, 256, 4 * s), ("up3 shortcut 1x1 256->128", 256, 128, 8 * s)]


def _decoder_upsample_shapes(image_size: int):
    """(name, channels, input side) of the three upsample convs (nearest 2x, then 3x3, C -> C)."""
    s = image_size // 8
    return [("upsample 512ch", 512, s), ("upsample 512ch", 512, s * 2), ("upsample 256ch", 256, s * 4)]


@contextlib.contextmanager
def _exact_fp32():
    """fp32 references without TF32 (on by default for cuDNN convs on GPUs), so they are exact to fp32."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


class Bench:
    """Collects timed rows and writes them as CSV and markdown."""

    def __init__(self, warmup_ms: int, rep_ms: int):
        import triton.testing

        self._do_bench = triton.testing.do_bench
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.rows: list[dict] = []
        self.summary: list[dict] = []  # one row per case: the ratios the targets are stated in

    def time_ms(self, fn) -> float:
        return float(self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))

    def add(self, size, case, shape, variant, ms, flops, baseline_ms=None, check="", model=None):
        """Record one timing; `model`, a row of the static cost model (`ceiling_for`), adds its estimate: the
        fraction of the tensor rate the compiled loop allows, its bound pipe and tiles, and measured / estimate
        (both against the 790 TFLOP/s floor), the calibration of the model."""
        tflops = flops / ms / 1e9
        row = {"decode": f"{size}^2", "case": case, "shape": shape, "variant": variant, "ms": round(ms, 4),
               "TFLOP/s": round(tflops, 1), "% of 790": round(100 * tflops / PEAK_TFLOPS, 1),
               "speedup vs baseline": "" if baseline_ms is None else round(baseline_ms / ms, 2), "check": check}
        if model is not None:
            row.update({"model frac": model["tensor_fraction"], "model bound": model["bound"],
                        "model tiles": model["config"],
                        "measured/model": round(tflops / (model["tensor_fraction"] * PEAK_TFLOPS), 2)})
        self.rows.append(row)
        print(" | ".join(str(v) for v in row.values()), flush=True)
        return row

    def summarize(self, **row) -> None:
        self.summary.append(row)
        print("summary: " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    @staticmethod
    def _fields(rows) -> list:
        """The union of the rows' keys in first-seen order (GSC and upsample summaries differ)."""
        return list(dict.fromkeys(k for row in rows for k in row))

    def _table(self, f, rows) -> None:
        fields = self._fields(rows)
        f.write("| " + " | ".join(fields) + " |\n|" + "---|" * len(fields) + "\n")
        for row in rows:
            f.write("| " + " | ".join(str(row.get(k, "")) for k in fields) + " |\n")

    def write(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        for name, rows in (("conv_bench.csv", self.rows), ("conv_bench_summary.csv", self.summary)):
            with open(os.path.join(out_dir, name), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self._fields(rows), restval="")
                writer.writeheader()
                writer.writerows(rows)
        with open(os.path.join(out_dir, "conv_bench.md"), "w") as f:
            f.write(f"# Conv benchmarks on {torch.cuda.get_device_name()} (bf16, median ms)\n\n")
            f.write("## Ratios (targets: GSC >= 0.8x the GEMM's TFLOP/s and >= 2x faster than eager; upsample >= 2x "
                    "faster than interpolate+conv2d and faster than conv_transpose2d)\n\n")
            self._table(f, self.summary)
            f.write("\n## All measurements\n\nBaseline for speedups: eager NCHW for GSC rows, eager "
                    "interpolate+conv2d for upsample rows.\n\n")
            self._table(f, self.rows)


def _model_rows(path: str) -> list:
    """Rows of the static cost model (`sdvae-fast kernel-report --json`), or [] without the file."""
    from sdvae_fast import kernel_report

    return kernel_report.load_rows(path) if path and os.path.exists(path) else []


def _ceiling(rows: list, op: str, **match):
    """The model's best row for a launch kind (None without rows)."""
    from sdvae_fast import kernel_report

    return kernel_report.ceiling_for(rows, op, **match) if rows else None


def bench_gsc(bench: Bench, size: int, device, model_rows=()) -> None:
    from sdvae_fast import ops
    from sdvae_fast.kernels import conv as conv_kernels

    shapes = [(name, ci, co, side, k, res) for name, ci, co, side, k, res in _decoder_gsc_shapes(size)]
    shapes += [(name, ci, co, side, 1, True) for name, ci, co, side in _decoder_shortcut_shapes(size)]
    for name, c_in, c_out, side, k, has_residual in shapes:
        gn = k == 3  # the 1x1 shortcuts are plain convs
        x = (torch.randn(1, c_in, side, side, device=device) + 0.5).bfloat16()
        x_cl = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(c_out, c_in, k, k, device=device) / (c_in * k * k) ** 0.5).bfloat16()
        w_cl = w.contiguous(memory_format=torch.channels_last)
        b = torch.randn(c_out, device=device).bfloat16()
        gamma = (torch.rand(c_in, device=device) + 0.5).bfloat16() if gn else None
        beta = (torch.randn(c_in, device=device) * 0.2).bfloat16() if gn else None
        res = torch.randn(1, c_out, side, side, device=device).bfloat16().contiguous(
            memory_format=torch.channels_last) if has_residual else None
        pad = k // 2

        def eager(inp, weight, dtype=torch.bfloat16):
            h = inp.to(dtype)
            if gn:
                h = F.silu(F.group_norm(h, GROUPS, gamma.to(dtype), beta.to(dtype), 1e-6))
            y = F.conv2d(h, weight.to(dtype), b.to(dtype), padding=pad)
            return y if res is None else y + res.to(dtype)

        def ours():
            return ops.gn_silu_conv2d(x_cl, w, b, norm_weight=gamma, norm_bias=beta, num_groups=GROUPS,
                                      padding=pad, residual=res)

        with _exact_fp32():
            reference = eager(x_cl, w, torch.float32)
        err, torch_err = _rel_l2(ours(), reference), _rel_l2(eager(x_cl, w_cl), reference)
        check = f"rel {err:.1e} (torch {torch_err:.1e})" + ("" if err <= 2 * torch_err + 1e-3 else " MISMATCH")

        scale = shift = None
        if gn:
            scale, shift = ops.gn_scale_shift(*ops.group_norm_stats(x_cl, GROUPS), gamma, beta)
        m, kk = side * side, c_in * k * k
        flops = 2.0 * m * c_out * kk
        shape = f"1x{c_in}x{side}x{side} -> {c_out}"
        eager_ms = bench.time_ms(lambda: eager(x, w))
        bench.add(size, name, shape, "eager NCHW", eager_ms, flops)
        eager_cl_ms = bench.time_ms(lambda: eager(x_cl, w_cl))
        bench.add(size, name, shape, "eager channels_last", eager_cl_ms, flops, eager_ms)
        ours_ms = bench.time_ms(ours)
        bench.add(size, name, shape, "sdvae_fast op (stats+conv)", ours_ms, flops, eager_ms, check)
        model = _ceiling(model_rows, "conv", k=k, gn=gn, residual=has_residual, emit=False) or _ceiling(
            model_rows, "conv", k=k, gn=gn)
        bench.add(size, name, shape, "conv kernel only", bench.time_ms(
            lambda: conv_kernels.gn_silu_conv2d(x_cl, w, b, scale, shift, res, padding=(pad,) * 4)),
            flops, eager_ms, model=model)
        a_mat = torch.randn(m, kk, device=device).bfloat16()
        b_mat = torch.randn(kk, c_out, device=device).bfloat16()
        matmul_ms = bench.time_ms(lambda: torch.matmul(a_mat, b_mat))
        bench.add(size, name, f"GEMM {m}x{kk}x{c_out}", "torch.matmul bf16", matmul_ms, flops, eager_ms)
        bench.summarize(decode=f"{size}^2", case=name, ours_ms=round(ours_ms, 4),
                        ours_TFLOPs=round(flops / ours_ms / 1e9, 1),
                        x_matmul_rate=round(matmul_ms / ours_ms, 2),
                        speedup_vs_eager_nchw=round(eager_ms / ours_ms, 2),
                        speedup_vs_eager_cl=round(eager_cl_ms / ours_ms, 2), check=check)


def bench_upsample(bench: Bench, size: int, device, model_rows=()) -> None:
    from sdvae_fast import ops

    for name, c, side in _decoder_upsample_shapes(size):
        x = (torch.randn(1, c, side, side, device=device) + 0.5).bfloat16().contiguous(
            memory_format=torch.channels_last)
        w = (torch.randn(c, c, 3, 3, device=device) / (3 * c ** 0.5)).bfloat16()
        w_cl = w.contiguous(memory_format=torch.channels_last)
        b = torch.randn(c, device=device).bfloat16()
        w_t = (torch.randn(c, c, 4, 4, device=device) / (4 * c ** 0.5)).bfloat16().contiguous(
            memory_format=torch.channels_last)

        def eager(dtype=torch.bfloat16):
            up = F.interpolate(x.to(dtype), scale_factor=2.0, mode="nearest")
            return F.conv2d(up, w_cl.to(dtype), b.to(dtype), padding=1)

        with _exact_fp32():
            reference = eager(torch.float32)
        err, torch_err = _rel_l2(ops.upsample_conv2d(x, w, b), reference), _rel_l2(eager(), reference)
        check = f"rel {err:.1e} (torch {torch_err:.1e})" + ("" if err <= 2 * torch_err + 1e-3 else " MISMATCH")
        out_pixels = 4 * side * side
        flops_9tap = 2.0 * out_pixels * c * 9 * c  # the conv on the upsampled tensor
        flops_4phase = 2.0 * out_pixels * c * 4 * c
        flops_transpose = 2.0 * side * side * c * 16 * c  # every input pixel scatters a 4x4 kernel
        shape = f"1x{c}x{side}x{side} -> {2 * side}^2"
        eager_ms = bench.time_ms(eager)
        bench.add(size, name, shape, "eager interpolate+conv2d (CL)", eager_ms, flops_9tap)
        transpose_ms = bench.time_ms(lambda: F.conv_transpose2d(x, w_t, b, stride=2, padding=1))
        bench.add(size, name, shape, "conv_transpose2d 4x4 s2 (CL)", transpose_ms, flops_transpose, eager_ms)
        ours_ms = bench.time_ms(lambda: ops.upsample_conv2d(x, w, b))
        bench.add(size, name, shape, "sdvae_fast 4-phase", ours_ms, flops_4phase, eager_ms, check,
                  model=_ceiling(model_rows, "upsample"))
        bench.add(size, name, shape, "sdvae_fast 4-phase (effective 9-tap rate)", ours_ms, flops_9tap, eager_ms)
        bench.summarize(decode=f"{size}^2", case=f"{name} at {side}^2", ours_ms=round(ours_ms, 4),
                        ours_TFLOPs=round(flops_4phase / ours_ms / 1e9, 1),
                        speedup_vs_interpolate_conv=round(eager_ms / ours_ms, 2),
                        speedup_vs_conv_transpose=round(transpose_ms / ours_ms, 2), check=check)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for conv_bench.csv and conv_bench.md")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="decoded image sides")
    parser.add_argument("--warmup-ms", type=int, default=10, help="do_bench warmup per measurement")
    parser.add_argument("--rep-ms", type=int, default=40, help="do_bench repetition time per measurement")
    parser.add_argument("--model", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs",
                                                        "kernel_report.json"),
                        help="static cost model rows (`sdvae-fast kernel-report --json`) to print beside the "
                             "timings (default docs/kernel_report.json; skipped when missing)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_conv.py needs a CUDA GPU (none found); nothing was measured.", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    device = torch.device("cuda")
    bench = Bench(args.warmup_ms, args.rep_ms)
    start = time.perf_counter()
    print("decode | case | shape | variant | ms | TFLOP/s | % of 790 | speedup | check")
    model_rows = _model_rows(args.model)
    with torch.no_grad():
        for size in args.sizes:
            bench_gsc(bench, size, device, model_rows)
            bench_upsample(bench, size, device, model_rows)
            bench.write(args.out)  # after each size: a run cut short by its time box keeps what it measured
    mismatches = [r for r in bench.rows if "MISMATCH" in r["check"]]
    print(f"wrote {args.out}/conv_bench.csv and .md in {time.perf_counter() - start:.1f} s; "
          f"{len(mismatches)} correctness mismatches")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
