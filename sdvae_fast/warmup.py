"""Cold start: find every kernel variant an encode/decode will launch, compile them all in parallel, settle autotuning.

How variants are found (`record`): the real `AutoencoderKL.encode` / `decode` run on meta tensors with a
`Recorder` active. The registered ops then call their real implementations (the same code that picks the kernel
path, the tile mode and the launch arguments at run time), and every kernel launch is noted instead of executed:

- an autotuned kernel (`kernels._common.launch`) is expanded into one variant per candidate config that survives
  the kernel's own pruning for the target's shared memory, and its launch is kept as a tuning job;
- each variant goes through Triton's real front end (`JITFunction.run(..., warmup=True)`: the binder, its
  specialisation and cache key) on the target, with `knobs.runtime.jit_cache_hook` answering "skip", so nothing is
  compiled while recording; variants are deduplicated by Triton's own cache key.

A `Launch` stores the jitted function's name and its arguments portably (tensors as dtype, shape, strides and
storage offset; ints, floats, bools, strings as they are), so a plan recorded on one machine compiles on another.
`compile_launches` rebuilds the arguments as meta tensors in a process pool (one worker per core, started with
`spawn`) and calls `run(..., warmup=True)` there, which compiles into Triton's on-disk cache exactly what the
launch would compile. Without a GPU (`target="sm_90"`) a stand-in Triton driver reports that target, so the
variants compile ahead of time for it; on a GPU the workers use the same stand-in with the GPU's own target (no
CUDA context per worker). `tune` then runs each autotuned launch once on random CUDA tensors, which settles its
config in `sdvae_fast.autotune_table` and writes the table.

Public entry points: `warmup(...)` (what `sdvae-fast warmup` runs), `record`, `compile_launches`, `tune`, and the
plan helpers `plan_json` / `load_plan` / `variant_keys` used by bench/gpu_plan.py and the tests. docs/cold_start.md has
the design notes.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

#: Shared memory per block (bytes) of the targets `--target` knows, as the CUDA driver reports it.
TARGET_SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
#: Launch options recorded besides the kernel's own parameters.
_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
PLAN_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# Targets and the stand-in driver
# ---------------------------------------------------------------------------------------------------------------


def parse_target(target: str) -> tuple[int, int]:
    """`"sm_90"` (or `"90"`, `"sm90"`) -> (capability 90, shared memory bytes).

    Raises ValueError naming the accepted forms and capabilities for anything else.
    """
    text = str(target).lower().replace("sm_", "").replace("sm", "")
    if not text.isdigit() or int(text) not in TARGET_SHARED_MEMORY:
        raise ValueError(f"target must be sm_XY with XY in {sorted(TARGET_SHARED_MEMORY)}, got {target!r}")
    capability = int(text)
    return capability, TARGET_SHARED_MEMORY[capability]


class TargetDriver:
    """A stand-in Triton driver for compiling without launching: it reports a fixed CUDA target, device 0 and
    stream 0, and has no launcher. Install with `triton.runtime.driver.set_active(...)`; `use_target` does."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    @classmethod
    def is_active(cls) -> bool:
        """Always: installed explicitly, never picked by Triton's driver discovery."""
        return True

    def get_current_target(self):
        """The fixed `GPUTarget` compiled for."""
        return self.target

    def get_current_device(self) -> int:
        """Device 0 (it only selects the JIT's per-device cache)."""
        return 0

    def set_current_device(self, device: int) -> None:
        """Ignored: there is no device."""
        return None

    def get_current_stream(self, device: Optional[int] = None) -> int:
        """Stream 0 (never used: nothing launches)."""
        return 0

    def get_active_torch_device(self):
        """The meta device, where recorded tensors live."""
        import torch

        return torch.device("meta")

    def get_device_interface(self):
        """Raises RuntimeError: there is no device."""
        raise RuntimeError("TargetDriver compiles only; it has no device")

    def get_benchmarker(self):
        """Raises RuntimeError: nothing can be timed."""
        raise RuntimeError("TargetDriver compiles only; it cannot time kernels")


@contextlib.contextmanager
def use_target(capability: int):
    """Within the block, Triton compiles for sm_`capability` through `TargetDriver` (nothing can launch)."""
    from triton.runtime import driver

    previous = getattr(driver, "_active", None)  # None: the default driver, created on first use
    driver.set_active(TargetDriver(capability))
    try:
        yield
    finally:
        driver.set_active(previous)


