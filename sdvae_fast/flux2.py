"""`AutoencoderKLFlux2`: FLUX.2's VAE (diffusers' class) with sdvae-fast's backends (issue 14).

    from sdvae_fast import AutoencoderKLFlux2
    vae = AutoencoderKLFlux2.from_pretrained("path/to/flux2", subfolder="vae")    # diffusers' folder
    z = vae.encode(images).latent_dist.mode()               # (N, 32, H/8, W/8), unnormalised
    tokens = vae.normalize_latents(vae.patchify_latents(z)) # what FLUX.2 pipelines hand the transformer
    images = vae.decode(vae.unpatchify_latents(vae.denormalize_latents(tokens))).sample

The model is the kl-f8 stack (docs/design.md, section 1) with 32 latent channels and both quant convs, plus a
BatchNorm `bn` (no affine terms, running statistics over the 4 * 32 = 128 channels of 2x2-patchified latents).
`bn` is not part of `encode` / `decode`: FLUX.2 pipelines patchify the encoder's latents and normalise them with
`bn.running_mean` and `sqrt(bn.running_var + config.batch_norm_eps)` themselves, and undo both before `decode`.
There is no `scaling_factor` / `shift_factor` in its config. `decoder_block_out_channels` gives the decoder other
widths than the encoder: FLUX.2's small decoder has 96/192/384/384 (3, 6 and 12 channels per GroupNorm group;
a mid-block attention of head dim 384, which the attention kernel runs without padding it to 512).

With diffusers installed `AutoencoderKLFlux2` is a subclass of `diffusers.AutoencoderKLFlux2`: constructor
arguments, `config`, state-dict names (`bn.running_mean`, `bn.running_var`, `bn.num_batches_tracked` included),
`from_pretrained` / `save_pretrained` (folders interchangeable with diffusers', `_class_name`
"AutoencoderKLFlux2") are diffusers' own. `encode` / `decode` / tiling / slicing / validation / `backend` are
those of `sdvae_fast.AutoencoderKL` (`model.FastVAEMixin`): backend "torch" runs diffusers' modules, "triton" (and
"auto" on CUDA) the fast path's units, which walk the encoder and decoder as they walk any AutoencoderKL.
Without diffusers the class raises ImportError (a standalone FLUX.2 model is not provided).

Original single-file checkpoints (black-forest-labs' `ae.safetensors`, `full_encoder_small_decoder.safetensors`)
are not loaded: diffusers 0.42.1 has no conversion for them and their key layout is not documented where this
project could read it; `from_single_file` raises NotImplementedError saying so.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from typing import Optional, Sequence, Tuple, Union

import torch

from sdvae_fast.configs import DEFAULTS, FLUX2_PRESETS, normalize_config

#: Whether diffusers is installed (then `AutoencoderKLFlux2` is a subclass of diffusers' class).
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None

#: The `_class_name` of FLUX.2 VAE folders (config.json), as diffusers writes it.
CLASS_NAME = "AutoencoderKLFlux2"

__all__ = ["AutoencoderKLFlux2", "CLASS_NAME", "HAS_DIFFUSERS", "patchify_latents", "unpatchify_latents"]


def _patch_pair(patch_size, name: str = "patch_size") -> Tuple[int, int]:
    """(ph, pw) of a patch size given as an int or a pair of positive ints; ValueError naming `name` otherwise."""
    pair = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if len(pair) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {patch_size!r}")
    return pair


def _check_latents_4d(latents, name: str) -> None:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(latents).__name__}")
    if latents.dim() != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {tuple(latents.shape)}")


def patchify_latents(latents: torch.Tensor, patch_size: Union[int, Sequence[int]] = (2, 2)) -> torch.Tensor:
    """Fold each ph x pw patch of latents into channels, as FLUX.2 pipelines do before normalising.

    Args:
        latents: (N, C, H, W), any dtype, device and strides; H divisible by ph and W by pw.
        patch_size: (ph, pw) or one int; FLUX.2's `config.patch_size` is (2, 2).
    Returns:
        (N, C * ph * pw, H / ph, W / pw), a new contiguous tensor of latents' dtype: output channel
        c * ph * pw + i * pw + j holds input channel c at offset (i, j) inside each patch (the channel order of
        `bn`'s running statistics).
    Raises:
        TypeError / ValueError naming `latents` or `patch_size` for a non-tensor, a rank other than 4, a side that
        the patch does not divide, or a bad patch size.
    """
    ph, pw = _patch_pair(patch_size)
    _check_latents_4d(latents, "latents")
    n, c, h, w = latents.shape
    if h % ph or w % pw:
        raise ValueError(f"latents: height and width must be multiples of the patch size {(ph, pw)}, got shape "
                         f"{tuple(latents.shape)}")
    patches = latents.reshape(n, c, h // ph, ph, w // pw, pw)  # (N, C, H/ph, ph, W/pw, pw)
    patches = patches.permute(0, 1, 3, 5, 2, 4)  # (N, C, ph, pw, H/ph, W/pw)
    return patches.reshape(n, c * ph * pw, h // ph, w // pw)


def unpatchify_latents(latents: torch.Tensor, patch_size: Union[int, Sequence[int]] = (2, 2)) -> torch.Tensor:
    """The inverse of `patchify_latents`: (N, C * ph * pw, h, w) -> (N, C, h * ph, w * pw), contiguous.

    Raises TypeError / ValueError naming `latents` or `patch_size` for a non-tensor, a rank other than 4, a channel
    count that ph * pw does not divide, or a bad patch size.
    """
    ph, pw = _patch_pair(patch_size)
    _check_latents_4d(latents, "latents")
    n, cp, h, w = latents.shape
    if cp % (ph * pw):
        raise ValueError(f"latents: the channel count must be a multiple of ph * pw = {ph * pw} (patchified "
                         f"latents), got shape {tuple(latents.shape)}")
    c = cp // (ph * pw)
    patches = latents.reshape(n, c, ph, pw, h, w)  # (N, C, ph, pw, h, w)
    patches = patches.permute(0, 1, 4, 2, 5, 3)  # (N, C, h, ph, w, pw)
    return patches.reshape(n, c, h * ph, w * pw)


def _validate_flux2_fields(fields: dict, defaults: dict, source: str) -> None:
    """Raise ValueError (naming `source` and the field) for a config diffusers' class would build wrongly or
    fail on deep inside: the AutoencoderKL fields as `configs.normalize_config` checks them (any block type names),
    then decoder_block_out_channels (None, or as many positive widths as block_out_channels, each divisible by
    norm_num_groups), batch_norm_eps > 0, batch_norm_momentum None or in [0, 1], patch_size."""
    config = {**defaults, **fields}
    shared = {k: v for k, v in config.items() if k in DEFAULTS}
    normalize_config(shared, source=source, check_block_types=False)
    widths = tuple(config["block_out_channels"]) if not isinstance(config["block_out_channels"], int) \
        else (config["block_out_channels"],)
    decoder = config.get("decoder_block_out_channels")
    if decoder is not None:
        decoder = (decoder,) if isinstance(decoder, int) else tuple(decoder)
        groups = config["norm_num_groups"]
        if len(decoder) != len(widths) or not all(isinstance(w, int) and w > 0 and w % groups == 0
                                                  for w in decoder):
            raise ValueError(
                f"{source}: decoder_block_out_channels must be None or {len(widths)} positive ints (one per "
                f"block_out_channels entry) divisible by norm_num_groups ({groups}), got {list(decoder)}"
            )
    eps = config["batch_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{source}: batch_norm_eps must be a positive number, got {eps!r}")
    momentum = config["batch_norm_momentum"]
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"{source}: batch_norm_momentum must be None or a number in [0, 1], got {momentum!r}")
    _patch_pair(config["patch_size"], f"{source}: patch_size")


if HAS_DIFFUSERS:
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2 as _DiffusersFlux2
    from diffusers.utils.accelerate_utils import apply_forward_hook

    from sdvae_fast.model import FastVAEMixin

    _SIGNATURE = inspect.signature(_DiffusersFlux2.__init__)
    _FIELD_DEFAULTS = {k: p.default for k, p in _SIGNATURE.parameters.items() if k != "self"}

    class AutoencoderKLFlux2(FastVAEMixin, _DiffusersFlux2):
        """`diffusers.AutoencoderKLFlux2` with sdvae-fast's backends (see the module docstring).

        Constructor arguments, `config`, state-dict names, `from_pretrained` / `save_pretrained` are diffusers'.
        Added: `backend` / `set_backend`, input validation (errors name the argument and the expected shape),
        exact-shape tiling, `from_preset("flux2" | "flux2-small")`, `from_config` of a preset name or folder,
        `patchify_latents` / `unpatchify_latents` (the model's `config.patch_size`) and `normalize_latents` /
        `denormalize_latents` (the pipelines' BatchNorm arithmetic, bitwise).

            AutoencoderKLFlux2.from_pretrained("black-forest-labs/FLUX.2-dev", subfolder="vae")
            AutoencoderKLFlux2.from_preset("flux2-small", seed=0)   # the small decoder's architecture, seeded
        """

        @functools.wraps(_DiffusersFlux2.__init__)
        def __init__(self, *args, **kwargs):
            public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
            unknown = sorted(k for k in public if k not in _FIELD_DEFAULTS)
            if unknown:
                raise TypeError(f"AutoencoderKLFlux2(): unknown config field(s) {unknown}; valid fields: "
                                f"{list(_FIELD_DEFAULTS)}")
            try:
                bound = _SIGNATURE.bind(None, *args, **public)
            except TypeError as e:
                raise TypeError(f"AutoencoderKLFlux2(): {e}; valid fields: {list(_FIELD_DEFAULTS)}") from None
            fields = {k: v for k, v in bound.arguments.items() if k != "self"}
            _validate_flux2_fields(fields, _FIELD_DEFAULTS, "AutoencoderKLFlux2()")
            super().__init__(*args, **kwargs)
            self._init_backend()
            # Read by diffusers' pipelines for their model_index.json: diffusers' class loads the saved folder.
            self.__dict__["__module__"] = "diffusers"

        encode = apply_forward_hook(FastVAEMixin.encode)
        decode = apply_forward_hook(FastVAEMixin.decode)

        # -- construction ------------------------------------------------------------------------------------

        @classmethod
        def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
            """diffusers' `from_config` (random weights); `config` may also be a preset name ("flux2",
            "flux2-small") or a diffusers folder (its config.json, or vae/config.json)."""
            if isinstance(config, (str, os.PathLike)):
                name = os.fspath(config)
                if name in FLUX2_PRESETS:
                    config = dict(FLUX2_PRESETS[name])
                else:
                    config = cls.load_config(name, subfolder="vae" if _has_vae_subfolder(name) else None)
            return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

        @classmethod
        def from_preset(cls, name: str, seed: int = 0, *, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None, **overrides):
            """A FLUX.2 preset's architecture ("flux2", "flux2-small") with deterministic random weights.

            PyTorch's default init drawn from `torch.manual_seed(seed)` in a forked RNG state (the global RNG is
            untouched); `bn` keeps its initial running statistics (mean 0, variance 1). `overrides` replace
            config fields (e.g. narrow widths for tests). Returned in eval mode, moved to `dtype` / `device` when
            given. Such weights decode to no meaningful image. Raises ValueError listing the presets for an
            unknown name; TypeError / ValueError for bad overrides.
            """
            if name not in FLUX2_PRESETS:
                raise ValueError(f"unknown FLUX.2 preset {name!r}; valid preset names: {sorted(FLUX2_PRESETS)}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cls(**{**FLUX2_PRESETS[name], **overrides})
            if device is not None or dtype is not None:
                model = model.to(device=device, dtype=dtype)
            return model.eval()

        @classmethod
        def from_single_file(cls, *args, **kwargs):
            """Not supported: raises NotImplementedError (see the module docstring)."""
            raise NotImplementedError(
                "AutoencoderKLFlux2.from_single_file: original FLUX.2 VAE checkpoints are not supported (diffusers "
                "has no conversion for them and their key layout is undocumented); load a diffusers folder with "
                "from_pretrained instead"
            )

        # -- FLUX.2's latent normalisation (what pipelines apply around encode / decode) --------------------

        @property
        def patch_size(self) -> Tuple[int, int]:
            """(ph, pw) of the latent patches `bn` normalises (`config.patch_size`, (2, 2) for FLUX.2)."""
            return _patch_pair(self.config.patch_size)

        def patchify_latents(self, latents: torch.Tensor) -> torch.Tensor:
            """`patchify_latents(latents, self.patch_size)`: (N, 32, h, w) -> (N, 128, h/2, w/2) for FLUX.2."""
            return patchify_latents(latents, self.patch_size)

        def unpatchify_latents(self, latents: torch.Tensor) -> torch.Tensor:
            """`unpatchify_latents(latents, self.patch_size)`: (N, 128, h, w) -> (N, 32, 2h, 2w) for FLUX.2."""
            return unpatchify_latents(latents, self.patch_size)

        def latents_bn_mean_std(self, device=None, dtype: Optional[torch.dtype] = None):
            """(mean, std) of the latent BatchNorm, each (1, C * ph * pw, 1, 1): `bn.running_mean` and
            `sqrt(bn.running_var + config.batch_norm_eps)` (computed in the buffers' dtype, then moved to
            `device` / `dtype` when given), as FLUX.2 pipelines compute them."""
            mean = self.bn.running_mean.view(1, -1, 1, 1).to(device, dtype)
            std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.batch_norm_eps).to(device, dtype)
            return mean, std

        def _check_patchified(self, latents, name: str) -> None:
            _check_latents_4d(latents, name)
            channels = self.bn.num_features
            if latents.shape[1] != channels:
                raise ValueError(f"{name} must be patchified latents (N, {channels}, h, w) (see patchify_latents), "
                                 f"got shape {tuple(latents.shape)}")
            if not latents.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {latents.dtype}")

        def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
            """`(latents - mean) / std` with `latents_bn_mean_std` in latents' device and dtype: what FLUX.2
            pipelines do to patchified encoder latents (N, C * ph * pw, h, w). Returns a new tensor, same shape
            and dtype. Raises TypeError / ValueError naming `latents` for a wrong shape or an integer dtype."""
            self._check_patchified(latents, "latents")
            mean, std = self.latents_bn_mean_std(latents.device, latents.dtype)
            return (latents - mean) / std

        def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
            """`latents * std + mean`: the inverse of `normalize_latents`, which pipelines apply to the
            transformer's patchified latents before `unpatchify_latents` and `decode`. Raises as
            `normalize_latents`."""
            self._check_patchified(latents, "latents")
            mean, std = self.latents_bn_mean_std(latents.device, latents.dtype)
            return latents * std + mean

        def extra_repr(self) -> str:
            cfg = self.config
            decoder = cfg.decoder_block_out_channels
            return (f"block_out_channels={list(cfg.block_out_channels)}, decoder_block_out_channels="
                    f"{list(decoder) if decoder is not None else None}, latent_channels={cfg.latent_channels}, "
                    f"batch_norm_eps={cfg.batch_norm_eps}, backend={self.backend!r}")

else:

    class AutoencoderKLFlux2:
        """Placeholder without diffusers: constructing or loading raises ImportError (see the module docstring)."""

        _MESSAGE = ("sdvae_fast.AutoencoderKLFlux2 needs diffusers (pip install diffusers): it is a subclass of "
                    "diffusers.AutoencoderKLFlux2")

        def __new__(cls, *args, **kwargs):
            raise ImportError(cls._MESSAGE)

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise ImportError(cls._MESSAGE)

        @classmethod
        def from_config(cls, *args, **kwargs):
            raise ImportError(cls._MESSAGE)

        @classmethod
        def from_preset(cls, *args, **kwargs):
            raise ImportError(cls._MESSAGE)


def _has_vae_subfolder(folder: str) -> bool:
    """Whether `folder` is a pipeline folder (config.json in vae/, none at its top)."""
    return (not os.path.isfile(os.path.join(folder, "config.json"))
            and os.path.isfile(os.path.join(folder, "vae", "config.json")))

