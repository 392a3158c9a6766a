"""Helpers shared by every kernel launcher: where kernels can run, interpreter quirks, autotune pruning.

Triton's interpreter (`TRITON_INTERPRET=1`) runs kernels on CPU tensors. Triton reads that variable when kernels
are decorated, so it must be set before anything that defines kernels is imported; `INTERPRET` records the value
seen at import time. Quirks handled here (docs/design.md, section 9):

- bf16 arithmetic, including `tl.dot` on bf16 operands, is wrong under the interpreter: kernels take the
  constexpr `DOT_FP32=INTERPRET` and upcast dot operands to fp32 when it is set.
- autotuning with more than one config fails under the interpreter: `prune_configs` keeps only the first
  (known-good) config there.
"""
import os
import weakref
from collections import Counter
from typing import Callable, Hashable, Optional, Sequence, Tuple, TypeVar, Union

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fix_interpreter_index() -> None:
    """Make Triton < 3.7's interpreter work with numpy >= 2.4 (triton-lang/triton#9171).

    Its `tensor.__index__` (what `range()` over a run-time loop bound calls) is `int(data)` on a 1-element
    array, which numpy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"); later
    Triton releases use `int(data.squeeze())`. Re-register that after Triton's own patching; a no-op where
    Triton already has the fix.
    """
    import inspect

    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    try:
        buggy = original is not None and "int(self.handle.data))" in inspect.getsource(original)
    except (OSError, TypeError):
        buggy = False
    if not buggy:
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


if INTERPRET:
    _fix_interpreter_index()