def current_gpu_target() -> tuple[int, int]:
    """(capability, shared memory bytes) of the current CUDA device. Raises RuntimeError without CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: give a target (--target sm_90, or target='sm_90') to compile ahead of time")
    major, minor = torch.cuda.get_device_capability()
    from sdvae_fast.kernels._common import max_shared_memory

    return major * 10 + minor, max_shared_memory(torch.device("cuda"))


# ---------------------------------------------------------------------------------------------------------------
# Launch records
# ---------------------------------------------------------------------------------------------------------------


def _encode_value(value):
    """A launch argument as JSON: tensors as {"tensor": dtype, "shape", "stride", "offset"}."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""), "shape": list(value.shape),
                "stride": list(value.stride()), "offset": int(value.storage_offset())}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}: {value!r}")


def _storage_elements(spec: dict) -> int:
    """Elements the storage of a recorded tensor must hold."""
    if any(s == 0 for s in spec["shape"]):
        return spec["offset"] + 1
    return spec["offset"] + 1 + sum((n - 1) * abs(s) for n, s in zip(spec["shape"], spec["stride"]))


def _decode_value(value, device: str, fill: bool = False):
    """A recorded argument back as a value: tensors as meta tensors of the same layout (or, with `fill`, random
    values on `device`, for timing)."""
    import torch

    if not isinstance(value, dict):
        return value
    if value["tensor"] not in _DTYPES:
        raise ValueError(f"unknown dtype {value['tensor']!r} in a recorded launch")
    dtype = getattr(torch, value["tensor"])
    count = _storage_elements(value)
    if fill and dtype.is_floating_point:
        storage = torch.randn(count, device=device, dtype=torch.float32).to(dtype)
    else:
        storage = torch.zeros(count, device=device, dtype=dtype)
    return storage.as_strided(value["shape"], value["stride"], value["offset"])


@dataclass
class Launch:
    """One kernel launch, portable: `kernel` is "module:function" of the jitted function; `args` and `kwargs` are
    its arguments as recorded (`kwargs` holds the constexprs and, for variants of an autotuned kernel, the config's
    tiles, num_warps and num_stages); `tune_key` is the autotune table key when the launch belongs to one. A tuning job
    also holds `tuning`: the autotuner's key argument names and its candidates, each a table config record
    (`autotune_table.config_record`) with its launch grid."""

    kernel: str
    args: list
    kwargs: dict
    tune_key: Optional[str] = None
    tuning: Optional[dict] = None

    def to_json(self) -> dict:
        """The record as a JSON-ready dict."""
        data = {"kernel": self.kernel, "args": self.args, "kwargs": self.kwargs}
        if self.tune_key is not None:
            data["tune_key"] = self.tune_key
        if self.tuning is not None:
            data["tuning"] = self.tuning
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Launch":
        """Inverse of `to_json`."""
        return cls(data["kernel"], list(data["args"]), dict(data["kwargs"]), data.get("tune_key"),
                   data.get("tuning"))

    def grid(self, meta: dict) -> tuple:
        """The launch grid of a tuning job for the candidate whose tiles `meta` holds (a Triton grid callable)."""
        for candidate in self.tuning["candidates"]:
            if all(meta.get(k) == v for k, v in candidate["kwargs"].items()):
                return tuple(candidate["grid"])
        raise KeyError(f"no recorded candidate of {self.kernel} has the tiles of {meta}")

    def tunable(self):
        """A stand-in for the autotuned kernel of a tuning job: the jitted function with the recorded candidates
        and key names, what `autotune_table.choose_config` reads."""
        import triton

        fn = _jit_function(self.kernel)
        configs = [triton.Config(dict(c["kwargs"]), num_warps=c["num_warps"], num_stages=c["num_stages"])
                   for c in self.tuning["candidates"]]
        return type("Tunable", (), {"fn": fn, "configs": configs, "keys": list(self.tuning["keys"]),
                                    "arg_names": fn.arg_names, "early_config_prune": None})()

    def ident(self) -> str:
        """A canonical string of the record (what plans are sorted and compared by)."""
        return json.dumps(self.to_json(), sort_keys=True)


