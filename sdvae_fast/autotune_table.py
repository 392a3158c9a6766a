"""Our own autotune table: the tile config chosen for each (kernel, autotune key), persisted as JSON per device.

Why not Triton's autotuner: it benchmarks every launch of a new key in every process (triton 3.6 even when pruning
leaves one config), with 25 ms of warm-up and 100 ms of repeats per config, and its on-disk cache is keyed on the
Triton installation, so it stays per machine. Here `kernels._common.launch` asks `choose_config` for the config of
an autotuned kernel and launches that config directly on the wrapped `@triton.jit` function:

1. a config pinned with `pinned_config` (tests launch every candidate this way);
2. the table's entry for the key, when the table matches this device and versions and the entry is still among
   the candidates (the configs that survive the kernel's own pruning for this shape);
3. otherwise tuning now: one candidate is taken as it is; several are timed with CUDA events (`WARMUP_MS` of
   warm-up, about `REP_MS` of repeats, the median; `_time_config`) and the fastest is kept.
New choices are written back to the user table at exit (and by `sdvae-fast warmup`), so later processes launch
them without benchmarking.

Table file (JSON): `{"format": 1, "header": {"device", "capability", "triton", "torch"}, "entries": {KEY: CONFIG}}`
where KEY is `json.dumps([kernel, key values, tensor dtypes])` (kernel = "module:function" of the jitted
function, key values = the kernel's `triton.autotune(key=...)` arguments in order) and CONFIG is
`{"kwargs": {...}, "num_warps": int, "num_stages": int}`. A table whose header differs from this process's (another
GPU, triton or torch) is ignored: the kernels are then tuned at first use, never an error. Files are looked up in
order: `$SDVAE_FAST_AUTOTUNE_TABLE` (one file), the user table `~/.cache/sdvae_fast/autotune/SLUG.json` (SLUG from
the device name, capability and versions), and the table shipped in the package (`sdvae_fast/data/autotune/`).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Optional

FORMAT = 1
#: Warm-up and repeat times (milliseconds) per candidate when a key is tuned (`_time_config`).
WARMUP_MS = 2
REP_MS = 6
TABLE_ENV = "SDVAE_FAST_AUTOTUNE_TABLE"
_SHIPPED_DIR = Path(__file__).parent / "data" / "autotune"

_lock = threading.Lock()
_tables: dict = {}  # header json -> AutotuneTable (the table of each device seen in this process)
_pins: dict = {}  # kernel name -> triton.Config
_last: dict = {}  # kernel name -> the config its latest launch used
_atexit_registered = False


def kernel_name(kernel) -> str:
    """ "module:function" of a `@triton.jit` function or of the one a `@triton.autotune` wrapper holds."""
    fn = getattr(kernel, "fn", kernel)
    fn = getattr(fn, "fn", fn)  # JITFunction -> the Python function
    return f"{fn.__module__}:{fn.__name__}"


def autotune_key(kernel, args: tuple, kwargs: dict) -> str:
    """The table key of a launch of the autotuned `kernel`: kernel name, the values of its autotune key arguments
    (in the order of `triton.autotune(key=...)`) and the dtypes of its tensor arguments, as a JSON string.

    Raises KeyError naming the argument when a key argument is missing from the launch.
    """
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    values = []
    for name in kernel.keys:
        if name not in named:
            raise KeyError(f"autotune key argument {name!r} of {kernel_name(kernel)} is not in the launch")
        value = named[name]
        values.append(value if isinstance(value, (bool, int, float, str)) or value is None else str(value))
    dtypes = [str(a.dtype) for a in list(args) + list(kwargs.values()) if hasattr(a, "dtype")]
    return json.dumps([kernel_name(kernel), values, dtypes])


def config_record(config) -> dict:
    """A `triton.Config` as a table entry: {"kwargs": {...}, "num_warps": int, "num_stages": int}."""
    return {"kwargs": dict(config.kwargs), "num_warps": int(config.num_warps), "num_stages": int(config.num_stages)}


def _matching(configs, record: dict):
    """The config of `configs` that `record` describes, or None (a stale entry)."""
    for config in configs:
        if config_record(config) == record:
            return config
    return None


def candidates(kernel, args: tuple, kwargs: dict) -> list:
    """The configs worth timing for this launch: the kernel's own `early_config_prune` (shape and shared memory)
    applied to its config list, or the whole list without a prune hook."""
    configs = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None:
        return configs
    return list(prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)) or configs


def device_header(device_index: Optional[int] = None) -> dict:
    """What a table is valid for: this CUDA device's name and compute capability, the triton and torch versions.

    Raises RuntimeError when CUDA is not available.
    """
    import torch
    import triton

    if not torch.cuda.is_available():
        raise RuntimeError("device_header: no CUDA device; the autotune table is per GPU")
    index = torch.cuda.current_device() if device_index is None else device_index
    major, minor = torch.cuda.get_device_capability(index)
    return {"device": torch.cuda.get_device_name(index), "capability": [major, minor],
            "triton": triton.__version__, "torch": torch.__version__}


def table_slug(header: dict) -> str:
    """A file name stem for a header: device name, sm_XY, triton and torch versions."""
    text = f"{header['device']}-sm{''.join(str(c) for c in header['capability'])}-triton{header['triton']}-torch" \
           f"{header['torch']}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def user_table_path(header: dict) -> Path:
    """Where this process writes its table: `$SDVAE_FAST_AUTOTUNE_TABLE`, else ~/.cache/sdvae_fast/autotune/."""
    if os.environ.get(TABLE_ENV):
        return Path(os.environ[TABLE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sdvae_fast" / "autotune" / f"{table_slug(header)}.json"


class AutotuneTable:
    """The chosen configs of one device and version set (see the module docstring for the file format)."""

    def __init__(self, header: dict, entries: Optional[dict] = None):
        self.header = dict(header)
        self.entries: dict = dict(entries or {})
        self.dirty = False

    @classmethod
    def load(cls, path, header: dict) -> "AutotuneTable":
        """The table in `path` when its format and header match `header`; an empty table when the file is missing,
        unreadable or stale (another device, capability, triton or torch version)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls(header)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("header") != header:
            return cls(header)
        entries = data.get("entries")
        return cls(header, entries if isinstance(entries, dict) else {})

    def merge(self, other: "AutotuneTable") -> None:
        """Add `other`'s entries that this table lacks (same header only)."""
        if other.header == self.header:
            for key, value in other.entries.items():
                self.entries.setdefault(key, value)

    def save(self, path) -> Path:
        """Write the table to `path` (folders created; written to a temporary file, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "header": self.header, "entries": self.entries},
                                  indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        self.dirty = False
        return path


def table_for(header: dict) -> AutotuneTable:
    """This process's table for `header`, loaded on first use from the user table and the shipped one."""
    key = json.dumps(header, sort_keys=True)
    with _lock:
        table = _tables.get(key)
        if table is None:
            table = AutotuneTable.load(user_table_path(header), header)
            if _SHIPPED_DIR.is_dir():
                table.merge(AutotuneTable.load(_SHIPPED_DIR / f"{table_slug(header)}.json", header))
            _tables[key] = table
        return table


