"""Scaling of a patch-parallel decode over the ranks of a torchrun job (issue 12): time, memory and the share of
communication per rank.

Run under torchrun, one process per GPU (NCCL), or without torchrun for the plain single-device baseline:

    torchrun --standalone --nproc-per-node N bench/pp_bench.py --size 4096 --dtype bf16 [--out FILE]
    python bench/pp_bench.py --size 4096 --dtype bf16 [--out FILE]            # world 1, no process group
    torchrun --standalone --nproc-per-node 2 bench/pp_bench.py --device cpu --narrow --size 64   # CPU smoke (gloo)

What it does, on every rank (cuda:LOCAL_RANK, or the CPU with --device cpu):
1. builds the SD-width VAE (`AutoencoderKL.from_preset("sd15", seed=0)`, or with --narrow a two-level
   32/64-channel one) in the chosen dtype, and the same latents on every rank: (1, latent_channels, size / f,
   size / f) with f the VAE's downsample factor (8 for sd15, 2 for --narrow), so the image is size x size;
2. with a process group (torchrun): `vae.enable_patch_parallel()`, so each rank decodes its band of rows and the
   full image is gathered on every rank; without one: the ordinary single-device decode (the fast path on CUDA,
   the PyTorch modules on the CPU, where a world-1 process group runs the ops' PyTorch references instead);
3. warms up (compiles, autotunes), then checks correctness: the gathered decode against a single-device decode
   of the same latents on rank 0 (rel L2 = ||a - b|| / ||b||, b the single-device image), skipped with the
   reason printed when that decode does not fit rank 0's memory (or with --no-check); whether every rank holds
   the same bits;
4. times the decode (CUDA events on CUDA, time.perf_counter on the CPU; all ranks start each call together; the
   median of --iters >= 5 calls), measures the call's peak memory (torch.cuda.max_memory_allocated minus the
   memory allocated before the call, GiB; n/a on the CPU);
5. ONE extra, instrumented call (with a process group): `sdvae_fast.parallel.RowParallelHooks` is replaced, in
   this script only, by a subclass whose `_all_gather` (every halo, GroupNorm-statistics, key/value and result
   exchange) and `end_stage` (the per-stage all-reduced flag) are timed; on CUDA each is bracketed by
   torch.cuda.synchronize() and perf_counter, which PERTURBS that call (the host waits for every collective,
   so no overlap of communication with compute is left); the timed calls of step 4 are not instrumented. The
   communication time includes waiting for slower peers (load imbalance shows up as communication).

Rank 0 prints one markdown row per rank and a summary line (world, size, dtype, the slowest rank's median ms,
peak GiB max over ranks, communication share), and appends them to --out when given.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

#: The narrow config of --narrow (a CPU smoke run): every unit type of the decoder, two levels (f = 2).
NARROW = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = float(2 ** 30)
HEADER = ("| world | rank | latent rows | size | dtype | device | median ms | min ms | peak GiB | comm ms* "
          "| comm share* | collectives* |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (module docstring). Exits with status 2 (argparse) for a bad value: --iters < 5,
    --warmup < 0, --size < 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="image side in pixels (default 4096)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model and latents dtype (fp32)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (cuda:LOCAL_RANK, NCCL) or cpu (gloo, a smoke run); default cuda")
    parser.add_argument("--narrow", action="store_true",
                        help="the narrow two-level VAE (block_out_channels 32, 64; 8 groups; 1 layer per block)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before the check and timing (2)")
    parser.add_argument("--iters", type=int, default=7, help="timed calls, at least 5; the median is reported (7)")
    parser.add_argument("--no-check", action="store_true", help="skip the single-device correctness check")
    parser.add_argument("--out", type=Path, help="append the markdown rows and the summary line to this file")
    args = parser.parse_args(argv)
    if args.iters < 5:
        parser.error(f"--iters must be at least 5 (the median of >= 5 calls), got {args.iters}")
    if args.warmup < 0 or args.size < 1:
        parser.error("--warmup must be >= 0 and --size >= 1")
    return args


def log(rank: int, message: str) -> None:
    """Print a progress message on rank 0 only (to stdout, flushed)."""
    if rank == 0:
        print(message, flush=True)


def setup(args: argparse.Namespace) -> tuple:
    """(device, distributed, rank, world) for this process.

    Under torchrun (WORLD_SIZE in the environment) a process group is started: NCCL on cuda:LOCAL_RANK, gloo with
    --device cpu. Without torchrun: world 1, no process group, cuda:0 or the CPU.
    Raises:
        RuntimeError: --device cuda without CUDA, or LOCAL_RANK names a GPU this machine does not have.
    """
    distributed = "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but CUDA is not available (use --device cpu for a smoke run)")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                               f"start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device, True, dist.get_rank(), dist.get_world_size()
    return device, False, 0, 1


def build_vae(args: argparse.Namespace, device: torch.device):
    """The sd15-architecture VAE (seeded random weights, seed 0; --narrow: the NARROW config) in --dtype on
    `device`, eval mode, no gradients. Raises what `AutoencoderKL.from_preset` raises."""
    from sdvae_fast import AutoencoderKL

    overrides = NARROW if args.narrow else {}
    vae = AutoencoderKL.from_preset("sd15", seed=0, dtype=DTYPES[args.dtype], **overrides)
    return vae.to(device).requires_grad_(False)


def make_latents(vae, size: int, world: int, device: torch.device) -> torch.Tensor:
    """The same latents on every rank: (1, latent_channels, size / f, size / f), standard normal from a seeded CPU
    generator (seed 1), in the VAE's dtype on `device`.

    Raises:
        ValueError: size is not a positive multiple of f, or the latents have fewer rows than there are ranks
            (every rank needs at least one latent row).
    """
    factor = vae.downsample_factor
    if size % factor or size < factor:
        raise ValueError(f"--size {size} must be a positive multiple of the VAE's downsample factor {factor}")
    rows = size // factor
    if rows < world:
        raise ValueError(f"{world} ranks but only {rows} latent rows at --size {size}; use a larger --size")
    z = torch.randn(1, vae.config.latent_channels, rows, rows, generator=torch.Generator().manual_seed(1))
    return z.to(device=device, dtype=vae.dtype)


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """vae.decode(z).sample without autograd: (N, 3, f*h, f*w) in the VAE's dtype (patch parallel when enabled)."""
    with torch.no_grad():
        return vae.decode(z).sample