def resolve_kernel(name: str):
    """The object named "module:attribute" (importing the module): a `@triton.jit` function or an autotuner."""
    import importlib

    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"kernel {name!r} cannot be found: {error}") from error


def _jit_function(name: str):
    kernel = resolve_kernel(name)
    return getattr(kernel, "fn", kernel) if hasattr(kernel, "configs") else kernel


# ---------------------------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Recording:
    """What a recording found: `variants` (Triton cache key -> the Launch that compiles it) and `tunes` (autotune
    key -> one launch of the autotuned kernel, without a config, for settling its choice)."""

    variants: dict = field(default_factory=dict)
    tunes: dict = field(default_factory=dict)

    def update(self, other: "Recording") -> None:
        """Add `other`'s variants and tuning jobs."""
        for key, value in other.variants.items():
            self.variants.setdefault(key, value)
        for key, value in other.tunes.items():
            self.tunes.setdefault(key, value)


class Recorder:
    """Notes launches instead of running them (see the module docstring). Use through `recording()`."""

    def __init__(self, capability: int, shared_memory: int):
        self.capability = capability
        self.shared_memory = shared_memory
        self.result = Recording()
        self._pending: Optional[Launch] = None
        self._tune_key: Optional[str] = None

    # kernels._common.launch hands autotuned (and plain) launches here while recording.
    def launch(self, kernel, grid, args: tuple, kwargs: dict):
        """Record the launch of `kernel` (expanding an autotuned one into its candidate configs)."""
        from sdvae_fast import autotune_table

        if not hasattr(kernel, "configs"):
            kernel.run(*args, grid=grid, warmup=True, **kwargs)
            return None
        key = autotune_table.autotune_key(kernel, args, kwargs)
        name = autotune_table.kernel_name(kernel)
        configs = autotune_table.candidates(kernel, args, kwargs)
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        tuning = {"keys": list(kernel.keys), "candidates": [
            dict(autotune_table.config_record(c),
                 grid=[int(g) for g in (grid({**named, **c.kwargs}) if callable(grid) else grid)])
            for c in configs]}
        self.result.tunes.setdefault(key, Launch(name, [_encode_value(a) for a in args],
                                                 {k: _encode_value(v) for k, v in kwargs.items()}, key, tuning))
        for config in configs:
            self._tune_key = key
            try:
                kernel.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
            finally:
                self._tune_key = None
        return None

    def pre_run(self, fn, args: tuple, kwargs: dict) -> None:
        """JITFunction pre-run hook: remember the launch about to be keyed."""
        from sdvae_fast import autotune_table

        kept = {k: _encode_value(v) for k, v in kwargs.items() if k in fn.arg_names or k in _OPTION_NAMES}
        self._pending = Launch(autotune_table.kernel_name(fn), [_encode_value(a) for a in args], kept,
                               self._tune_key)

    def cache_hook(self, *, key, **_kwargs) -> bool:
        """`knobs.runtime.jit_cache_hook`: file the pending launch under Triton's cache key; True = do not compile."""
        if self._pending is not None:
            self.result.variants.setdefault(str(key), self._pending)
            self._pending = None
        return True


def _jit_functions():
    """Every `@triton.jit` function of the kernel modules (autotuners unwrapped)."""
    from triton.runtime.jit import JITFunction

    from sdvae_fast.kernels import attention, conv, group_norm

    found = []
    for module in (conv, attention, group_norm):
        for value in vars(module).values():
            fn = getattr(value, "fn", None) if hasattr(value, "configs") else value
            if isinstance(fn, JITFunction) and fn not in found:
                found.append(fn)
    return found


def _install_recording_fakes() -> None:
    """Make each custom op defined in an imported `sdvae_fast` module run its real implementation on meta tensors
    while a recorder is active (its registered fake otherwise, as torch.compile needs). Idempotent."""
    import torch

    from sdvae_fast import ops  # noqa: F401 - registers the ops
    from sdvae_fast.kernels import _common

    ops_found = [value for name, module in list(sys.modules.items()) if name.startswith("sdvae_fast") and module
                 for value in list(vars(module).values())
                 if isinstance(value, torch._library.custom_ops.CustomOpDef)]
    for value in ops_found:
        if getattr(value, "_sdvae_recording", False):
            continue
        fake = value._abstract_fn
        real = value._init_fn

        def dispatch(*args, _fake=fake, _real=real, **kwargs):
            return (_real if _common.RECORDER is not None else _fake)(*args, **kwargs)

        value.register_fake(dispatch)
        value._sdvae_recording = True


