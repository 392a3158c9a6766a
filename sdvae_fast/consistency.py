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

import os
import types

import torch

from sdvae_fast.backends import BACKEND_ENV, HAS_DIFFUSERS, check_backend, needs_diffusers, parameters_match


__all__ = ["ConsistencyDecoderVAE", "HAS_DIFFUSERS"]

#: Where the UNet's instance forward reads the backend: an entry of `decoder_unet.__dict__` (copied by
#: `copy.deepcopy` and pickling with the module, unlike a reference back to the VAE).
_BACKEND_KEY = "_sdvae_fast_backend"


def _unet_runs_fast(unet: torch.nn.Module, backend: str, sample) -> bool:
    """Whether the UNet call on `sample` takes the fast path (see the module docstring)."""
    if not _runs_fast(unet, backend, sample):
        return False
    from sdvae_fast import fast

    return fast.unet_why_not(unet) is None


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


def _encoder_forward(self, sample):
    """The instance `forward` of `ConsistencyDecoderVAE.encoder` (diffusers' Encoder): `fast.run_encoder` when
    the backend says so (as `_unet_runs_fast` decides for the UNet), else the class's forward. sample
    (N, 3, H, W) -> (N, 2 * latent_channels, H/8, W/8); errors are then diffusers'."""
    if _runs_fast(self, self.__dict__.get(_BACKEND_KEY, "torch"), sample):
        from sdvae_fast import fast

        return fast.run_encoder(self, sample)
    return type(self).forward(self, sample)


def _runs_fast(module: torch.nn.Module, backend: str, sample) -> bool:
    """Whether a call of `module` on `sample` takes the kernels: the backend allows it on sample's device, the
    parameters are in sample's dtype and device, and autograd is not needed. Off CUDA with backend "auto" (and
    for "torch") the fast package is never imported."""
    if backend == "torch" or (backend == "auto" and getattr(sample, "device", torch.device("cpu")).type != "cuda"):
        return False
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or not parameters_match((module,), sample):
        return False
    from sdvae_fast import fast

    return not fast.needs_autograd(module, sample) and fast.use_fast_path(backend, sample.device)