def sync(device: torch.device, distributed: bool) -> None:
    """Wait for this device's queued work, then for every rank to get here (a one-element all_reduce on the
    group's device, then a device sync again), so timed calls start together."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if distributed:
        dist.all_reduce(torch.zeros(1, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def checksum(image: torch.Tensor) -> tuple:
    """(sum, sum of squares) of `image` in fp64, Python floats: equal on two ranks when their bits (almost surely)
    are."""
    x = image.detach().to(torch.float64)
    return x.sum().item(), x.square().sum().item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (a, b the same shape; b the reference). Returns inf when ||b|| is 0."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    denominator = b64.norm().item()
    return (a64 - b64).norm().item() / denominator if denominator else float("inf")


def check(vae, z: torch.Tensor, image: torch.Tensor, rank: int, distributed: bool, skip: bool) -> str:
    """The correctness line: the gathered patch-parallel `image` (1, 3, size, size) against a single-device decode
    of `z` on rank 0 (rel L2), and whether every rank's image has the same checksum. Collective under a process
    group (every rank calls it; the others wait while rank 0 decodes). Without a process group there is
    nothing to compare: "n/a". A single-device decode that runs out of GPU memory is reported as skipped, not
    raised; any other error raises on rank 0 (and the job fails)."""
    if not distributed:
        return "n/a (no process group: this is the single-device decode itself)"
    sums: List[Optional[tuple]] = [None] * dist.get_world_size()
    dist.all_gather_object(sums, checksum(image))
    same = "the same bits on every rank" if all(s == sums[0] for s in sums) else \
        f"ranks DIFFER (fp64 sums by rank: {[s[0] for s in sums]})"
    result = [None]
    if rank == 0:
        if skip:
            result[0] = "single-device check skipped (--no-check)"
        else:
            vae.disable_patch_parallel()
            try:
                reference = decode(vae, z)
                result[0] = f"rel L2 vs a single-device decode on rank 0: {rel_l2(image, reference):.3e}"
                del reference
            except torch.cuda.OutOfMemoryError as error:
                first = str(error).splitlines()[0] if str(error) else "out of memory"
                result[0] = f"single-device check skipped: the full decode does not fit rank 0's GPU ({first})"
            finally:
                vae.enable_patch_parallel()
                if z.is_cuda:
                    torch.cuda.empty_cache()
    dist.broadcast_object_list(result, src=0)
    return f"{result[0]}; {same}"


def time_decode(vae, z: torch.Tensor, iters: int, device: torch.device, distributed: bool) -> List[float]:
    """Milliseconds of `iters` decodes on this rank: CUDA events around each call on CUDA (the call's GPU time,
    host launch gaps included), time.perf_counter on the CPU. All ranks start each call together (`sync`); each
    call's output is freed before the next."""
    times = []
    for _ in range(iters):
        sync(device, distributed)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            image = decode(vae, z)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            image = decode(vae, z)
            times.append((time.perf_counter() - t0) * 1e3)
        del image
    return times


