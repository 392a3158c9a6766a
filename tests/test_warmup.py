"""Cold start (`sdvae_fast.warmup`, `sdvae_fast.autotune_table`, bench/gpu_plan.json) on CPU.

Recording and compiling need the kernels defined for a GPU, so those tests run in a subprocess without
TRITON_INTERPRET (conftest switches it on for this process). They compile for sm_90 with Triton's bundled ptxas and
a stand-in driver: Triton's real binder, cache keys and compiler, nothing launched. Kept small in the default run
(a handful of compiles); the full compile of the plan and the sd15 warmup are marked `slow`
(`python3 -m pytest -m slow tests/test_warmup.py`).
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import triton

from sdvae_fast import autotune_table, warmup

REPO = Path(__file__).resolve().parent.parent
PLAN = REPO / "bench" / "gpu_plan.json"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# The limits tests/test_conv.py enforces on sm_90: stack (spills) per thread, registers, shared memory per block.
MAX_STACK_BYTES = 256
MAX_REGISTERS = 255
MAX_SHARED_BYTES = warmup.TARGET_SHARED_MEMORY[90]


def _run(code: str, *args, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Run Python `code` in a fresh process with the kernels compiled for a GPU (no interpreter)."""
    env = {k: v for k, v in (env or os.environ).items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing on this machine")
    return done


def _cli(*argv, env, timeout=900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-m", "sdvae_fast.cli", "warmup", *argv], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------------------------------------------------------
# The autotune table
# ---------------------------------------------------------------------------------------------------------------

HEADER = {"device": "NVIDIA H200", "capability": [9, 0], "triton": "3.6.0", "torch": "2.11.0"}


def test_autotune_table_round_trips_and_ignores_other_versions(tmp_path):
    path = tmp_path / "table.json"
    table = autotune_table.AutotuneTable(HEADER)
    config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)
    key = json.dumps(["sdvae_fast.kernels.conv:_conv_kernel", [128, 64, 64], ["torch.bfloat16"]])
    table.entries[key] = autotune_table.config_record(config)
    table.save(path)
    assert autotune_table.AutotuneTable.load(path, HEADER).entries == table.entries
    for field, other in (("triton", "3.9.0"), ("torch", "2.13.0"), ("device", "NVIDIA H100"), ("capability", [8, 0])):
        assert autotune_table.AutotuneTable.load(path, dict(HEADER, **{field: other})).entries == {}, field
    path.write_text("{not json")
    assert autotune_table.AutotuneTable.load(path, HEADER).entries == {}
    assert autotune_table.AutotuneTable.load(tmp_path / "missing.json", HEADER).entries == {}
    assert autotune_table._matching([config], table.entries[key]) is config
    other = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)
    assert autotune_table._matching([other], table.entries[key]) is None  # a stale entry: tuned again
    assert re.fullmatch(r"[A-Za-z0-9._-]+", autotune_table.table_slug(HEADER))


def _fake_kernel_function(x, n):
    """Stands in for a jitted kernel in the table tests."""


class _FakeAutotuned:
    """The attributes `choose_config` reads from a `@triton.autotune` kernel."""

    configs = [triton.Config({"BLOCK": 16}, num_warps=4, num_stages=2),
               triton.Config({"BLOCK": 32}, num_warps=4, num_stages=2)]
    keys = ["n"]
    arg_names = ["x", "n"]
    early_config_prune = None

    class fn:  # noqa: N801 - mirrors JITFunction.fn
        fn = _fake_kernel_function


