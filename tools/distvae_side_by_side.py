"""DistVAE (xDiT's patch-parallel VAE) and sdvae_fast's patch-parallel decode, side by side, against one process.

For each world size and latent shape it decodes the same seeded latents three ways and prints a markdown table:
  (a) the reference: a plain `diffusers.AutoencoderKL.decode` in one process (this script's parent process);
  (b) DistVAE: the same diffusers VAE with its decoder replaced by `distvae.vae.parallelize_decoder(vae, None)`,
      decoded by every rank of the world (`vae.decode(z).sample`, the full image on every rank);
  (c) ours: `sdvae_fast.parallel.decode_patch_parallel(vae, z)` on sdvae_fast's `AutoencoderKL` holding the same
      weights (the fast path's units; the PyTorch ops on CPU, the Triton kernels on CUDA).
It reports the relative L2 error ||x - a|| / ||a|| and the max abs error of (b) and (c) against (a), whether every
rank got the same bits, and the wall time per decode (the fastest of `--repeats`, from a barrier before to a
barrier after, so the slowest rank counts), labelled with the device it ran on.

DistVAE is never a dependency of sdvae_fast and this script installs nothing. Put it in a folder of its own and
point PYTHONPATH at it (its declared requirements, torch>=2.2 and diffusers>=0.30.3, are already here):

    python -m pip install --target /tmp/distvae --no-deps distvae==0.1.0
    PYTHONPATH=/tmp/distvae python tools/distvae_side_by_side.py --world 1 2 4 --shapes 13x16 16x16 \
        --out /tmp/distvae_side_by_side.md

Without DistVAE importable the table still has the reference and ours, and DistVAE's columns say why not.

What DistVAE 0.1.0 does (read from its wheel, summarised here; nothing of it is copied):
- `parallelize_decoder(vae, vae_group)` picks `DecoderAdapter` for a decoder built from `UpDecoderBlock2D`s ending
  in a GroupNorm (diffusers' AutoencoderKL) and replaces `vae.decoder` in place; `vae.decode` (post_quant_conv,
  then the decoder) keeps working. Inference only: the adapter raises when grad is enabled.
- `conv_in` and the mid block (its attention included) run on the whole latent map on every rank, unsplit; after
  the mid block each rank keeps a band of latent rows (uneven bands allowed, the taller ones first), every later
  conv gets its halo rows from the neighbours (`batch_isend_irecv`), every GroupNorm all-reduces per-group sums,
  then the squared deviations about the whole image's mean; the bands are all-gathered at the end.
- Process group: any `torch.distributed` group (None = the world). Backend and device are not hard-coded: the
  collectives run on the tensors' device, so gloo on CPU works (its own helper picks nccl when CUDA is there,
  gloo otherwise). So no CUDA is needed; `--device cuda` (NCCL, rank r on cuda:r) needs one GPU per rank, and on
  a one-GPU machine only `--world 1` runs there (a timing comparison, no split).

Usage:
    python tools/distvae_side_by_side.py [--world 1 2 4] [--shapes 13x16 16x16] [--batch 1] [--preset sd15]
        [--widths 32,64,64,64] [--device cpu|cuda] [--threads 1] [--repeats 2] [--timeout 600] [--out FILE]
Exit status: 0 when every run finished (whatever the errors it measured), 1 when a world failed or timed out,
2 for bad arguments or a device that is not there.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = ("not importable: `python -m pip install --target /tmp/distvae --no-deps distvae==0.1.0`, "
                "then run with PYTHONPATH=/tmp/distvae")


def import_sdvae_fast():
    """The installed sdvae_fast package (`pip install -e .` in this checkout; README's set-up).

    Raises ImportError, naming the install command, when it is not installed.
    """
    try:
        import sdvae_fast
        import sdvae_fast.kernels  # noqa: F401  (mapped from kernels/ by the install)
    except ImportError as e:
        raise ImportError(f"sdvae_fast is not installed: run `python3 -m pip install -e .` in {ROOT} ({e})") from e
    return sdvae_fast


def distvae_version() -> Tuple[Optional[str], str]:
    """(version, "") when DistVAE's `parallelize_decoder` imports, else (None, the reason as one line)."""
    try:
        from distvae.vae import parallelize_decoder  # noqa: F401
    except Exception as e:  # ImportError, or anything its import raises on this torch/diffusers
        return None, f"{INSTALL_HINT} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        from importlib.metadata import version

        return version("distvae"), ""
    except Exception:
        return "unknown", ""


def commit_of(root: Path = ROOT) -> str:
    """The sdvae_fast commit being measured: `git describe --always --dirty` of `root`, else $SDVAE_FAST_COMMIT
    (for a tree without .git, as gpu_check.sh does), else "unknown". Never raises."""
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except Exception:
        pass
    return os.environ.get("SDVAE_FAST_COMMIT", "unknown")


def parse_shape(text: str) -> Tuple[int, int]:
    """"13x16" -> (13, 16): latent rows x columns. Raises argparse.ArgumentTypeError for anything else."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a latent shape is ROWSxCOLS, e.g. 13x16; got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"latent rows and columns must be positive, got {text!r}")
    return h, w


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0 and released) for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_models(args, device: str):
    """(ours, plain): sdvae_fast's `AutoencoderKL.from_preset(args.preset, seed=args.seed)` (narrowed by
    `args.widths` / `args.groups` when given) and a plain `diffusers.AutoencoderKL` with the same config and weights
    (`from_config(ours.config)` + `load_state_dict`), both fp32, eval mode, on `device`. The same arguments give the
    same bits in every process. Raises what from_preset raises for a bad preset or override (ValueError/TypeError)
    and RuntimeError when the state dicts do not match."""
    import diffusers
    import torch

    sdvae_fast = import_sdvae_fast()
    overrides = {}
    if args.widths:
        levels = len(args.widths)
        overrides.update(block_out_channels=tuple(args.widths), down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels)
    if args.groups:
        overrides["norm_num_groups"] = args.groups
    ours = sdvae_fast.AutoencoderKL.from_preset(args.preset, seed=args.seed, dtype=torch.float32, **overrides)
    plain = diffusers.AutoencoderKL.from_config(ours.config)
    plain.load_state_dict(ours.state_dict())
    return ours.to(device).eval(), plain.to(device).eval()


def make_latents(batch: int, channels: int, shape: Tuple[int, int], seed: int, device: str):
    """Seeded standard-normal latents, float32 (batch, channels, rows, cols) on `device` (drawn on CPU, so the
    same on every rank and device)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1000 * shape[0] + shape[1])
    return torch.randn(batch, channels, *shape, generator=g, dtype=torch.float32).to(device)