def peak_memory_gib(vae, z: torch.Tensor, device: torch.device, distributed: bool) -> Optional[float]:
    """GiB one decode call adds at its peak on this rank: torch.cuda.max_memory_allocated during the call minus
    torch.cuda.memory_allocated before it (the model and latents excluded, the output included). None on the
    CPU (not measured)."""
    if device.type != "cuda":
        return None
    sync(device, distributed)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    image = decode(vae, z)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del image
    return peak / GIB


class CommTimer:
    """Seconds spent inside the timed collectives (perf_counter; on CUDA bracketed by torch.cuda.synchronize, so
    the time is the collective's own, waits for peers included, and the caller's queued compute is not)."""

    def __init__(self) -> None:
        """An empty tally: 0 s, 0 calls."""
        self.seconds, self.calls, self._depth = 0.0, 0, 0

    def timed(self, function, cuda: bool):
        """Call `function()` and add its time (outermost call only, so nested timed calls count once); returns
        its result and re-raises its errors."""
        if self._depth:
            return function()
        self._depth += 1
        try:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = function()
            if cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return result
        finally:
            self._depth -= 1


@contextmanager
def instrumented_hooks(timer: CommTimer) -> Iterator[None]:
    """Within the block, `sdvae_fast.parallel` builds a subclass of `RowParallelHooks` whose `_all_gather` and
    `end_stage` (every collective of a patch-parallel call) are timed by `timer`; restored on exit, also on
    errors. This script's only change to the library, and only for the instrumented call."""
    from sdvae_fast import parallel

    base = parallel.RowParallelHooks

    class TimedHooks(base):
        """RowParallelHooks with its collectives timed (PERTURBING on CUDA: a host sync before and after each)."""

        def _all_gather(self, t: torch.Tensor) -> List[torch.Tensor]:
            """`RowParallelHooks._all_gather`, timed."""
            return timer.timed(lambda: base._all_gather(self, t), t.is_cuda)

        def end_stage(self, y: torch.Tensor, check_finite: bool) -> bool:
            """`RowParallelHooks.end_stage` (the flag's all-reduce, and with `check_finite` the isfinite scan of
            y), timed."""
            return timer.timed(lambda: base.end_stage(self, y, check_finite), y.is_cuda)

    parallel.RowParallelHooks = TimedHooks
    try:
        yield
    finally:
        parallel.RowParallelHooks = base