@contextlib.contextmanager
def recording(capability: int, shared_memory: int):
    """Record kernel launches for sm_`capability` with `shared_memory` bytes per block; yields the `Recorder`.

    Needs the kernels compiled for a GPU, i.e. TRITON_INTERPRET unset (RuntimeError otherwise). Inside the block,
    encode/decode/ops calls on meta tensors record instead of launching. fp16 overflow checks are off (they read
    values), so an fp16 recording holds the fp16 variants only.
    """
    from triton import knobs

    from sdvae_fast import fast
    from sdvae_fast.kernels import _common

    if _common.INTERPRET:
        raise RuntimeError("recording kernel launches needs TRITON_INTERPRET unset (the interpreter compiles nothing)")
    if _common.RECORDER is not None:
        raise RuntimeError("a recording is already active")
    _install_recording_fakes()
    recorder = Recorder(capability, shared_memory)
    functions = _jit_functions()
    hooks = []
    for fn in functions:
        def hook(*args, _fn=fn, **kwargs):
            recorder.pre_run(_fn, args, kwargs)

        fn.pre_run_hooks.append(hook)
        hooks.append((fn, hook))
    saved = knobs.runtime.jit_cache_hook, fast.FP16_GUARD
    knobs.runtime.jit_cache_hook = recorder.cache_hook
    fast.FP16_GUARD = False
    _common.RECORDER = recorder
    try:
        with use_target(capability):
            yield recorder
    finally:
        _common.RECORDER = None
        knobs.runtime.jit_cache_hook, fast.FP16_GUARD = saved
        for fn, hook in hooks:
            fn.pre_run_hooks.remove(hook)


def _meta_vae(vae):
    """A meta-device copy of a VAE's architecture: a preset name, a config dict or folder, or a model."""
    import torch

    from sdvae_fast.model import AutoencoderKL

    config = dict(vae.config) if isinstance(vae, torch.nn.Module) else vae
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    model.set_backend("triton")
    return model.eval()


_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "float16": "float16",
                "bfloat16": "bfloat16", "float32": "float32"}


def resolve_dtype(name) -> "object":
    """fp16/bf16/fp32 (or a torch dtype) -> torch dtype. Raises ValueError naming the valid names."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if str(name) not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of fp16, bf16, fp32, got {name!r}")
    return getattr(torch, _DTYPE_NAMES[str(name)])


def record_vae(recorder: Recorder, vae, res: int, batch: int = 1, dtype="bf16", *, encode: bool = True,
               decode: bool = True, emit_stats: Optional[bool] = None) -> None:
    """Run `vae`'s encode and/or decode at `res` x `res` (images; latents res/8) on meta tensors inside `recorder`.

    Args:
        vae: preset name, config dict or folder, or a model (only its config is used).
        res: image side in pixels, a multiple of the VAE's downsample factor.
        batch: images per call. dtype: fp16/bf16/fp32 or a torch dtype.
        emit_stats: set `sdvae_fast.fast.EMIT_GN_STATS` for the run (None: leave it).
    Raises ValueError on a resolution that is not a multiple of the downsample factor.
    """
    import torch

    from sdvae_fast import fast

    model = _meta_vae(vae).to(resolve_dtype(dtype))
    factor = model.downsample_factor
    if res <= 0 or res % factor:
        raise ValueError(f"res must be a positive multiple of {factor}, got {res}")
    saved = fast.EMIT_GN_STATS
    if emit_stats is not None:
        fast.EMIT_GN_STATS = bool(emit_stats)
    try:
        with torch.no_grad():
            if encode:
                model.encode(torch.empty(batch, model.config.in_channels, res, res, device="meta",
                                         dtype=model.dtype))
            if decode:
                side = res // factor
                model.decode(torch.empty(batch, model.config.latent_channels, side, side, device="meta",
                                         dtype=model.dtype))
    finally:
        fast.EMIT_GN_STATS = saved


def record(workloads: Iterable[Callable[[Recorder], None]], *, capability: int, shared_memory: int) -> Recording:
    """Run each workload (a callable taking the `Recorder`) inside one recording; return what it found."""
    with recording(capability, shared_memory) as recorder:
        for workload in workloads:
            workload(recorder)
    return recorder.result


# ---------------------------------------------------------------------------------------------------------------
# Compiling in parallel
# ---------------------------------------------------------------------------------------------------------------

_WORKER_CAPABILITY: Optional[int] = None


def _init_worker(capability: int) -> None:
    """Pool initializer: kernels compiled for the GPU (no interpreter), the stand-in driver for `capability`."""
    global _WORKER_CAPABILITY
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.runtime import driver

    driver.set_active(TargetDriver(capability))
    _WORKER_CAPABILITY = capability


def compile_launch(data: dict) -> tuple[float, Optional[str]]:
    """Compile one recorded launch (a `Launch.to_json()` dict) into Triton's cache without launching it.

    Runs in a pool worker (or any process with a compile-only driver active). Returns (seconds, error or None).
    """
    launch = Launch.from_json(data)
    start = time.perf_counter()
    try:
        fn = _jit_function(launch.kernel)
        args = [_decode_value(a, "meta") for a in launch.args]
        kwargs = {k: _decode_value(v, "meta") for k, v in launch.kwargs.items()}
        fn.run(*args, grid=(1, 1, 1), warmup=True, **kwargs)
    except Exception as error:  # noqa: BLE001 - reported per variant in the summary
        return time.perf_counter() - start, f"{type(error).__name__}: {str(error).strip()[:300]}"
    return time.perf_counter() - start, None


def triton_cache_dir() -> str:
    """Triton's on-disk kernel cache folder (TRITON_CACHE_DIR, default ~/.triton/cache)."""
    try:
        from triton import knobs

        return str(knobs.cache.dir)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))