def kernels_available(device) -> bool:
    """Whether the Triton kernels can run on `device` (a `torch.device` or string).

    True on CUDA devices when CUDA is available, and on CPU when the interpreter is on. Kernel launchers raise
    (and the ops fall back to the PyTorch reference) when this is False.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "meta":
        return RECORDER is not None
    return device.type == "cpu" and INTERPRET


def max_shared_memory(device) -> int:
    """Shared memory per block in bytes on `device`; effectively unlimited under the interpreter."""
    device = torch.device(device)
    if device.type == "meta" and RECORDER is not None:
        return RECORDER.shared_memory
    if device.type != "cuda":
        return 1 << 62
    import triton

    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def prune_configs(configs, smem_bytes, device):
    """Keep the autotune configs whose shared-memory estimate fits `device`.

    Args:
        configs: list of `triton.Config`, the first being the known-good default.
        smem_bytes: callable `Config -> int`, the kernel's estimate of its shared memory in bytes.
        device: where the kernel runs.
    Returns:
        The fitting configs (the first config alone under the interpreter, which cannot autotune); at least one
        config is always kept (the smallest), so a launch never finds none.
    """
    device_type = torch.device(device).type
    if INTERPRET or not (device_type == "cuda" or (device_type == "meta" and RECORDER is not None)):
        return configs[:1]
    limit = max_shared_memory(device)
    kept = [c for c in configs if smem_bytes(c) <= limit]
    return kept or [min(configs, key=smem_bytes)]


#: The active launch recorder of `sdvae_fast.warmup` (None: kernels launch). While one is active, kernels "run" on
#: meta tensors: `kernels_available` is True for them, `max_shared_memory` gives the recorded target's, and `launch`
#: hands every launch to the recorder instead of the GPU.
RECORDER = None


def launch(kernel, grid, *args, **kwargs):
    """Launch `kernel[grid](*args, **kwargs)`, the one launch path of the autotuned kernels.

    `kernel` is a `@triton.jit` function or a `@triton.autotune` wrapper of one. Plain kernels, and every kernel
    under the interpreter, launch as written. On a GPU an autotuned kernel launches the config chosen for its
    autotune key by `sdvae_fast.autotune_table` (a persisted table, or a short tuning run on first use) directly
    on the wrapped kernel, without Triton's autotuner. While `RECORDER` is set (warmup), nothing is launched: the
    recorder notes the kernel variants the launch would compile.
    Returns what the Triton launch returns (None while recording).
    """
    if RECORDER is not None:
        return RECORDER.launch(kernel, grid, args, kwargs)
    if INTERPRET or not hasattr(kernel, "configs"):
        return kernel[grid](*args, **kwargs)
    from sdvae_fast.autotune_table import choose_config

    config = choose_config(kernel, grid, args, kwargs)
    return kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


def require_kernels(device, what: str) -> None:
    """Raise a RuntimeError naming `what` when the kernels cannot run on `device`.

    Without this check a launch on CPU without the interpreter fails with Triton's "0 active drivers".
    """
    if not kernels_available(device):
        raise RuntimeError(
            f"{what}: Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before import for CPU "
            f"tensors; got a tensor on {torch.device(device)}. Use the 'torch' backend instead."
        )


def tensor_stamp(t: torch.Tensor) -> tuple:
    """A key that changes whenever `t`'s values may have changed: (version counter, storage, dtype, device, shape).

    Caches of prepared weights (packed, folded, concatenated) compare stamps to decide whether to rebuild. The
    version counter moves on every in-place write (`copy_` in `load_state_dict`, optimiser steps) and `data_ptr`
    on `.data` swaps and `.to()`. Inference tensors (created under `torch.inference_mode()`) track no version
    counter; for them the stamp holds -1, so only a storage, dtype or shape change is seen (they can be written
    in place only inside inference mode).
    """
    version = -1 if t.is_inference() else t._version
    return (version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))


#: The profiler range (`torch.profiler.record_function`) around every build of a derived weight: its ops (weight
#: packing, the upsample fold's stacks) run once per weight and version, not per call.
DERIVE_RANGE = "sdvae_fast::derive_weight"


class DerivedCache:
    """The one cache of weights derived from parameters: packed conv weights, folded upsample phases, the fused
    q/k/v projection, the encoder's folded quant_conv.

    Rule: an entry is reused only while every source is the same live tensor object (checked through a weak
    reference, because `id()` values are recycled) with an unchanged `tensor_stamp` (version counter, storage,
    dtype, device, shape). So `.to()`, `load_state_dict`, optimiser steps and other in-place writes rebuild it on
    the next call, and an entry is dropped as soon as any of its sources is freed. Writes through `.data` bypass
    the version counter and are not seen. Under `torch.compile` nothing is cached: the build is traced into the
    graph (a few small copies or matmuls per call), which keeps Python-side state out of the graph.

    `builds` counts builds per tag kind (the first element of a tuple tag, or the tag itself); tests use it to prove
    that an unchanged weight is never rebuilt.
    """

    def __init__(self):
        self._entries: dict = {}
        self.builds: Counter = Counter()

    def get(self, sources: Sequence[Optional[torch.Tensor]], tag: Hashable, build: Callable[[], "_T"]) -> "_T":
        """`build()` (run under `torch.no_grad()`), cached under (`sources`' identities, `tag`).

        Args:
            sources: the tensors the value is derived from (None entries allowed, e.g. a missing bias).
            tag: what is derived and how (for example `("conv_pack", torch.bfloat16)`); part of the key.
            build: computes the value from the current contents of `sources`.
        Returns:
            The cached value while every source is unchanged, else a fresh `build()` (which replaces the entry).
        """
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return build()
        key = (tuple(None if t is None else id(t) for t in sources), tag)
        stamps = tuple(None if t is None else tensor_stamp(t) for t in sources)
        entry = self._entries.get(key)
        if entry is not None:
            refs, old_stamps, value = entry
            alive = all((r is None) == (t is None) and (r is None or r() is t) for r, t in zip(refs, sources))
            if alive and old_stamps == stamps:
                return value
        # A profiler range, so that traces show the one-time derivation (and its ops) as such.
        with torch.no_grad(), torch.profiler.record_function(DERIVE_RANGE):
            value = build()
        self.builds[tag[0] if isinstance(tag, tuple) else tag] += 1
        entries = self._entries

        def drop(_ref, key=key):
            entries.pop(key, None)

        refs = tuple(None if t is None else weakref.ref(t, drop) for t in sources)
        entries[key] = (refs, stamps, value)
        return value

    def clear(self) -> None:
        """Drop every entry (the next call of each derived weight builds it again)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_T = TypeVar("_T")

#: The process-wide cache of derived weights (see `DerivedCache`).
derived_weights = DerivedCache()

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_names(dtypes) -> str:
    """'float16, bfloat16 or float32' for a tuple of torch dtypes."""
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(
    name: str,
    t,
    *,
    ndim: Union[int, Tuple[int, ...], None] = None,
    layout: Optional[str] = None,
    shape: Optional[Sequence[int]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    floating: bool = False,
    device=None,
    nonempty: bool = False,
) -> None:
    """The kernel launchers' one checker of their tensor invariants: raise naming `name` unless `t` meets each
    condition given. (User-facing validation happens earlier, in `sdvae_fast.ops`' public functions; this keeps
    launchers called directly from failing inside Triton.)

    Args:
        name: the argument's name, used in the messages.
        t: the value to check.
        ndim: required number of dimensions, or a tuple of allowed ones; `layout` names them in the message
            (for example "4-D (N, C, H, W)"), else "<ndim>-D".
        shape: required exact shape.
        dtypes: allowed dtypes (for example `SUPPORTED_DTYPES`); floating: require a floating-point dtype.
        device: required device. nonempty: require at least one element.
    Raises:
        TypeError: not a tensor, or a dtype outside `dtypes` / not floating point.
        ValueError: wrong number of dimensions, shape or device, or empty.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else tuple(ndim)):
        raise ValueError(f"{name} must be {layout or f'{ndim}-D'}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be {_dtype_names(dtypes)} for the Triton kernel, got {t.dtype}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on {device} like x, got {t.device}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def check_image_input(x, name: str = "x") -> None:
    """Raise naming `name` unless x is a non-empty 4-D (N, C, H, W) fp16/bf16/fp32 tensor (what the kernels take).

    Raises:
        TypeError: not a tensor, or another dtype (fp64 and integers run on the PyTorch reference instead).
        ValueError: not 4-D, or empty.
    """
    check_tensor(name, x, ndim=4, layout="4-D (N, C, H, W)", dtypes=SUPPORTED_DTYPES, nonempty=True)


def conv_output_size(size, kernel: int, pad_before: int, pad_after: int, stride: int):
    """Output length of a convolution along one axis: `(size + pad_before + pad_after - kernel) // stride + 1`.

    The one formula used by the conv launchers and by `sdvae_fast.ops` (validation and fake shapes). Works on
    ints and on symbolic sizes (torch.SymInt) alike. A result below 1 means the input is too small.
    """
    return (size + pad_before + pad_after - kernel) // stride + 1