def test_choose_config_tunes_a_key_once_and_later_processes_apply_the_table(tmp_path, monkeypatch):
    """First use times the candidates and keeps the fastest; the table written at exit is applied by a fresh
    process (here: a cleared in-memory table) without timing; a pinned config wins over both."""
    import torch

    timed = []

    def fake_time(kernel, grid, args, kwargs, config):
        timed.append(config.kwargs["BLOCK"])
        return {16: 2.0, 32: 1.0}[config.kwargs["BLOCK"]]

    monkeypatch.setenv(autotune_table.TABLE_ENV, str(tmp_path / "table.json"))
    monkeypatch.setattr(autotune_table, "device_header", lambda index=None: HEADER)
    monkeypatch.setattr(autotune_table, "_time_config", fake_time)
    monkeypatch.setattr(autotune_table, "_tables", {})
    monkeypatch.setattr(autotune_table, "_memo", {})
    kernel, args = _FakeAutotuned, (torch.empty(4), 1024)
    assert autotune_table.choose_config(kernel, None, args, {}).kwargs == {"BLOCK": 32}
    assert autotune_table.choose_config(kernel, None, args, {}).kwargs == {"BLOCK": 32}
    assert timed == [16, 32]
    assert autotune_table.save_tables() == [tmp_path / "table.json"]
    monkeypatch.setattr(autotune_table, "_tables", {})  # a later process
    monkeypatch.setattr(autotune_table, "_memo", {})
    assert autotune_table.choose_config(kernel, None, args, {}).kwargs == {"BLOCK": 32}
    assert timed == [16, 32], "the table's choice was timed again"
    autotune_table.choose_config(kernel, None, (torch.empty(4), 2048), {})  # another key: tuned
    assert timed == [16, 32, 16, 32]
    with autotune_table.pinned_config(kernel, kernel.configs[0]):
        assert autotune_table.choose_config(kernel, None, args, {}) is kernel.configs[0]
    assert autotune_table.last_config(kernel) is kernel.configs[0]


def test_autotune_key_names_kernel_key_values_and_dtypes():
    import torch

    from sdvae_fast.kernels import conv

    names = conv._conv_kernel.arg_names
    args = [torch.empty(1, dtype=torch.bfloat16, device="meta")] + list(range(1, len(names)))
    key = json.loads(autotune_table.autotune_key(conv._conv_kernel, tuple(args[:10]), {
        **{n: 7 for n in names[10:]}, "KH": 3, "APPLY_GN": True, "UPSAMPLE_2X": False}))
    assert key[0] == "sdvae_fast.kernels.conv:_conv_kernel"
    assert len(key[1]) == len(conv._conv_kernel.keys) and key[2] == ["torch.bfloat16"]


def test_plan_tuning_jobs_rebuild_their_autotune_key_candidates_and_grids():
    """`warmup.tune` settles each plan job through a stand-in of the autotuned kernel: it must produce the same
    table key as the real launch, offer the recorded candidates and give each its recorded grid."""
    _, tunes = warmup.load_plan(PLAN, ["attention", "conv"])
    assert tunes
    for job in tunes:
        kernel = job.tunable()
        args = [warmup._decode_value(a, "meta") for a in job.args]
        kwargs = {k: warmup._decode_value(v, "meta") for k, v in job.kwargs.items()}
        assert autotune_table.autotune_key(kernel, tuple(args), kwargs) == job.tune_key
        records = [autotune_table.config_record(c) for c in autotune_table.candidates(kernel, tuple(args), kwargs)]
        assert records == [{k: c[k] for k in ("kwargs", "num_warps", "num_stages")} for c in job.tuning["candidates"]]
        for config, candidate in zip(kernel.configs, job.tuning["candidates"]):
            assert job.grid({**kwargs, **config.kwargs}) == tuple(candidate["grid"])


def test_parse_target_names_the_accepted_forms():
    assert warmup.parse_target("sm_90") == (90, 232448)
    with pytest.raises(ValueError, match="sm_XY"):
        warmup.parse_target("hopper")


# ---------------------------------------------------------------------------------------------------------------
# bench/gpu_plan.json
# ---------------------------------------------------------------------------------------------------------------