def _cache_entries() -> int:
    folder = triton_cache_dir()
    return len(os.listdir(folder)) if os.path.isdir(folder) else 0


@dataclass
class CompileSummary:
    """What `compile_launches` did: variants, failures (list of (kernel, error)), wall seconds, the summed
    per-variant seconds, new entries in Triton's cache folder, the folder and the worker count."""

    variants: int
    failures: list
    seconds: float
    cpu_seconds: float
    new_cache_entries: int
    cache_dir: str
    jobs: int

    def format(self) -> str:
        """One line for people."""
        text = (f"{self.variants} kernel variants in {self.seconds:.1f} s on {self.jobs} workers "
                f"({self.cpu_seconds:.1f} s of compiling; {self.new_cache_entries} new cache entries in "
                f"{self.cache_dir})")
        if self.failures:
            text += f"; {len(self.failures)} failed, first: {self.failures[0][0]}: {self.failures[0][1]}"
        return text


def compile_launches(launches: Sequence[Launch], *, capability: int, jobs: Optional[int] = None,
                     progress: bool = True) -> CompileSummary:
    """Compile every launch into Triton's cache for sm_`capability`, in a process pool (`jobs` workers, default
    one per core), with a tqdm progress bar on stderr when `progress`. Nothing is launched."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(launches) or 1))
    before = _cache_entries()
    start = time.perf_counter()
    failures, cpu = [], 0.0
    if launches:
        import multiprocessing

        from tqdm import tqdm

        context = multiprocessing.get_context("spawn")
        env_interpret = os.environ.pop("TRITON_INTERPRET", None)  # spawned workers inherit the environment
        try:
            with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                     initargs=(capability,)) as pool:
                futures = {pool.submit(compile_launch, launch.to_json()): launch for launch in launches}
                bar = tqdm(total=len(futures), desc="compiling kernels", unit="variant", disable=not progress,
                           file=sys.stderr)
                for future in as_completed(futures):
                    seconds, error = future.result()
                    cpu += seconds
                    if error is not None:
                        failures.append((futures[future].kernel, error))
                    bar.update(1)
                bar.close()
        finally:
            if env_interpret is not None:
                os.environ["TRITON_INTERPRET"] = env_interpret
    return CompileSummary(len(launches), failures, time.perf_counter() - start, cpu, _cache_entries() - before,
                          triton_cache_dir(), jobs)


# ---------------------------------------------------------------------------------------------------------------
# Tuning (GPU)
# ---------------------------------------------------------------------------------------------------------------


def tune(launches: Sequence[Launch], *, progress: bool = True) -> dict:
    """Settle the autotune choice of each launch (recorded without a config) on the current GPU and write the table.

    Each launch runs once through `kernels._common.launch` on random CUDA tensors of its recorded layout, which
    takes the table's choice or times the candidates. Returns {"tuned": n, "seconds": s, "table": path or None}.
    Raises RuntimeError without CUDA.
    """
    import torch
    from tqdm import tqdm

    from sdvae_fast import autotune_table
    from sdvae_fast.kernels._common import launch as run_launch

    if not torch.cuda.is_available():
        raise RuntimeError("tune needs a CUDA device")
    # Small launches first: a run cut short has settled the most keys.
    launches = sorted(launches, key=lambda l: sum(_storage_elements(a) for a in l.args if isinstance(a, dict)))
    start = time.perf_counter()
    written = []
    for i, item in enumerate(tqdm(launches, desc="autotuning", unit="key", disable=not progress, file=sys.stderr)):
        kernel = item.tunable()
        args = [_decode_value(a, "cuda", fill=True) for a in item.args]
        kwargs = {k: _decode_value(v, "cuda", fill=True) for k, v in item.kwargs.items()}
        run_launch(kernel, item.grid, *args, **kwargs)
        del args, kwargs
        if i % 16 == 15:  # a run cut short keeps what it settled
            written = autotune_table.save_tables() or written
    torch.cuda.synchronize()
    written = autotune_table.save_tables() or written
    return {"tuned": len(launches), "seconds": time.perf_counter() - start,
            "table": str(written[0]) if written else None}


# ---------------------------------------------------------------------------------------------------------------
# Plans (bench/gpu_plan.json)
# ---------------------------------------------------------------------------------------------------------------


def plan_json(sections: dict, *, capability: int) -> dict:
    """A plan from {section name: Recording}: every variant and tuning job once (variants deduplicated by Triton's
    cache key), sections listing their indices. A variant of an autotuned kernel is stored as its tuning job's
    index plus the config's keyword arguments; other variants with their whole launch."""
    import triton

    variants: dict = {}  # triton key -> Launch
    tunes: dict = {}
    for rec in sections.values():
        for key, launch in rec.variants.items():
            variants.setdefault(key, launch)
        for key, launch in rec.tunes.items():
            tunes.setdefault(key, launch)
    tune_keys = sorted(tunes)
    tune_index = {key: i for i, key in enumerate(tune_keys)}
    order = sorted(variants, key=lambda k: variants[k].ident())
    index = {key: i for i, key in enumerate(order)}

    def compact(launch: Launch) -> dict:
        # The tuning job's launch plus the config, when that rebuilds this launch exactly (launches of one autotune
        # key may differ in constexprs outside the key, e.g. HAS_RESIDUAL); else the whole launch.
        base = tunes.get(launch.tune_key) if launch.tune_key is not None else None
        if base is not None and base.args == launch.args:
            config = {k: v for k, v in launch.kwargs.items() if k not in base.kwargs}
            if list({**base.kwargs, **config}.items()) == list(launch.kwargs.items()):
                return {"tune": tune_index[launch.tune_key], "config": config}
        return launch.to_json()

    return {
        "format": PLAN_FORMAT,
        "target": f"sm_{capability}",
        "triton": triton.__version__,
        "sections": {name: {"variants": sorted(index[k] for k in rec.variants),
                            "tunes": sorted(tune_index[k] for k in rec.tunes)}
                     for name, rec in sections.items()},
        "tunes": [dict(tunes[k].to_json(), tune_key=k) for k in tune_keys],
        "variants": [compact(variants[k]) for k in order],
    }


