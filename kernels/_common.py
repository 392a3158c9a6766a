"""Helpers shared by every kernel launcher: where kernels can run, interpreter quirks, autotune pruning.

Triton's interpreter (`TRITON_INTERPRET=1`) runs kernels on CPU tensors. Triton reads that variable when kernels
are decorated, so it must be set before anything that defines kernels is imported; `INTERPRET` records the value
seen at import time. Quirks handled here (see ../shared/DESIGN.md section 5):

- bf16 arithmetic, including `tl.dot` on bf16 operands, is wrong under the interpreter: kernels take the
  constexpr `DOT_FP32=INTERPRET` and upcast dot operands to fp32 when it is set.
- autotuning with more than one config fails under the interpreter: `prune_configs` keeps only the first
  (known-good) config there.
"""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_available(device) -> bool:
    """Whether the Triton kernels can run on `device` (a `torch.device` or string).

    True on CUDA devices when CUDA is available, and on CPU when the interpreter is on. Kernel launchers raise
    (and the ops fall back to the PyTorch reference) when this is False.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and INTERPRET


def max_shared_memory(device) -> int:
    """Shared memory per block in bytes on `device`; effectively unlimited under the interpreter."""
    device = torch.device(device)
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
    if INTERPRET or torch.device(device).type != "cuda":
        return configs[:1]
    limit = max_shared_memory(device)
    kept = [c for c in configs if smem_bytes(c) <= limit]
    return kept or [min(configs, key=smem_bytes)]


def require_kernels(device, what: str) -> None:
    """Raise a RuntimeError naming `what` when the kernels cannot run on `device`.

    Without this check a launch on CPU without the interpreter fails with Triton's "0 active drivers".
    """
    if not kernels_available(device):
        raise RuntimeError(
            f"{what}: Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before import for CPU "
            f"tensors; got a tensor on {torch.device(device)}. Use the 'torch' backend instead."
        )
