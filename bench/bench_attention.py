"""Benchmark the head-dim-512 flash attention kernel against PyTorch's scaled_dot_product_attention (GPU only).

`--head-dim 384` times FLUX.2's small-decoder case instead (three column chunks per program, no padding to 512).

The VAE mid-block case: bf16, one head of dim 512, N = 4096 / 16384 / 65536 tokens (512^2, 1024^2, 2048^2
images). For each N the script first checks correctness (rows spread over the sequence, the last rows included,
against an fp32 reference computed row-block-wise), then times with `triton.testing.do_bench(...,
return_mode="median")`:
- ours, autotuned (the chosen tile config is recorded),
- SDPA with PyTorch's default backend choice (its memory-efficient kernel is the one that accepts head dim 512),
- the kernel's variants with fixed tiles: column split S = 2 (BLOCK_DV 256), S = 4 (BLOCK_DV 128) and unsplit
  (BLOCK_DV 512, accumulator spilling registers), see kernels/attention.py.
It also records which SDPA backends accept head dim 512 in bf16.

FLOPs are 4 * N^2 * D per head (QK^T and PV, 2 per multiply-add); "% peak" is against 790 TFLOP/s, the dense
bf16 matrix rate measured on an H200 (docs/design.md, section 2). Targets from issue 4: at least 1.5x faster than SDPA
at N >= 16384 and at least half the matrix rate.

Usage: python bench/bench_attention.py --out DIR [--head-dim 384]   (writes DIR/attention.csv and DIR/attention.md,
or attention_d384.*; ~60 s on an H200)
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PEAK_TFLOPS = 790.0
HEAD_DIM = 512
# The same tiles as configs in kernels/attention.py's list for head dim 512, so nothing extra is compiled.
VARIANTS = {
    "split2 (BLOCK_DV 256)": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_DK=64, BLOCK_DV=256, num_warps=8, num_stages=2),
    # Fits 227 KiB of shared memory with triton 3.6 too, which stages the whole query tile.
    "split2 (BLOCK_DV 256, BLOCK_N 32)": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_DK=64, BLOCK_DV=256, num_warps=8,
                                              num_stages=2),
    # BLOCK_M 64, not 128: with 128 rows triton 3.6 needs 288 KiB of shared memory (it stages the whole query tile).
    "split4 (BLOCK_DV 128)": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_DK=64, BLOCK_DV=128, num_warps=8, num_stages=2),
    "unsplit (BLOCK_DV 512)": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_DK=64, BLOCK_DV=512, num_warps=8, num_stages=1),
}


def fitting_variants(device) -> dict:
    """The VARIANTS (head dim 384: kernels/attention.py's configs for it) whose shared memory (kernels/attention.py's
    estimate for this triton, bf16) fits `device`; the others are named on stdout and skipped (split2 with
    BLOCK_N 64 needs 256 KiB on triton 3.6)."""
    import triton

    from sdvae_fast.kernels._common import max_shared_memory
    from sdvae_fast.kernels.attention import _smem_bytes, attention_configs, head_dim_block

    variants = VARIANTS
    if HEAD_DIM == 384:  # the kernel's own configs for 384 (three column chunks per program)
        variants = {f"BLOCK_N {c.kwargs['BLOCK_N']}, {c.kwargs['DV_CHUNKS']} x BLOCK_DV {c.kwargs['BLOCK_DV']}":
                    dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in attention_configs(384)}
    limit = max_shared_memory(device)
    kept = {}
    for name, cfg in variants.items():
        tiles = {k: v for k, v in cfg.items() if k.startswith("BLOCK") or k == "DV_CHUNKS"}
        need = _smem_bytes(triton.Config(tiles, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
                           head_dim_block(HEAD_DIM), 2)
        if need <= limit:
            kept[name] = cfg
        else:
            print(f"skipping {name}: needs {need // 1024} KiB of shared memory, the device allows {limit // 1024}")
    return kept


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for attention.csv/.md")
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536], help="sequence lengths")
    parser.add_argument("--no-variants", action="store_true", help="skip timing the fixed-tile variants")
    parser.add_argument("--head-dim", type=int, choices=(512, 384), default=512,
                        help="512 (every kl-f8 VAE's mid block) or 384 (FLUX.2's small decoder, unpadded: three "
                             "column chunks per program); 384 writes attention_d384.csv/.md")
    return parser.parse_args()


def sdpa_backend_support(device) -> dict:
    """Which SDPA backends run bf16 head dim 512 here: {backend name: 'ok' or the first line of its error}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 1, 256, HEAD_DIM, device=device, dtype=torch.bfloat16)
    support = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q)
            torch.cuda.synchronize()
            support[backend.name] = "ok"
        except Exception as error:  # noqa: BLE001 - recording why a backend refuses is the point
            support[backend.name] = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
    return support