def load_plan(path, sections: Optional[Sequence[str]] = None) -> tuple[list, list]:
    """(variants, tuning jobs) of a plan file, for the named sections (default all), as `Launch` lists.

    Raises ValueError on another format or an unknown section name (listing the plan's sections).
    """
    with open(path) as f:
        plan = json.load(f)
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path}: plan format {plan.get('format')!r}, expected {PLAN_FORMAT}")
    names = list(plan["sections"]) if not sections else list(sections)
    unknown = [n for n in names if n not in plan["sections"]]
    if unknown:
        raise ValueError(f"unknown plan sections {unknown}; the plan has {sorted(plan['sections'])}")
    tunes = [Launch.from_json(t) for t in plan["tunes"]]

    def expand(data: dict) -> Launch:
        if "tune" not in data:
            return Launch.from_json(data)
        base = tunes[data["tune"]]
        return Launch(base.kernel, list(base.args), {**base.kwargs, **data["config"]}, base.tune_key)

    variant_ids = sorted({i for n in names for i in plan["sections"][n]["variants"]})
    tune_ids = sorted({i for n in names for i in plan["sections"][n]["tunes"]})
    return [expand(plan["variants"][i]) for i in variant_ids], [tunes[i] for i in tune_ids]


def variant_keys(launches: Sequence[Launch], *, capability: int, shared_memory: Optional[int] = None) -> set:
    """Triton's cache keys of the given launches on sm_`capability`, through the real front end, compiling
    nothing (what a process would compile, recorded by key)."""
    shared = shared_memory if shared_memory is not None else TARGET_SHARED_MEMORY.get(capability, 101376)
    with recording(capability, shared) as recorder:
        for launch in launches:
            fn = _jit_function(launch.kernel)
            args = [_decode_value(a, "meta") for a in launch.args]
            kwargs = {k: _decode_value(v, "meta") for k, v in launch.kwargs.items()}
            fn.run(*args, grid=(1, 1, 1), warmup=True, **kwargs)
    return set(recorder.result.variants)


