"""The kernel variants each bench/gpu_check.sh section needs, recorded on meta tensors into bench/gpu_plan.json.

Each section's workload below makes the calls its GPU section makes (the same shapes, dtypes, emitted-statistics
settings and fixed tile configs), on meta tensors inside `sdvae_fast.warmup.recording`, so the launches are
recorded by the code that picks them at run time. gpu_check.sh first runs `sdvae-fast warmup --plan
bench/gpu_plan.json`, which compiles all of them in parallel; no section then compiles serially.

    python bench/gpu_plan.py            # rewrite bench/gpu_plan.json (needs TRITON_INTERPRET unset)
    python bench/gpu_plan.py --check    # exit 1 when the committed plan differs from a fresh recording

tests/test_warmup.py runs `--check`, and asserts that every section's launches, keyed by Triton's front end, are
among the plan's variants (zero further compiles after the warmup).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLAN = HERE / "gpu_plan.json"
TARGET = "sm_90"
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def _image(shape, dtype, channels_last=True):
    import torch

    t = torch.empty(shape, device="meta", dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _gsc(c_in, c_out, side, k, dtype, *, residual, batch=1, residual_channels_last=True, gn=True):
    """ops.gn_silu_conv2d as the GPU tests and bench_conv call it (GroupNorm(32) unless gn=False)."""
    import torch

    from sdvae_fast import ops

    x = _image((batch, c_in, side, side), dtype)
    w = torch.empty(c_out, c_in, k, k, device="meta", dtype=dtype)
    b = torch.empty(c_out, device="meta", dtype=dtype)
    norm = dict(norm_weight=torch.empty(c_in, device="meta", dtype=dtype),
                norm_bias=torch.empty(c_in, device="meta", dtype=dtype)) if gn else dict(norm_weight=None)
    res = _image((batch, c_out, side, side), dtype, residual_channels_last) if residual else None
    ops.gn_silu_conv2d(x, w, b, residual=res, padding=k // 2, **norm)


def _upsample(c, side, dtype):
    import torch

    from sdvae_fast import ops

    ops.upsample_conv2d(_image((1, c, side, side), dtype), torch.empty(c, c, 3, 3, device="meta", dtype=dtype),
                        torch.empty(c, device="meta", dtype=dtype))


def _attention(n, dtype, config=None):
    import torch

    from sdvae_fast import ops
    from sdvae_fast.kernels.attention import attention_forward

    q, k, v = (torch.empty(1, 1, n, 512, device="meta", dtype=dtype) for _ in range(3))
    if config is None:
        ops.attention(q, k, v)
    else:
        attention_forward(q, k, v, config=config)


def _vae(rec, res, dtype, batch=1, *, encode=True, decode=True, emit=(True, False)):
    from sdvae_fast.warmup import record_vae

    for emit_stats in emit:
        record_vae(rec, "sd15", res, batch, dtype, encode=encode, decode=decode, emit_stats=emit_stats)


def tests_section(rec):
    """`pytest -m gpu` minus the two large decodes: tests/test_gpu.py, test_conv.py, test_upsample_conv.py,
    test_gpu_configs.py (every surviving config once) and the sd15 parity tests (fp16, bf16 at 512)."""
    import torch

    import test_gpu
    import test_gpu_configs as cfg
    from sdvae_fast import autotune_table
    from sdvae_fast.kernels import conv

    for dtype in (torch.float16, torch.bfloat16):
        for c_in, c_out, side in test_gpu.GSC_SHAPES:
            _gsc(c_in, c_out, side, 3, dtype, residual=c_in == c_out)
        _upsample(256, 256, dtype)
        for n in (4096, 4080):
            _attention(n, dtype)
        _vae(rec, 512, dtype)
    for dtype in (torch.float32, torch.bfloat16):  # test_conv.py: batch 2, NCHW residual
        _gsc(256, 256, 64, 3, dtype, residual=True, batch=2, residual_channels_last=False)
    _upsample(256, 64, torch.bfloat16)  # test_upsample_conv.py
    for config in conv.CONV_CONFIGS:
        for mode in ("gsc", "upsample"):
            with autotune_table.pinned_config(conv._conv_kernel, config):
                cfg.run_conv(mode, cfg.conv_inputs(config, mode, "meta"))
    from sdvae_fast.kernels.attention import attention_forward

    for head_dim in cfg.ATTENTION_HEAD_DIMS:
        q, k, v = cfg.attention_inputs(head_dim, "meta")
        for config in cfg.attention_config_dicts(head_dim, "meta"):
            attention_forward(q, k, v, config=config)


def parity_section(rec):
    """`sdvae-fast parity --preset sd15 --res 512 --dtype bf16`: whole passes, and units fed alone."""
    import torch

    _vae(rec, 512, torch.bfloat16)


def big_section(rec):
    """The 4096^2 decode and the batch-32 decode of tests/test_gpu.py (bf16)."""
    import torch

    _vae(rec, 4096, torch.bfloat16, encode=False, emit=(True,))
    _vae(rec, 512, torch.bfloat16, batch=32, encode=False, emit=(True,))


def conv_section(rec):
    """bench/bench_conv.py at its default sizes: decoder GSC, shortcut and upsample convs, bf16, both through the
    public op (statistics pass + conv) and the launcher with precomputed statistics."""
    import torch

    import bench_conv

    for size in (512, 1024):
        for _, c_in, c_out, side, k, residual in bench_conv._decoder_gsc_shapes(size):
            _gsc(c_in, c_out, side, k, torch.bfloat16, residual=residual)
        for _, c_in, c_out, side in bench_conv._decoder_shortcut_shapes(size):
            _gsc(c_in, c_out, side, 1, torch.bfloat16, residual=True, gn=False)
        for _, c, side in bench_conv._decoder_upsample_shapes(size):
            _upsample(c, side, torch.bfloat16)


def attention_section(rec):
    """bench/bench_attention.py --n 4096 16384: autotuned, and each fixed variant that fits the target."""
    import torch

    import bench_attention

    for n in (4096, 16384):
        _attention(n, torch.bfloat16)
        for config in bench_attention.fitting_variants("meta").values():
            _attention(n, torch.bfloat16, config)


def e2e_section(rec):
    """`sdvae-fast bench --res 512 1024 2048 --dtype bf16 --preset sd15`: encode and decode with emitted statistics,
    and the decode without them at --compile-res 1024."""
    import torch

    for res in (512, 1024, 2048):
        _vae(rec, res, torch.bfloat16, emit=(True,))
    _vae(rec, 1024, torch.bfloat16, encode=False, emit=(False,))


SECTIONS = {"tests": tests_section, "parity": parity_section, "big": big_section, "conv": conv_section,
            "attention": attention_section, "e2e": e2e_section}


def record_sections(names=None) -> dict:
    """{section: Recording} for `names` (default all), recorded for TARGET."""
    from sdvae_fast import warmup

    capability, shared = warmup.parse_target(TARGET)
    found = {}
    for name in names or SECTIONS:
        found[name] = warmup.record([SECTIONS[name]], capability=capability, shared_memory=shared)
    return found


def build_plan() -> dict:
    """The plan JSON of every section."""
    from sdvae_fast import warmup

    return warmup.plan_json(record_sections(), capability=warmup.parse_target(TARGET)[0])


def _format(plan: dict) -> str:
    """The plan as JSON with one variant or tuning job per line (readable diffs). Keyword arguments keep the
    order of the launch: Triton's in-process cache key depends on it."""
    def rows(items):
        return "[\n" + ",\n".join(json.dumps(i, separators=(",", ":")) for i in items) + "\n]"

    head = {k: v for k, v in plan.items() if k not in ("tunes", "variants")}
    body = json.dumps(head, sort_keys=True, separators=(",", ":"))[:-1]
    return f'{body},\n"tunes":{rows(plan["tunes"])},\n"variants":{rows(plan["variants"])}}}'


def main(argv=None) -> int:
    """Write or check bench/gpu_plan.json; returns the exit code (1: the plan is stale, 2: interpreter on)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed plan instead of writing")
    parser.add_argument("--out", type=Path, default=PLAN, help=f"plan file (default {PLAN})")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_plan.py: unset TRITON_INTERPRET (recording needs the kernels compiled for a GPU)", file=sys.stderr)
        return 2
    plan = build_plan()
    text = _format(plan)
    if args.check:
        committed = args.out.read_text() if args.out.exists() else None
        if committed != text + "\n":
            print(f"{args.out} is out of date: run python bench/gpu_plan.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(plan['variants'])} variants)")
        return 0
    args.out.write_text(text + "\n")
    counts = {name: len(s["variants"]) for name, s in plan["sections"].items()}
    print(f"wrote {args.out}: {len(plan['variants'])} variants, {len(plan['tunes'])} tuning jobs; per section {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