def comm_share(vae, z: torch.Tensor, device: torch.device, distributed: bool) -> Dict[str, float]:
    """One instrumented decode: {"total_ms": the call's wall time (perf_counter, device-synced), "comm_ms": time
    inside the collectives, "share": comm_ms / total_ms, "calls": collectives timed}. PERTURBING on CUDA
    (`instrumented_hooks`). Without a process group: {} (no collectives)."""
    if not distributed:
        return {}
    timer = CommTimer()
    sync(device, distributed)
    with instrumented_hooks(timer):
        t0 = time.perf_counter()
        image = decode(vae, z)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - t0
    del image
    return {"total_ms": total * 1e3, "comm_ms": timer.seconds * 1e3, "share": timer.seconds / total,
            "calls": timer.calls}


def row(r: dict) -> str:
    """One rank's markdown row (HEADER's columns) from its result dict (`main`)."""
    peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    comm = r["comm"]
    comm_cols = (f"{comm['comm_ms']:.1f} | {100 * comm['share']:.1f}% | {comm['calls']}" if comm
                 else "n/a | n/a | n/a")
    return (f"| {r['world']} | {r['rank']} | {r['rows'][0]}-{r['rows'][1] - 1} | {r['size']} | {r['dtype']} | "
            f"{r['device']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {peak} | {comm_cols} |")


def summary(results: List[dict], check_line: str) -> str:
    """The summary line over every rank's result dict: world, size, dtype, the slowest rank's median ms, peak GiB
    max over ranks, communication share (max and range over ranks, from the instrumented call), the check."""
    first = results[0]
    slowest = max(results, key=lambda r: r["median_ms"])
    peaks = [r["peak_gib"] for r in results if r["peak_gib"] is not None]
    peak = f"{max(peaks):.2f} GiB" if peaks else "n/a (CPU)"
    shares = [r["comm"]["share"] for r in results if r["comm"]]
    comm = (f"{100 * max(shares):.1f}% max over ranks ({100 * min(shares):.1f}-{100 * max(shares):.1f}%, one "
            f"instrumented call, perturbing)" if shares else "n/a (no process group)")
    mode = "patch parallel" if first["distributed"] else "single device, no process group"
    return (f"**summary**: world {first['world']} ({mode}), size {first['size']}^2, {first['dtype']}, "
            f"{first['device_name']}{', narrow VAE' if first['narrow'] else ''}: median {slowest['median_ms']:.1f} ms "
            f"(slowest rank, {slowest['rank']}), peak {peak} per call (max over ranks), comm share {comm}; "
            f"check: {check_line}")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark (module docstring); returns the exit status (0). Errors of any step raise; under a
    process group a failing decode raises the same `PatchParallelError` on every rank."""
    args = parse_args(argv)
    device, distributed, rank, world = setup(args)
    try:
        from sdvae_fast.parallel import row_bands

        vae = build_vae(args, device)
        z = make_latents(vae, args.size, world, device)
        if distributed:
            vae.enable_patch_parallel()
        bands = row_bands(z.shape[2], world)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        log(rank, f"world {world}, latents {tuple(z.shape)} {args.dtype} on {name}, latent bands {bands}; "
                  f"warming up ({args.warmup} calls)")
        for _ in range(args.warmup):
            image = decode(vae, z)
            del image
        image = decode(vae, z)
        check_line = check(vae, z, image, rank, distributed, args.no_check)
        del image
        log(rank, f"check: {check_line}\ntiming {args.iters} calls")
        times = time_decode(vae, z, args.iters, device, distributed)
        peak = peak_memory_gib(vae, z, device, distributed)
        comm = comm_share(vae, z, device, distributed)
        mine = dict(world=world, rank=rank, rows=bands[rank], size=args.size, dtype=args.dtype,
                    device=str(device), device_name=name, narrow=args.narrow, distributed=distributed,
                    median_ms=statistics.median(times), min_ms=min(times), peak_gib=peak, comm=comm)
        results = [mine]
        if distributed:
            results = [None] * world
            dist.all_gather_object(results, mine)
        if rank == 0:
            lines = [HEADER] + [row(r) for r in results] + [
                "", "*: from one extra instrumented call (a host sync around every collective: perturbing); the "
                    "median, min and peak come from uninstrumented calls", "", summary(results, check_line)]
            text = "\n".join(lines)
            print(text, flush=True)
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(("\n" if args.out.stat().st_size else "") + text + "\n")
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
