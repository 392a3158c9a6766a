"""`ConsistencyDecoderVAE`: DALL-E 3's consistency decoder (diffusers' class) with sdvae-fast's backends (issue 13).

    from sdvae_fast import ConsistencyDecoderVAE
    vae = ConsistencyDecoderVAE.from_pretrained("path/to/openai-consistency-decoder")   # diffusers' folder
    vae.set_backend("triton")                  # "auto" (default): the kernels on CUDA; "torch": diffusers' code
    images = vae.decode(z, generator=torch.Generator().manual_seed(0)).sample   # 2 UNet steps, (N, 3, 8h, 8w)

With diffusers installed, `ConsistencyDecoderVAE` is a subclass of `diffusers.ConsistencyDecoderVAE`: constructor
arguments, `config`, state-dict names, `from_pretrained` / `save_pretrained` (folders interchangeable with
diffusers', `_class_name` "ConsistencyDecoderVAE"), `encode`, `decode(z, generator=None, return_dict=True,
num_inference_steps=2)`, `forward` and the scheduler arithmetic (`ConsistencyDecoderScheduler`: latents
normalised with fixed means/stds and upsampled 8x, 2 steps at timesteps 1008 and 512) are diffusers' own code.
What is added: `backend` / `set_backend("auto" | "triton" | "torch")` (`sdvae_fast.backends`), and the one
place the backend acts: the decoder's UNet call. `decode` calls `self.decoder_unet(model_input, t)` once per
step; the constructor installs an instance `forward` on `decoder_unet` that runs `sdvae_fast.fast.run_unet`
(the UNet's units: scale/shift ResNets fused into one GroupNorm+SiLU+conv op each, the rest per unit as module
forwards; docs/design.md, "The consistency decoder") when the backend says so (`backends.use_fast_path`: CUDA
for "auto"; CUDA or CPU under TRITON_INTERPRET=1 for "triton"), the parameters are in the input's dtype and
device, no class labels are passed and autograd is not needed; otherwise UNet2DModel's own forward runs, so
backend "torch" is diffusers' decode bit for bit. The encoder is diffusers' Encoder as is (not yet on the
kernels, see issue 13).

Without diffusers, constructing or loading `ConsistencyDecoderVAE` raises ImportError naming diffusers: a
reference UNet2DModel and scheduler of our own are future work (issue 13).
"""
from __future__ import annotations

import importlib.util
import os
import types

import torch

from sdvae_fast.backends import BACKEND_ENV, check_backend, parameters_match

#: Whether diffusers is installed (then `ConsistencyDecoderVAE` is a subclass of diffusers' class).
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None

__all__ = ["ConsistencyDecoderVAE", "HAS_DIFFUSERS"]

#: Where the UNet's instance forward reads the backend: an entry of `decoder_unet.__dict__` (copied by
#: `copy.deepcopy` and pickling with the module, unlike a reference back to the VAE).
_BACKEND_KEY = "_sdvae_fast_backend"


def _unet_runs_fast(unet: torch.nn.Module, backend: str, sample) -> bool:
    """Whether the UNet call on `sample` takes the fast path (see the module docstring). Off CUDA with backend
    "auto" (and for "torch") the fast package is never imported."""
    if backend == "torch" or (backend == "auto" and getattr(sample, "device", torch.device("cpu")).type != "cuda"):
        return False
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or not parameters_match((unet,), sample):
        return False
    from sdvae_fast import fast

    if fast.needs_autograd(unet, sample) or fast.unet_why_not(unet) is not None:
        return False
    return fast.use_fast_path(backend, sample.device)


def _decoder_unet_forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
    """The instance `forward` of `ConsistencyDecoderVAE.decoder_unet` (a diffusers UNet2DModel).

    Same signature and outputs as `UNet2DModel.forward(sample, timestep, class_labels=None, return_dict=True)`:
    sample (N, C_in, H, W) in the UNet's dtype and device; timestep a number, a 0-d tensor or (N,) tensor;
    returns `UNet2DOutput(sample=(N, C_out, H, W))` or a 1-tuple. Runs `fast.run_unet` when `_unet_runs_fast`
    says so, else the class's own forward (errors are then diffusers')."""
    backend = self.__dict__.get(_BACKEND_KEY, "torch")
    if class_labels is None and _unet_runs_fast(self, backend, sample):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        from sdvae_fast import fast

        y = fast.run_unet(self, sample, timestep)
        return UNet2DOutput(sample=y) if return_dict else (y,)
    return type(self).forward(self, sample, timestep, class_labels=class_labels, return_dict=return_dict)


if HAS_DIFFUSERS:
    import functools

    from diffusers import ConsistencyDecoderVAE as _DiffusersConsistencyDecoderVAE

    class ConsistencyDecoderVAE(_DiffusersConsistencyDecoderVAE):
        """`diffusers.ConsistencyDecoderVAE` with sdvae-fast's backends (see the module docstring).

        Constructor arguments, config, state-dict names, `from_pretrained` / `save_pretrained`, `encode`,
        `decode(z, generator=None, return_dict=True, num_inference_steps=2)` and `forward` are diffusers'.
        Added: `backend` (initially $SDVAE_FAST_BACKEND or "auto") and `set_backend`. The decode's UNet runs on
        the kernels per `backend` (only the UNet: the scheduler steps, the noise draw and the encoder are
        diffusers' code). Results on backend "torch" are diffusers' bit for bit; on the kernels they agree to
        fp32 rounding (tests/test_consistency.py).
        """

        @functools.wraps(_DiffusersConsistencyDecoderVAE.__init__)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            unet = self.decoder_unet
            # A bound method in the instance dict shadows UNet2DModel.forward; copy.deepcopy rebinds it.
            unet.__dict__["forward"] = types.MethodType(_decoder_unet_forward, unet)
            self.backend = check_backend(os.environ.get(BACKEND_ENV) or "auto", f"environment variable {BACKEND_ENV}")
            # Read by diffusers' pipelines for their model_index.json: diffusers' class loads the saved folder.
            self.__dict__["__module__"] = "diffusers"

        @property
        def backend(self) -> str:
            """"auto", "triton" or "torch" (`sdvae_fast.backends`): which forward the decoder's UNet runs."""
            return self.decoder_unet.__dict__.get(_BACKEND_KEY, "auto")

        @backend.setter
        def backend(self, name: str) -> None:
            self.decoder_unet.__dict__[_BACKEND_KEY] = check_backend(name, "backend")

        def set_backend(self, name: str) -> None:
            """Choose the UNet's forward: "auto" (the kernels on CUDA when available, else PyTorch), "triton"
            (always the kernels; on CPU only under TRITON_INTERPRET=1, else decode raises RuntimeError), or
            "torch" (diffusers' UNet2DModel forward). Raises ValueError for any other name."""
            self.backend = name

        def extra_repr(self) -> str:
            return f"backend={self.backend!r}"

else:

    class ConsistencyDecoderVAE:
        """Placeholder without diffusers: constructing or loading raises ImportError (see the module docstring)."""

        _MESSAGE = ("sdvae_fast.ConsistencyDecoderVAE needs diffusers (pip install diffusers): it is a subclass of "
                    "diffusers.ConsistencyDecoderVAE; a standalone reference UNet is future work (issue 13)")

        def __new__(cls, *args, **kwargs):
            raise ImportError(cls._MESSAGE)

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise ImportError(cls._MESSAGE)

        @classmethod
        def from_config(cls, *args, **kwargs):
            raise ImportError(cls._MESSAGE)