def test_gpu_plan_is_current_and_sections_need_no_compile_beyond_it():
    """Regenerate the plan (same meta-tensor recording) and compare; then key every section's launches through
    Triton's front end and check each key is a plan variant of that section: after `warmup --plan`, no section
    compiles (compiles recorded by cache key, none performed)."""
    done = _run("""
        import json, sys
        sys.path.insert(0, "bench")
        import triton
        import gpu_plan
        from sdvae_fast import warmup
        committed = json.loads(gpu_plan.PLAN.read_text())
        recorded = gpu_plan.record_sections()
        plan = warmup.plan_json(recorded, capability=90)
        same_triton = committed["triton"] == triton.__version__
        current = gpu_plan._format(plan) + chr(10) == gpu_plan.PLAN.read_text()
        print("PLAN", json.dumps({"current": current, "same_triton": same_triton}))
        for name, rec in recorded.items():
            variants, _ = warmup.load_plan(gpu_plan.PLAN, [name])
            planned = warmup.variant_keys(variants, capability=90)
            missing = set(rec.variants) - planned
            print("SECTION", name, len(rec.variants), len(planned), len(missing))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    status = json.loads(re.search(r"^PLAN (.*)$", done.stdout, re.M).group(1))
    sections = re.findall(r"^SECTION (\w+) (\d+) (\d+) (\d+)$", done.stdout, re.M)
    assert {s[0] for s in sections} == {"tests", "parity", "big", "conv", "attention", "e2e"}
    for name, needed, planned, missing in sections:
        assert int(needed) > 0 and int(missing) == 0, f"section {name}: {missing} of {needed} variants not planned"
    if status["same_triton"]:
        assert status["current"], "bench/gpu_plan.json is out of date: run python bench/gpu_plan.py"


# What makes a "mode" of each kernel: the constexprs that change its code path (tiles, dtypes and minor flags such
# as bias or residual are left to the slow test of the whole plan).
_MODE_KEYS = {"_conv_kernel": ("KH", "APPLY_GN", "UPSAMPLE_2X", "EMIT_STATS"), "_attention_fwd_kernel": ("HEAD_DIM",)}


def _pruned_here(name: str, kwargs: dict, dtype: str) -> bool:
    """Whether the installed triton prunes this attention config for sm_90 (triton before 3.9 stages the whole
    query tile, so some configs of a plan recorded with 3.9 need more than 227 KiB there)."""
    if name != "_attention_fwd_kernel":
        return False
    from sdvae_fast.kernels import attention

    tiles = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
    config = triton.Config(tiles, num_warps=kwargs["num_warps"], num_stages=kwargs["num_stages"])
    size = 4 if dtype == "float32" else 2
    return attention._smem_bytes(config, triton.next_power_of_2(kwargs["HEAD_DIM"]), size) > MAX_SHARED_BYTES


def _subset_plan(path: Path, every: bool = False) -> int:
    """Write a plan holding one bf16 variant per kernel and mode of bench/gpu_plan.json (every variant with
    `every`), leaving out those the installed triton prunes; returns how many."""
    plan = json.loads(PLAN.read_text())
    chosen, seen = [], set()
    for i, data in enumerate(plan["variants"]):
        base = plan["tunes"][data["tune"]] if "tune" in data else data
        kwargs = {**base["kwargs"], **data.get("config", {})}
        name = base["kernel"].split(":")[1]
        if _pruned_here(name, kwargs, base["args"][0]["tensor"]):
            continue
        if every:
            chosen.append(i)
            continue
        if name in _MODE_KEYS and base["args"][0]["tensor"] != "bfloat16":
            continue
        ident = (name,) + tuple(kwargs.get(k) for k in _MODE_KEYS.get(name, ()))
        if ident not in seen:
            seen.add(ident)
            chosen.append(i)
    plan["sections"] = {"subset": {"variants": chosen, "tunes": []}}
    path.write_text(json.dumps(plan))
    return len(chosen)


def _resource_usage(cache_dir: Path) -> dict:
    """{cubin name: (registers, stack bytes, shared bytes)} of every kernel in a Triton cache folder."""
    usage = {}
    for cubin in cache_dir.rglob("*.cubin"):
        text = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        regs = int(re.search(r"REG:(\d+)", text).group(1))
        stack = int(re.search(r"STACK:(\d+)", text).group(1))
        meta = json.loads(cubin.with_suffix(".json").read_text())
        usage[f"{cubin.parent.name[:8]}/{cubin.stem}"] = (regs, stack, int(meta.get("shared", 0)))
    return usage


def _check_limits(usage: dict) -> None:
    too_big = {k: v for k, v in usage.items()
               if v[0] > MAX_REGISTERS or v[1] > MAX_STACK_BYTES or v[2] > MAX_SHARED_BYTES}
    assert not too_big, f"(registers, stack bytes, shared bytes) over the sm_90 limits: {too_big}"


def test_warmup_plan_compiles_one_variant_per_kernel_and_mode_for_sm90_then_finds_them_cached(tmp_path):
    """`sdvae-fast warmup --target sm_90 --plan`: one variant per kernel and mode really compiles (registers,
    spills and shared memory within the limits of tests/test_conv.py); a second call compiles nothing new."""
    subset = tmp_path / "plan.json"
    count = _subset_plan(subset)
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    first = _cli("--target", "sm_90", "--plan", str(subset), "-q", env=env)
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout
    print(first.stdout)
    assert f"compiled {count} kernel variants" in first.stdout and f"{count} new cache entries" in first.stdout
    if CUOBJDUMP.exists():
        usage = _resource_usage(tmp_path / "cache")
        print(usage)
        assert len(usage) == count
        _check_limits(usage)
    second = _cli("--target", "sm_90", "--plan", str(subset), "-q", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 new cache entries" in second.stdout, second.stdout


@pytest.mark.slow
def test_warmup_sd15_res64_for_sm90_completes_and_a_second_call_finds_everything_cached(tmp_path):
    """The issue's command: `sdvae-fast warmup --target sm_90 --preset sd15 --res 64 --dtype bf16`."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    argv = ("--target", "sm_90", "--preset", "sd15", "--res", "64", "--dtype", "bf16", "-q")
    first = _cli(*argv, env=env, timeout=3600)
    assert first.returncode == 0, first.stderr[-3000:]
    variants = int(re.search(r"compiled (\d+) kernel variants", first.stdout).group(1))
    assert f"{variants} new cache entries" in first.stdout
    second = _cli(*argv, env=env, timeout=3600)
    assert second.returncode == 0 and "0 new cache entries" in second.stdout, second.stdout + second.stderr[-2000:]


@pytest.mark.slow
def test_full_gpu_plan_compiles_for_sm90_within_the_limits(tmp_path):
    """Every variant of bench/gpu_plan.json (that the installed triton keeps) compiles for sm_90 within the
    register, spill and shared-memory limits."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    plan = tmp_path / "plan.json"
    _subset_plan(plan, every=True)
    done = _cli("--target", "sm_90", "--plan", str(plan), "-q", env=env, timeout=7200)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    print(done.stdout)
    if CUOBJDUMP.exists():
        _check_limits(_resource_usage(tmp_path / "cache"))


def test_gpu_check_records_the_commit_given_on_its_command_line_without_git(tmp_path):
    """A tree copied without .git (here: git pointed at nothing) records the commit passed with --commit."""
    results = tmp_path / "results"
    env = dict(os.environ, SECTIONS="env", RESULTS_DIR=str(results), GIT_DIR=str(tmp_path / "no-git"),
               PYTHON=sys.executable)
    script = REPO / "bench" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), "--commit", "0123456789ab"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    report = next(results.glob("*.md")).read_text()
    assert "- sdvae_fast_commit: 0123456789ab" in report
    bad = subprocess.run(["bash", str(script), "--bogus"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