def errors(x, ref) -> Tuple[float, float]:
    """(relative L2 ||x - ref|| / ||ref||, max |x - ref|) in float64 on CPU; x and ref: same-shape float tensors.
    Raises ValueError when the shapes differ."""
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(x.shape)} differs from the reference's {tuple(ref.shape)}")
    x64, r64 = x.detach().cpu().double(), ref.detach().cpu().double()
    diff = x64 - r64
    return (diff.norm() / r64.norm()).item(), diff.abs().max().item()


def digest(x) -> str:
    """A hash of a tensor's bytes (CPU copy) to compare results across ranks exactly."""
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def sync(device: str) -> None:
    """Wait for queued GPU work when `device` is CUDA (timing); nothing on CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable, repeats: int, device: str, distributed: bool):
    """(fn's last result, the fastest wall time in seconds over `repeats` calls). Each call is fenced by device
    syncs and, when `distributed`, by `torch.distributed.barrier()` on both sides, so the time is the slowest
    rank's. Runs under torch.no_grad(); raises whatever fn raises."""
    import torch
    import torch.distributed as dist

    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        sync(device)
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn()
        sync(device)
        if distributed:
            dist.barrier()
        best = min(best, time.perf_counter() - t0)
    return out, best


def one_line(e: BaseException) -> str:
    """`Type: first line of the message` of an exception, for a table cell."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def reference_runs(args) -> Dict[str, dict]:
    """The single-process diffusers decodes, one per shape in args.shapes, in this process (args.threads threads,
    device args.device; cuda:0 for CUDA). Returns {"HxW": {"ref": CPU float32 image (N, 3, 8H, 8W) for an sd15-like
    VAE, "seconds": the fastest of args.repeats, "max_abs": max |ref|, "latents" / "image": the two shapes, and with
    args.fp64_floor "fp64_floor": errors() of that fp32 image against the same decode in float64}}.
    Raises what build_models raises."""
    import torch

    device = "cuda:0" if args.device == "cuda" else "cpu"
    ours, plain = build_models(args, device)
    channels = ours.config.latent_channels
    del ours
    runs = {}
    for shape in args.shapes:
        z = make_latents(args.batch, channels, shape, args.seed, device)
        image, seconds = timed(lambda: plain.decode(z).sample, args.repeats, device, distributed=False)
        runs[f"{shape[0]}x{shape[1]}"] = {"ref": image.float().cpu(), "seconds": seconds,
                                          "max_abs": image.abs().max().item(), "latents": tuple(z.shape),
                                          "image": tuple(image.shape)}
    if args.fp64_floor:
        plain = plain.double()
        for shape in args.shapes:
            key = f"{shape[0]}x{shape[1]}"
            z = make_latents(args.batch, channels, shape, args.seed, device).double()
            with torch.no_grad():
                runs[key]["fp64_floor"] = errors(runs[key]["ref"], plain.decode(z).sample)
    plain = None  # free the weights before the ranks start
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return runs


def worker(rank: int, world: int, port: int, args, refs: Dict[str, dict], outdir: str) -> None:
    """One rank of a world: join the group (gloo on CPU, NCCL with cuda:rank), build both VAEs, and for every shape
    decode with DistVAE and with ours, timing both and comparing each with the reference. Rank 0 writes
    `outdir/world{world}.json` ({"rows": [...], "distvae": version or None, "distvae_reason": str}).

    Args: rank/world: this rank and the world size; port: the rendezvous port on 127.0.0.1; args: the parsed
    arguments; refs: reference_runs()'s result (CPU tensors); outdir: an existing folder.
    A method that raises is recorded with its error and the others still run; an error outside the methods (group
    setup, model building) propagates, which makes torch.multiprocessing report this rank as failed.
    """
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    import_sdvae_fast()
    from sdvae_fast.parallel import decode_patch_parallel

    device = "cpu"
    if args.device == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.collective_timeout))
    try:
        ours, dv = build_models(args, device)
        version, reason = distvae_version()
        if version is not None:
            from distvae.vae import parallelize_decoder

            try:
                reason = f"adapter {parallelize_decoder(dv, None)}"
            except Exception as e:
                version, reason = None, f"parallelize_decoder failed: {one_line(e)}"
        channels = ours.config.latent_channels
        rows = []
        for shape in args.shapes:
            key = f"{shape[0]}x{shape[1]}"
            z = make_latents(args.batch, channels, shape, args.seed, device)
            row = {"world": world, "shape": key, "latents": refs[key]["latents"], "image": refs[key]["image"],
                   "ref_seconds": refs[key]["seconds"], "ref_max_abs": refs[key]["max_abs"]}
            methods = [("ours", lambda: decode_patch_parallel(ours, z))]
            if version is not None:
                methods.insert(0, ("distvae", lambda: dv.decode(z).sample))
            else:
                row["distvae"] = {"ran": False, "why": reason}
            for name, fn in methods:
                try:
                    out, seconds = timed(fn, args.repeats, device, distributed=True)
                    hashes: List[Optional[str]] = [None] * world
                    dist.all_gather_object(hashes, digest(out))
                    rel, max_abs = errors(out, refs[key]["ref"])
                    row[name] = {"ran": True, "rel_l2": rel, "max_abs": max_abs, "seconds": seconds,
                                 "ranks_identical": len(set(hashes)) == 1}
                except Exception as e:
                    row[name] = {"ran": False, "why": one_line(e)}
            rows.append(row)
        if rank == 0:
            with open(os.path.join(outdir, f"world{world}.json"), "w") as f:
                json.dump({"rows": rows, "distvae": version, "distvae_reason": reason}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(world: int, args, refs: Dict[str, dict]) -> Tuple[List[dict], str]:
    """Spawn `world` ranks of `worker` and wait at most args.timeout seconds. Returns (rows, problem): the rows rank
    0 wrote, and "" or why the world produced none (a rank's error, a time-out: the ranks are then terminated, or
    not enough GPUs for `--device cuda`). Never raises for a failing rank."""
    import torch
    import torch.multiprocessing as mp

    if args.device == "cuda" and torch.cuda.device_count() < world:
        return [], (f"not run: --device cuda puts rank r on cuda:r (NCCL), so {world} ranks need {world} GPUs; "
                    f"this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(worker, args=(world, free_port(), args, refs, outdir), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + args.timeout
        problem = ""
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    problem = f"timed out after {args.timeout} s (ranks terminated)"
                    for p in ctx.processes:
                        if p.is_alive():
                            p.terminate()
                    for p in ctx.processes:
                        p.join(10)
                        if p.is_alive():
                            p.kill()
                    break
        except Exception as e:  # ProcessRaisedException / ProcessExitedException: the other ranks are ended too
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            problem = "a rank failed: " + (lines[-1].strip() if lines else type(e).__name__)
        path = os.path.join(outdir, f"world{world}.json")
        if not os.path.exists(path):
            return [], problem or "no result written"
        with open(path) as f:
            return json.load(f)["rows"], problem


def _fmt(value: Optional[float], spec: str) -> str:
    """A number for the table, or "-" for None."""
    return "-" if value is None else format(value, spec)


def _load(start: Optional[float]) -> str:
    """"1-min load X at the start, Y at the end" (os.getloadavg), or "unknown" where the OS has none."""
    if start is None or not hasattr(os, "getloadavg"):
        return "unknown"
    return f"{start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"


def markdown(rows: List[dict], problems: Dict[int, str], meta: dict) -> str:
    """The report: a header with what ran (meta: versions, VAE, device, threads, repeats, commit, command) and one
    table row per (world, shape); a world without rows gets one row saying why. Times carry the device's name."""
    dev = meta["device_label"]
    lines = [
        "| ranks | latents (N,C,H,W) | image | DistVAE rel L2 | DistVAE max abs | ours rel L2 | ours max abs | "
        f"1 process s/decode ({dev}) | DistVAE s/decode ({dev}) | ours s/decode ({dev}) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for world in meta["worlds"]:
        mine = [r for r in rows if r["world"] == world]
        if not mine:
            lines.append(f"| {world} | - | - | - | - | - | - | - | - | - | {problems.get(world, 'no result')} |")
            continue
        for r in mine:
            cells, notes = [], []
            for name, label in (("distvae", "DistVAE"), ("ours", "ours")):
                m = r.get(name, {"ran": False, "why": "not run"})
                if m["ran"]:
                    cells.append((_fmt(m["rel_l2"], ".2e"), _fmt(m["max_abs"], ".2e"), _fmt(m["seconds"], ".2f")))
                    notes.append(f"{label}: ranks {'identical' if m['ranks_identical'] else 'DIFFER'}")
                else:
                    cells.append(("did not run", "-", "-"))
                    notes.append(f"{label} did not run: {m['why']}")
            if world > meta["cores"]:
                notes.append(f"{world} ranks on {meta['cores']} cores: times oversubscribed")
            if problems.get(world):
                notes.append(problems[world])
            lines.append(f"| {world} | {tuple(r['latents'])} | {r['image'][2]}x{r['image'][3]} | {cells[0][0]} | "
                         f"{cells[0][1]} | {cells[1][0]} | {cells[1][1]} | {r['ref_seconds']:.2f} | {cells[0][2]} | "
                         f"{cells[1][2]} | {'; '.join(notes)} |")
    head = [
        f"DistVAE vs sdvae_fast patch-parallel decode, against one process's diffusers `AutoencoderKL.decode` "
        f"({meta['date']})",
        "",
        f"- VAE: preset {meta['preset']}, block_out_channels {meta['widths']}, norm groups {meta['groups']}, "
        f"seeded weights (seed {meta['seed']}), fp32, batch {meta['batch']}; reference image max |x|: "
        f"{meta['ref_max_abs']}",
        f"- the fp32 reference itself against a float64 decode of the same weights and latents (rel L2 / max abs; "
        f"fp32 rounding alone): {meta['floor']}",
        f"- device {meta['device']} ({meta['backend']}), {meta['threads']} thread(s) per process, "
        f"{meta['cores']} cores (load average {meta['load']}); time = fastest of {meta['repeats']} decodes, barrier "
        f"to barrier",
        f"- versions: torch {meta['torch']}, diffusers {meta['diffusers']}, distvae {meta['distvae']}, "
        f"sdvae_fast {meta['commit']}, Python {meta['python']}",
        f"- command: `{meta['command']}`",
        "",
    ]
    return "\n".join(head + lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the arguments, run the reference and every world, print the markdown table (and write it to --out).
    Returns the exit status (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default: 1 2 4)")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=[(13, 16), (16, 16)],
                   help="latent shapes ROWSxCOLS (default: 13x16 16x16; 13 rows divide by neither 2 nor 4)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--preset", default="sd15")
    p.add_argument("--widths", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="override block_out_channels, e.g. 32,64,64,64 (default: the preset's)")
    p.add_argument("--groups", type=int, default=None, help="override norm_num_groups")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="decodes per method; the fastest is reported")
    p.add_argument("--timeout", type=int, default=600, help="seconds for one world before its ranks are ended")
    p.add_argument("--collective-timeout", type=int, default=120, help="seconds a collective may wait")
    p.add_argument("--no-fp64-floor", dest="fp64_floor", action="store_false",
                   help="skip the float64 decode that measures the fp32 reference's own rounding error")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    if any(w < 1 for w in args.world) or args.batch < 1 or args.threads < 1:
        p.error("--world, --batch and --threads must be positive")

    import diffusers
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False on this machine (use --device cpu: DistVAE and "
              "ours both run on gloo)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    import_sdvae_fast()
    version, reason = distvae_version()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.monotonic()
    try:
        refs = reference_runs(args)
    except (ValueError, TypeError) as e:  # a bad preset or override: from_preset's message names it
        print(f"cannot build the VAE: {one_line(e)}", file=sys.stderr)
        return 2
    rows, problems = [], {}
    for world in args.world:
        print(f"world {world} ...", file=sys.stderr, flush=True)
        got, problem = run_world(world, args, refs)
        rows += got
        if problem:
            problems[world] = problem
    from sdvae_fast.configs import PRESETS

    preset = PRESETS[args.preset]
    meta = {
        "date": datetime.date.today().isoformat(), "preset": args.preset,
        "widths": tuple(args.widths or preset["block_out_channels"]),
        "groups": args.groups or preset.get("norm_num_groups", 32), "seed": args.seed, "batch": args.batch,
        "ref_max_abs": ", ".join(f"{k}: {v['max_abs']:.2f}" for k, v in refs.items()),
        "floor": ", ".join(f"{k}: {v['fp64_floor'][0]:.2e} / {v['fp64_floor'][1]:.2e}" for k, v in refs.items()
                           if "fp64_floor" in v) or "not measured (--no-fp64-floor)",
        "device": args.device, "backend": "NCCL" if args.device == "cuda" else "gloo",
        "device_label": "GPU" if args.device == "cuda" else "CPU", "threads": args.threads,
        "cores": os.cpu_count() or 1, "load": _load(load_start), "repeats": args.repeats, "worlds": args.world,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "distvae": version or f"none ({reason})", "commit": commit_of(), "python": platform.python_version(),
        "command": " ".join(["python", "tools/distvae_side_by_side.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    text = markdown(rows, problems, meta) + f"\nTotal {time.monotonic() - t0:.0f} s.\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
