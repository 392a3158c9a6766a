"""Backend names, and the one rule that decides whether a forward runs the kernels (docs/design.md, section 3).

- "torch": always the PyTorch modules (the reference).
- "auto": the Triton kernels on CUDA devices, the PyTorch modules elsewhere (the default; also set with the
  environment variable `SDVAE_FAST_BACKEND`).
- "triton": always the kernels; on CPU that needs `TRITON_INTERPRET=1` set before `sdvae_fast` is imported,
  and without it a forward raises instead of falling back silently.

Also here: whether diffusers is installed (`HAS_DIFFUSERS`), which decides what the model classes are (subclasses
of diffusers' own, or for the classes that need diffusers, `needs_diffusers` stand-ins that say so).

Importing this module imports neither torch nor Triton (the command line's `--help` stays fast).
"""
from __future__ import annotations

import importlib.util

#: Whether diffusers is installed: then `AutoencoderKL`, `AutoencoderKLFlux2`, `VQModel` and
#: `ConsistencyDecoderVAE` are subclasses of diffusers' classes of the same names.
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None

BACKENDS = ("auto", "triton", "torch")
#: The environment variable that sets the default backend of new models and of the command line.
BACKEND_ENV = "SDVAE_FAST_BACKEND"


def check_backend(name, source: str = "backend") -> str:
    """Return `name` when it is a backend name, else raise naming `source` (an argument or variable name).

    Raises:
        ValueError: `name` is not one of BACKENDS (the message lists them).
    """
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def use_fast_path(backend: str, device) -> bool:
    """Whether a forward on `device` should run the fast path for the backend named `backend`.

    Args:
        backend: one of BACKENDS (see the module docstring).
        device: a `torch.device` or device string, where the input tensor lives.
    Returns:
        True to run the fast path (the kernels), False to run the reference modules.
    Raises:
        ValueError: unknown backend name (the message lists the valid ones).
        RuntimeError: backend "triton" where the kernels cannot run (CPU without the interpreter); there is no
            silent fallback.
    """
    import torch

    check_backend(backend)
    device = torch.device(device)
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return False
    from sdvae_fast.kernels._common import kernels_available

    if backend == "auto":
        return kernels_available(device)
    if not kernels_available(device):
        raise RuntimeError(
            f"backend 'triton' cannot run on {device}: the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 "
            "set before importing sdvae_fast for CPU tensors. Use backend 'auto' or 'torch' instead."
        )
    return True


def parameters_match(modules, x) -> bool:
    """Whether every parameter of `modules` (None entries skipped) is on x's device and in x's dtype: the fast
    path's precondition. Offloading hooks (accelerate, diffusers' group offload) and layerwise casting leave
    parameters elsewhere or in a storage dtype; their modules' own forwards know how to run them."""
    return all(p.device == x.device and p.dtype == x.dtype
               for module in modules if module is not None for p in module.parameters())


def needs_diffusers(name: str, constructors: tuple = ("from_pretrained", "from_config"), note: str = "") -> type:
    """A stand-in for the model class `name` where diffusers is missing: importing it works, constructing it or
    calling any of its classmethods `constructors` raises ImportError("sdvae_fast.NAME needs diffusers ...").

    Args:
        name: the class name, the same in sdvae_fast and diffusers (e.g. "VQModel").
        constructors: the classmethods that build or load a model (each raises the same ImportError).
        note: appended to the message (e.g. what a standalone version would need).
    """
    message = (f"sdvae_fast.{name} needs diffusers (pip install diffusers): it is a subclass of diffusers.{name}"
               + (f"; {note}" if note else ""))

    def refuse(cls, *args, **kwargs):
        raise ImportError(message)

    namespace = {"__doc__": f"Placeholder without diffusers: {message}.", "__new__": refuse,
                 **{method: classmethod(refuse) for method in constructors}}
    return type(name, (), namespace)