# ---------------------------------------------------------------------------------------------------------------
# The whole warmup
# ---------------------------------------------------------------------------------------------------------------


def _filter_by_table(variants: Sequence[Launch], tunes: dict) -> list:
    """Drop the candidate variants of autotune keys whose choice the current GPU's table already holds."""
    import torch

    from sdvae_fast import autotune_table

    if not torch.cuda.is_available():
        return list(variants)
    table = autotune_table.table_for(autotune_table.device_header())
    kept = []
    for launch in variants:
        record = table.entries.get(launch.tune_key) if launch.tune_key else None
        if record is not None:
            config = {"kwargs": {k: launch.kwargs.get(k) for k in record["kwargs"]},
                      "num_warps": launch.kwargs.get("num_warps"), "num_stages": launch.kwargs.get("num_stages")}
            if config != record:
                continue
        kept.append(launch)
    return kept


def warmup(presets: Sequence[str] = ("sd15",), *, vae=None, res: Sequence[int] = (512,),
           batch: Sequence[int] = (1,), dtypes: Sequence = ("bf16",), encode: bool = True, decode: bool = True,
           target: Optional[str] = None, plan=None, sections: Optional[Sequence[str]] = None,
           jobs: Optional[int] = None, tune_now: bool = True, progress: bool = True,
           log: Callable[[str], None] = print) -> dict:
    """Precompile every kernel variant that encode/decode will launch, in parallel, then settle autotuning.

    Args:
        presets: preset names to warm up (ignored when `vae` or `plan` is given).
        vae: a config folder/dict or a model instead of presets.
        res, batch, dtypes: image sides in pixels, batch sizes and dtypes (fp16/bf16/fp32) to cover (every
            combination).
        encode, decode: which directions to cover.
        target: "sm_90" etc. to compile ahead of time without a GPU (nothing is launched or tuned); None: the
            current CUDA device (RuntimeError without one).
        plan: a plan file (bench/gpu_plan.json) to warm up instead of the workloads above; `sections` picks its
            sections (default all).
        jobs: compile workers (default one per core).
        tune_now: on a GPU, settle the autotune choices after compiling and write the table.
        progress: show progress bars; log: where the summary lines go.
    Returns:
        {"variants": n, "compile": CompileSummary, "tune": dict or None, "record_seconds": s}.
    Raises:
        ValueError on an unknown preset, dtype, target or plan section; RuntimeError without CUDA and target.
    """
    start = time.perf_counter()
    if target is not None:
        capability, shared = parse_target(target)
    else:
        capability, shared = current_gpu_target()
    if plan is not None:
        variants, tunes = load_plan(plan, sections)
    else:
        from sdvae_fast.configs import PRESETS

        models = [vae] if vae is not None else list(presets)
        for name in models:
            if isinstance(name, str) and vae is None and name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; valid preset names: {sorted(PRESETS)}")
        dtype_list = [resolve_dtype(d) for d in dtypes]
        workloads = [
            (lambda rec, m=m, r=r, b=b, d=d: record_vae(rec, m, r, b, d, encode=encode, decode=decode))
            for m in models for r in res for b in batch for d in dtype_list
        ]
        found = record(workloads, capability=capability, shared_memory=shared)
        variants, tunes = list(found.variants.values()), list(found.tunes.values())
    record_seconds = time.perf_counter() - start
    if target is None:
        variants = _filter_by_table(variants, {})
    log(f"warmup: {len(variants)} kernel variants for sm_{capability} found in {record_seconds:.1f} s")
    summary = compile_launches(variants, capability=capability, jobs=jobs, progress=progress)
    log(f"warmup: compiled {summary.format()}")
    tuned = None
    if target is None and tune_now and tunes:
        tuned = tune(tunes, progress=progress)
        log(f"warmup: settled {tuned['tuned']} autotune keys in {tuned['seconds']:.1f} s; table: {tuned['table']}")
    return {"variants": len(variants), "compile": summary, "tune": tuned, "record_seconds": record_seconds}