if HAS_DIFFUSERS:
    import functools

    from diffusers import ConsistencyDecoderVAE as _DiffusersConsistencyDecoderVAE
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.utils.accelerate_utils import apply_forward_hook
    from diffusers.utils.torch_utils import randn_tensor

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
            self.encoder.__dict__["forward"] = types.MethodType(_encoder_forward, self.encoder)
            self.backend = check_backend(os.environ.get(BACKEND_ENV) or "auto", f"environment variable {BACKEND_ENV}")
            # Read by diffusers' pipelines for their model_index.json: diffusers' class loads the saved folder.
            self.__dict__["__module__"] = "diffusers"

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
            """Load a diffusers folder (or Hub repository id) of a consistency decoder with every weight checked:
            `sdvae_fast.loading.load_consistency_decoder` (diffusers' `from_pretrained` would initialise weights
            missing from the file at random and only log their names). Arguments as diffusers' (`subfolder`,
            `torch_dtype`, `variant`, the Hub options, config overrides); raises `loading.CheckpointError` listing
            missing or mis-shaped weights."""
            from sdvae_fast import loading

            return loading.load_consistency_decoder(cls, pretrained_model_name_or_path, **kwargs)

        @property
        def backend(self) -> str:
            """"auto", "triton" or "torch" (`sdvae_fast.backends`): which forward the decoder's UNet runs."""
            return self.decoder_unet.__dict__.get(_BACKEND_KEY, "auto")

        @backend.setter
        def backend(self, name: str) -> None:
            name = check_backend(name, "backend")
            self.decoder_unet.__dict__[_BACKEND_KEY] = name
            self.encoder.__dict__[_BACKEND_KEY] = name

        def _decode_runs_fast(self, z) -> bool:
            """Whether `decode` assembles the UNet input inside conv_in (the kernels path), see `decode`."""
            from sdvae_fast import fast

            return _runs_fast(self.decoder_unet, self.backend, z) and fast.unet_why_not(self.decoder_unet) is None

        @apply_forward_hook
        def decode(self, z: torch.Tensor, generator: "torch.Generator | None" = None, return_dict: bool = True,
                   num_inference_steps: int = 2):
            """Decode latents with the consistency decoder: `num_inference_steps` (2) UNet steps at full resolution.

            Args:
                z: (N, latent_channels, h, w) latents as `encode` gives them (unscaled), in the model's dtype.
                generator: the noise draws (diffusers' order: the initial noise, then one draw per step but the
                    last), so the same generator gives diffusers' image.
                return_dict: return `DecoderOutput(sample=...)` (else a 1-tuple).
                num_inference_steps: 2 (the scheduler raises ValueError otherwise, as diffusers').
            Returns:
                `DecoderOutput` with sample (N, 3, 8h, 8w) in z's dtype, or `(sample,)`.

            On the kernels (`backend`, as the UNet call decides), the scheduler arithmetic is diffusers'
            (`ConsistencyDecoderScheduler`: timesteps, `c_in` / `c_skip` / `c_out`, `step`, the noise draws), and
            the UNet input `cat([x_t * c_in[t], up8((z * scaling_factor - means) / stds)])` is never built: the
            UNet's conv_in reads x_t and the low-resolution z directly, with `c_in[t]`, `scaling_factor / stds`
            and `-means / stds` as its prologue's per-channel scale and shift (`fast.run_unet(..., sample2=z)`),
            and conv_out computes only the 3 channels decode keeps. Otherwise diffusers' decode runs as is.
            """
            if not self._decode_runs_fast(z):
                return super().decode(z, generator=generator, return_dict=return_dict,
                                      num_inference_steps=num_inference_steps)
            from sdvae_fast import fast

            scheduler = self.decoder_scheduler
            up = 2 ** (len(self.config.block_out_channels) - 1)
            n, c, h, w = z.shape
            scheduler.set_timesteps(num_inference_steps, device=self.device)
            x_t = scheduler.init_noise_sigma * randn_tensor((n, 3, h * up, w * up), generator=generator,
                                                            dtype=z.dtype, device=z.device)
            # conv_in's per-channel prologue: [c_in[t] x3 | scaling_factor / stds], [0 x3 | -means / stds]
            stds = self.stds.reshape(-1).to(device=z.device, dtype=torch.float32)  # (C,)
            scale = torch.empty(n, 3 + c, device=z.device, dtype=torch.float32)  # (N, 3 + C)
            shift = torch.zeros_like(scale)
            scale[:, 3:] = self.config.scaling_factor / stds
            shift[:, 3:] = -self.means.reshape(-1).to(device=z.device, dtype=torch.float32) / stds
            for t in scheduler.timesteps:
                scale[:, :3] = scheduler.c_in[t].to(device=z.device, dtype=torch.float32)
                model_output = fast.run_unet(self.decoder_unet, x_t, t, sample2=z, sample2_upsample=up,
                                             input_scale=scale, input_shift=shift, out_channels=3)
                x_t = scheduler.step(model_output, t, x_t, generator).prev_sample
            return DecoderOutput(sample=x_t) if return_dict else (x_t,)

        def set_backend(self, name: str) -> None:
            """Choose the UNet's forward: "auto" (the kernels on CUDA when available, else PyTorch), "triton"
            (always the kernels; on CPU only under TRITON_INTERPRET=1, else decode raises RuntimeError), or
            "torch" (diffusers' UNet2DModel forward). Raises ValueError for any other name."""
            self.backend = name

        def extra_repr(self) -> str:
            return f"backend={self.backend!r}"

else:
    ConsistencyDecoderVAE = needs_diffusers("ConsistencyDecoderVAE", ("from_pretrained", "from_config"),
                                            note="a standalone reference UNet is future work (issue 13)")