def save_tables() -> list:
    """Write every table that gained entries in this process to its user path; returns the paths written.
    Errors (a read-only home, say) become warnings: a table is only a cache."""
    written = []
    for table in list(_tables.values()):
        if table.dirty:
            path = user_table_path(table.header)
            try:
                written.append(table.save(path))
            except OSError as error:
                warnings.warn(f"sdvae_fast: could not write the autotune table {path}: {error}")
    return written


@contextlib.contextmanager
def pinned_config(kernel, config):
    """Within the block, every launch of the autotuned `kernel` uses `config` (no table, no tuning).

    Args:
        kernel: a `@triton.autotune` kernel (e.g. `sdvae_fast.kernels.conv._conv_kernel`).
        config: one of its `triton.Config`s.
    """
    name = kernel_name(kernel)
    previous = _pins.get(name)
    _pins[name] = config
    try:
        yield
    finally:
        if previous is None:
            _pins.pop(name, None)
        else:
            _pins[name] = previous


def last_config(kernel):
    """The config the latest launch of the autotuned `kernel` used in this process (None before any)."""
    return _last.get(kernel_name(kernel))


def _time_config(kernel, grid, args, kwargs, config) -> float:
    """Median milliseconds of one launch with `config` (inf when it fails to compile or launch).

    One untimed launch (it loads the compiled kernel), then launches timed with CUDA events for about `REP_MS`
    after `WARMUP_MS` of warm-up, at most 50; a launch longer than `REP_MS` is timed once, so a 100 ms launch at
    4096^2 costs two launches per candidate rather than Triton's 25 + 100 ms budget.
    """
    import torch

    def run():
        kernel.fn[grid](*args, **kwargs, **config.all_kwargs())

    try:
        run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        first = max(start.elapsed_time(end), 1e-3)
        if first >= REP_MS:
            return float(first)  # a long launch: one timed run decides
        for _ in range(min(50, int(WARMUP_MS / first))):
            run()
        times = []
        for _ in range(max(1, min(50, int(REP_MS / first)))):
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return float(times[len(times) // 2])
    except Exception as error:  # noqa: BLE001 - an out-of-resources config just loses
        if "out of resource" not in str(error).lower() and "OutOfResources" not in type(error).__name__:
            warnings.warn(f"sdvae_fast: config {config} of {kernel_name(kernel)} failed while tuning: {error}")
        return float("inf")


def choose_config(kernel, grid, args: tuple, kwargs: dict):
    """The config an autotuned `kernel` launches with for these arguments (CUDA tensors): pinned, from the table,
    or tuned now and added to the table (see the module docstring).

    Returns a `triton.Config`. Raises RuntimeError when every candidate fails to run.
    """
    name = kernel_name(kernel)
    if name in _pins:
        chosen = _pins[name]
    else:
        memo = _memo_key(kernel, name, args, kwargs)
        chosen = _memo.get(memo)
        if chosen is None:
            chosen = _memo[memo] = _choose(kernel, name, grid, args, kwargs)
    _last[name] = chosen
    return chosen


_memo: dict = {}  # (kernel, key values, dtypes, device) -> the config chosen in this process
_positions: dict = {}  # (kernel, key names) -> {key name: position in the kernel's arguments}


def _memo_key(kernel, name: str, args: tuple, kwargs: dict) -> tuple:
    """What identifies a launch's choice in this process, cheaper than `autotune_key` (no JSON, no pruning):
    the launch path pays it on every call."""
    keys = tuple(kernel.keys)
    positions = _positions.get((name, keys))
    if positions is None:
        index = {n: i for i, n in enumerate(kernel.arg_names)}
        positions = _positions[(name, keys)] = {k: index.get(k) for k in keys}
    values = tuple(kwargs[k] if k in kwargs else args[positions[k]] for k in keys)
    tensors = [a for a in args if hasattr(a, "dtype")]
    return name, values, tuple(a.dtype for a in tensors), tensors[0].device if tensors else None


def _choose(kernel, name, grid, args, kwargs):
    """`choose_config` for a launch not seen in this process: the table's entry, or tuning now."""
    global _atexit_registered
    pool = candidates(kernel, args, kwargs)
    if len(pool) == 1:
        return pool[0]
    device = next(a.device for a in args if hasattr(a, "device"))
    table = table_for(device_header(device.index))
    key = autotune_key(kernel, args, kwargs)
    record = table.entries.get(key)
    chosen = _matching(pool, record) if record is not None else None
    if chosen is not None:
        return chosen
    times = [(_time_config(kernel, grid, args, kwargs, config), i) for i, config in enumerate(pool)]
    best_ms, best = min(times)
    if best_ms == float("inf"):
        raise RuntimeError(f"{name}: every autotune candidate failed for key {key}")
    chosen = pool[best]
    with _lock:
        table.entries[key] = config_record(chosen)
        table.dirty = True
        if not _atexit_registered:
            atexit.register(save_tables)
            _atexit_registered = True
    return chosen