# ---------------------------------------------------------------------------------------------------------------
# Command line (`sdvae-fast warmup`)
# ---------------------------------------------------------------------------------------------------------------

DESCRIPTION = (
    "Find every kernel variant that encode and decode will launch for the given presets (or --vae), resolutions, "
    "batch sizes and dtypes, by running them on meta tensors with launches recorded instead of executed; compile "
    "them all in parallel (one process per core) into Triton's cache; then, on a GPU, settle the autotune choices "
    "once and write them to sdvae-fast's table, which later processes apply without benchmarking. With --target "
    "sm_90 (no GPU needed) the same variants compile ahead of time for that target. --plan warms up the variants "
    "listed in a plan file instead (bench/gpu_plan.json).")


def add_arguments(parser) -> None:
    """The options of `sdvae-fast warmup` (kept here so cli.py stays light)."""
    parser.add_argument("--preset", nargs="+", default=["sd15"], help="presets to cover (default sd15)")
    parser.add_argument("--vae", metavar="PATH", help="a diffusers VAE folder or config.json instead of presets")
    parser.add_argument("--res", type=int, nargs="+", default=[512], help="image sides in pixels (default 512)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=["fp16", "bf16", "fp32"],
                        help="dtypes (default bf16)")
    parser.add_argument("--encode", action="store_true", help="cover encode only")
    parser.add_argument("--decode", action="store_true", help="cover decode only")
    parser.add_argument("--target", metavar="sm_XY", help="compile ahead of time for this GPU target (no GPU needed)")
    parser.add_argument("--plan", metavar="JSON", help="warm up the variants of a plan file instead")
    parser.add_argument("--section", nargs="+", help="the plan sections to cover (default all)")
    parser.add_argument("--jobs", type=int, help="compile processes (default: one per core)")
    parser.add_argument("--no-tune", action="store_true", help="compile only; leave autotuning to first use")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run_command(args) -> int:
    """`sdvae-fast warmup`: re-runs itself without TRITON_INTERPRET when that is set; exit code 1 when a
    variant failed to compile."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        if "sdvae_fast.kernels._common" not in sys.modules:
            os.environ.pop("TRITON_INTERPRET")  # no kernel is defined yet: they will be, for the GPU
        elif sys.argv[1:2] == ["warmup"]:
            import subprocess

            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            return subprocess.call([sys.executable, "-m", "sdvae_fast.cli", *sys.argv[1:]], env=env)
        else:
            return _interpreter_error()
    vae = None
    if args.vae:
        from sdvae_fast.configs import resolve_config

        vae = dict(resolve_config(args.vae))
    result = warmup(args.preset, vae=vae, res=args.res, batch=args.batch, dtypes=args.dtype,
                    encode=args.encode or not args.decode, decode=args.decode or not args.encode,
                    target=args.target, plan=args.plan, sections=args.section, jobs=args.jobs,
                    tune_now=not args.no_tune, progress=not args.quiet)
    return 1 if result["compile"].failures else 0


def _interpreter_error() -> int:
    print("sdvae-fast warmup: error: TRITON_INTERPRET=1 is set; unset it (the interpreter compiles nothing)",
          file=sys.stderr)
    return 2
