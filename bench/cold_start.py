"""Time from a fresh process with an empty Triton cache to the first 1024^2 sd15 decode, with and without warmup.

Each way runs in fresh processes with its own empty TRITON_CACHE_DIR and autotune table:
- "warmup": `sdvae-fast warmup --preset sd15 --res RES --dtype bf16 --decode` (parallel compile + tuning), then a
  new process that decodes once; the time is both processes' wall time together;
- "no warmup": one process that decodes once, compiling and tuning serially at first use.
Each decode process reports its own time to the first decode too (model build included, weights random).
GPU only (exit code 2 otherwise). Usage: python bench/cold_start.py [--res 1024] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DECODE = """
import time, torch
start = time.perf_counter()
from sdvae_fast import AutoencoderKL
vae = AutoencoderKL.from_preset("sd15", dtype=torch.bfloat16, device="cuda")
z = torch.randn(1, 4, {side}, {side}, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    vae.decode(z)
torch.cuda.synchronize()
print("DECODE_S", time.perf_counter() - start)
"""


def _timed(cmd: list, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    """Run both ways and print (and write) their seconds; returns the exit code (2 without CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--res", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--out", type=Path, help="also write cold_start.json there")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("cold_start.py needs a CUDA GPU; nothing was measured.", file=sys.stderr)
        return 2
    results = {}
    decode = [sys.executable, "-c", DECODE.format(side=args.res // 8)]
    for way in ("warmup", "no warmup"):
        with tempfile.TemporaryDirectory() as folder:
            env = dict(os.environ, TRITON_CACHE_DIR=f"{folder}/triton",
                       SDVAE_FAST_AUTOTUNE_TABLE=f"{folder}/table.json")
            env.pop("TRITON_INTERPRET", None)
            seconds = 0.0
            if way == "warmup":
                seconds += _timed([sys.executable, "-m", "sdvae_fast.cli", "warmup", "--preset", "sd15", "--res",
                                   str(args.res), "--dtype", "bf16", "--decode", "-q"], env)
            seconds += _timed(decode, env)
            results[way] = round(seconds, 1)
            print(f"{way}: {seconds:.1f} s from an empty cache to the first {args.res}^2 decode", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cold_start.json").write_text(json.dumps({"res": args.res, "seconds": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