def reference_rows(q, k, v, rows, scale):
    """fp32 softmax(q k^T * scale) v for the query `rows` only: (1, 1, len(rows), D), memory len(rows) x N."""
    qr = q[:, :, rows].float()  # (1, 1, R, D)
    scores = qr @ k.float().transpose(-1, -2) * scale  # (1, 1, R, N)
    return torch.softmax(scores, dim=-1) @ v.float()


def rel_l2(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _stem() -> str:
    return "attention" if HEAD_DIM == 512 else f"attention_d{HEAD_DIM}"


def write_results(out: Path, rows_out: list, support: dict) -> None:
    """attention.csv and attention.md in `out` (attention_d384.* for head dim 384), rewritten after every N, so a
    run cut short keeps its rows."""
    with open(out / f"{_stem()}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        writer.writeheader()
        writer.writerows(rows_out)
    with open(out / f"{_stem()}.md", "w") as f:
        f.write(f"# Attention, bf16, 1 head, head dim {HEAD_DIM} ({torch.cuda.get_device_name()})\n\n")
        f.write(f"SDPA backends accepting head dim {HEAD_DIM} (bf16): "
                + ", ".join(f"{name}: {status}" for name, status in support.items()) + "\n\n")
        f.write("| " + " | ".join(rows_out[0]) + " |\n|" + "---|" * len(rows_out[0]) + "\n")
        for row in rows_out:
            f.write("| " + " | ".join(str(value) for value in row.values()) + " |\n")


def main() -> int:
    global HEAD_DIM
    args = parse_args()
    HEAD_DIM = args.head_dim
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.",
              file=sys.stderr)
        return 2
    import triton.testing

    from sdvae_fast import autotune_table
    from sdvae_fast.kernels.attention import _autotuned_kernel, attention_flops, attention_forward, head_dim_block

    start = time.time()
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    scale = HEAD_DIM ** -0.5
    support = sdpa_backend_support(device)
    print(f"SDPA backends for bf16 head dim {HEAD_DIM}:", support)

    rows_out = []
    for n in args.n:
        gen = torch.Generator(device=device).manual_seed(n)
        q, k, v = (torch.randn(1, 1, n, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen) + m
                   for m in (0.1, -0.1, 0.2))
        flops = attention_flops(1, n, n, HEAD_DIM)

        # Correctness first: 256 rows spread over the sequence, the last row included.
        rows = torch.linspace(0, n - 1, 256, device=device).round().long()
        ours = attention_forward(q, k, v, scale)
        theirs = F.scaled_dot_product_attention(q, k, v, scale=scale)
        reference = reference_rows(q, k, v, rows, scale)
        err_ours, err_sdpa = rel_l2(ours[:, :, rows], reference), rel_l2(theirs[:, :, rows], reference)
        ok = bool(torch.isfinite(ours).all()) and err_ours <= 2 * err_sdpa + 1e-3
        config = autotune_table.last_config(_autotuned_kernel(head_dim_block(HEAD_DIM)))
        print(f"N={n}: rel L2 ours {err_ours:.2e}, SDPA {err_sdpa:.2e} -> {'ok' if ok else 'WRONG'}; "
              f"autotuned {config}")

        timings = {"ours (autotuned)": lambda: attention_forward(q, k, v, scale),
                   "sdpa (default backend)": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)}
        if not args.no_variants:
            for name, cfg in fitting_variants(device).items():
                timings[f"ours {name}"] = lambda cfg=cfg: attention_forward(q, k, v, scale, config=cfg)
        results = {}
        for name, fn in timings.items():
            try:
                results[name] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as error:  # noqa: BLE001 - a variant that does not compile is a result too
                print(f"  {name}: failed ({type(error).__name__}: {str(error)[:100]})")
                results[name] = float("nan")
        sdpa_ms = results["sdpa (default backend)"]
        for name, ms in results.items():
            tflops = flops / (ms * 1e-3) / 1e12
            row = {
                "N": n, "impl": name, "ms": round(ms, 4), "TFLOP/s": round(tflops, 1),
                "% of 790": round(100 * tflops / PEAK_TFLOPS, 1), "speedup vs sdpa": round(sdpa_ms / ms, 2),
                "correct": ok, "rel_l2 ours": f"{err_ours:.2e}", "rel_l2 sdpa": f"{err_sdpa:.2e}",
                "config": str(config) if name == "ours (autotuned)" else "",
            }
            rows_out.append(row)
            print(f"  {name:32s} {ms:9.3f} ms {tflops:7.1f} TFLOP/s {row['% of 790']:5.1f}% "
                  f"x{row['speedup vs sdpa']:.2f} vs SDPA")
        del q, k, v, ours, theirs
        torch.cuda.empty_cache()
        write_results(args.out, rows_out, support)

    print(f"wrote {args.out / (_stem() + '.csv')} and {args.out / (_stem() + '.md')} in {time.time() - start:.1f} s")
    return 0 if all(row["correct"] for row in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
